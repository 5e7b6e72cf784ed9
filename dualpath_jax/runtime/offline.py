"""The offline agentic job (PAPER.md section 6.7): all agents start at t=0, JCT when all finish.

Primed turns: with `primed_turns=k` every agent first runs its turns 0..k-1 untimed, on the same
cluster and into the same store namespaces; the clock starts when all of them have ended, and
all agents then start turn k at once. This emulates agents that resume with their early context
already in storage: a run with a few turns would otherwise be dominated by the first turn's
uncached prefill, which the paper's trajectories of 60-157 turns amortise. Records, bytes, link
transfers, forwards and decode steps of the primed turns are left out of the run's results.

Each agent's turn k+1 is submitted when its turn k ends; its prompt is the agent's whole context
(earlier appends and generated tokens) plus the next append. The hit length is what the client
knows (PAPER.md section 6.4): the whole blocks the store holds for the prompt (a lookup), or, in
oracle mode, which skips every store access, the blocks earlier turns would have persisted.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Sequence

import numpy as np

from dualpath_jax.kvstore.block_store import KVBlockStore
from dualpath_jax.kvstore.hashing import chain_block_hashes
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model.prefill import pow2_at_least
from dualpath_jax.runtime.cluster import Cluster
from dualpath_jax.runtime.colocated import ColocatedEngine
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.runtime.compile_events import CompileEvents
from dualpath_jax.runtime.gc_pauses import GcPauses
from dualpath_jax.runtime.profile_window import ProfileWindow
from dualpath_jax.runtime.thread_samples import ThreadSampler
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.workload.synthetic import AgentTrajectory


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineRun:
  """What one offline run did."""

  mode: str
  jct_s: float
  turns: list[dict]
  """One record per turn (agent, turn, timestamps relative to the start, tokens, bytes, tokens)."""
  bytes: dict[str, int]
  """Bytes per path over the run, from the traffic managers."""
  generated: dict[tuple[str, int], list[int]]
  """Generated tokens per (agent, turn)."""
  max_prefix_layers_on_pe: int
  """Most layers of prefix KV any PE held on its device at once."""
  max_de_staged_bytes: int
  """Most bytes of DE-path layers one PE's forward held staged on one DE at once
  (runtime.de_path_h2d 'forward', bounded by runtime.de_path_stage_bytes)."""
  rounded_prefill_batches: int
  """Timed PE batches run in a larger compiled shape than their own (PrefillShard.batch_shape)."""
  decode_step_s: list[float]
  """Every decode step's wall time, all DEs."""
  decode_steps: dict[str, list]
  """Per DE: every decode step's decode_worker.StepRecord, its times relative to the start."""
  engine_stage_s: dict[str, dict[str, dict[str, float]]]
  """{'prefill' | 'decode': {engine: {stage: seconds}}}: where each engine's thread spent the
  run (PrefillShard.stage_s, DecodeWorker.stage_s)."""
  kv_moves: list
  """Every device-side KV move: (t_start, t_end, path, source engine, destination engine)
  relative to the start (runtime.traffic.TrafficManager.move_records)."""
  link_records: dict[int, list]
  """Per node: (t_start, t_end, bytes) of every completed read, relative to the start."""
  link_write_records: dict[int, list]
  """Per node: (t_start, t_end, bytes) of every completed write, relative to the start."""
  forwards: dict[int, list]
  """Per PE group (node): per forward, per shard (predicted_s, measured_s) or None if idle."""
  loaded_forwards: dict[int, list]
  """Per PE group (node): the forwards (same form) in which every shard had more ready work
  than its batch took."""
  describe: str
  """The cluster as run (scheduler, alpha/beta, batching, links, mover)."""
  thread_samples: dict | None = None
  """Where the threads spent the timed part (runtime/thread_samples.py), if sampled."""
  device_trace: dict | None = None
  """The profiled window of the timed part, if one was asked for (ProfileWindow.end)."""
  gc_pauses: dict | None = None
  """Python's garbage collections over the timed part (runtime/gc_pauses.py)."""
  compiles: dict | None = None
  """JAX compilations inside the timed part, per thread group and function
  (runtime/compile_events.py): shapes the precompile did not cover."""
  decode_input_placements: dict[str, int] | None = None
  """Over the timed part, all DEs: decode inputs placed from the host ('tokens', ...) and
  reused on the device ('tokens_reused', ...) (DecodeWorker.input_placements)."""
  precompiled: dict | None = None
  """With precompile: {shapes, admit_tokens, seconds} compiled before the first turn."""
  host_buffers: dict[int, dict] | None = None
  """Per node: HostBuffer.stats() at the end (peak bytes reserved, where pool blocks came from,
  over the cluster's life) and its arena's lease seconds (Cluster.host_buffer_stats)."""


def _hit_blocks(store, mode: str, namespace: str, hashes: Sequence[str], prompt_tokens: int,
                known_with_kv: int, block_tokens: int) -> int:
  # One prompt token is always computed: its logits give the first generated token.
  cap = (prompt_tokens - 1) // block_tokens
  if mode == "oracle":
    return min(known_with_kv // block_tokens, cap)
  return min(store.longest_prefix(namespace, hashes), cap)


def timed_turn_lengths(trajectories: Sequence[AgentTrajectory], *, first_turn: int,
                       block_tokens: int) -> list[tuple[int, int]]:
  """(prompt tokens, hit tokens) of every turn from `first_turn` on, from the lengths alone: a
  turn's prompt is the previous context plus its append, its hit the whole blocks of the
  previous context that have KV (all but the last generated token), as _hit_blocks finds them
  once the previous turn is stored."""
  return [(prompt, hit) for prompt, hit, _ in _timed_turns(trajectories, first_turn, block_tokens)]


def _timed_turns(trajectories: Sequence[AgentTrajectory], first_turn: int, block_tokens: int):
  """(prompt tokens, hit tokens, generated tokens) of every turn from `first_turn` on."""
  for trajectory in trajectories:
    with_kv = 0
    for turn, spec in enumerate(trajectory.turns):
      prompt = with_kv + (1 if turn else 0) + len(spec.append_ids)  # context + append
      hit = min(with_kv // block_tokens, (prompt - 1) // block_tokens) * block_tokens
      if turn >= first_turn:
        yield prompt, hit, spec.gen_tokens
      with_kv = prompt + spec.gen_tokens - 1


def persisted_block_counts(trajectories: Sequence[AgentTrajectory], *, first_turn: int,
                           block_tokens: int) -> list[int]:
  """The padded block counts (powers of 2) that the DEs read back from their pools to persist
  the turns from `first_turn` on (DecodeWorker._read_persisted_pages: the completed blocks of
  the prompt and every generated token but the last, less the hit's)."""
  counts = {(prompt + gen - 1) // block_tokens - hit // block_tokens
            for prompt, hit, gen in _timed_turns(trajectories, first_turn, block_tokens)}
  return sorted({pow2_at_least(n) for n in counts if n > 0})


def prefill_shapes(trajectories: Sequence[AgentTrajectory], *, first_turn: int, block_tokens: int,
                   max_batch_requests: int) -> list[tuple[int, int, int]]:
  """The (rows, tp, tn) PE batch shapes (PrefillShard.run_batch's padding: powers of 2) that the
  turns from `first_turn` on can produce: tp from each turn's hit and prompt, tn over the powers
  of 2 from the smallest to the largest new-token count, rows every power of 2 up to
  max_batch_requests. Turns without a hit (tp 0) are left out: they are the first turns, which
  priming or warm-up runs. A batch whose chunks fall outside these (chunked prefill) still
  compiles when it runs."""
  hits = [(prompt, hit) for prompt, hit in timed_turn_lengths(
      trajectories, first_turn=first_turn, block_tokens=block_tokens) if hit]
  if not hits:
    return []
  tps = sorted({pow2_at_least(n, block_tokens) for prompt, hit in hits for n in (hit, prompt - 1)})
  news = [prompt - hit for prompt, hit in hits]
  tns = [pow2_at_least(min(news), block_tokens)]
  while tns[-1] < pow2_at_least(max(news), block_tokens):
    tns.append(tns[-1] * 2)
  rows = [1]
  while rows[-1] < pow2_at_least(max_batch_requests):
    rows.append(rows[-1] * 2)
  return [(r, tp, tn) for r in rows for tp in tps for tn in tns]


def turn_request(store: KVBlockStore, mode: str, namespace_prefix: str,
                 trajectory: AgentTrajectory, turn: int, context: Sequence[int],
                 known_with_kv: int, block_tokens: int) -> TurnRequest:
  """Turn `turn` of `trajectory` as a request: its prompt (the agent's context so far plus the
  turn's append), chained block hashes and hit length (`_hit_blocks`). Offline and online runs."""
  prompt = np.array(list(context) + trajectory.turns[turn].append_ids.tolist(), np.int32)
  namespace = namespace_prefix + trajectory.agent_id
  hashes = chain_block_hashes(prompt, block_tokens)
  hit = _hit_blocks(store, mode, namespace, hashes, len(prompt), known_with_kv, block_tokens)
  return TurnRequest(agent_id=namespace, turn=turn, prompt=prompt,
                     gen_tokens=trajectory.turns[turn].gen_tokens, hashes=hashes,
                     hit_blocks=hit, block_tokens=block_tokens)


def run_offline(runtime_config: RuntimeConfig, model, store: KVBlockStore, layout: KVLayout,
                trajectories: Sequence[AgentTrajectory], *, cost_model: CostModel,
                namespace_prefix: str = "", label: str = "", primed_turns: int = 0,
                progress: Callable[[str], None] | None = None, devices=None,
                thread_sample_hz: float = 0.0, precompile: bool = False,
                device_trace: ProfileWindow | None = None, gc_freeze: bool = False
                ) -> OfflineRun:
  """Runs every trajectory to its end on a fresh Cluster; returns the run's records.

  primed_turns: the first turns of every agent, run untimed before the clock starts (module
  docstring). thread_sample_hz > 0: every thread's stack is sampled at that rate over the timed
  part (runtime/thread_samples.py; OfflineRun.thread_samples). precompile: before any turn,
  every PE compiles its forward for the batch shapes the timed turns can produce
  (prefill_shapes, PrefillShard.precompile), outside the clock. device_trace: a window of the
  timed part recorded by jax.profiler (runtime/profile_window.py; OfflineRun.device_trace).
  gc_freeze: move every object alive when the clock starts out of the collector's reach
  (gc.freeze; runtime/gc_pauses.py); the timed part's collections are counted either way.
  """
  if isinstance(primed_turns, bool) or not isinstance(primed_turns, int) or primed_turns < 0:
    raise ValueError(f"primed_turns must be a non-negative int, got {primed_turns!r}")
  done_queue: queue.Queue = queue.Queue()
  cluster = Cluster(runtime_config, model, store, layout, cost_model=cost_model,
                    on_turn_done=done_queue.put, devices=devices)
  bt = layout.block_tokens
  contexts = {t.agent_id: [] for t in trajectories}
  with_kv = {t.agent_id: 0 for t in trajectories}
  by_agent = {t.agent_id: t for t in trajectories}
  primed = {t.agent_id: min(primed_turns, len(t.turns)) for t in trajectories}
  total_primed = sum(primed.values())
  total = sum(len(t.turns) for t in trajectories) - total_primed
  records, generated = [], {}
  start = time.perf_counter()
  marks = None  # counters when the clock starts (after the primed turns)
  sampler = ThreadSampler(thread_sample_hz) if thread_sample_hz else None
  thread_samples = precompiled = trace = gc_stats = compile_stats = None
  pauses = GcPauses(freeze=gc_freeze)
  compiles = CompileEvents()

  def submit(agent_id: str, turn: int) -> None:
    cluster.submit(turn_request(store, runtime_config.mode, namespace_prefix, by_agent[agent_id],
                                turn, contexts[agent_id], with_kv[agent_id], bt))

  def start_clock() -> None:
    nonlocal start, marks
    if sampler is not None:
      sampler.start()
    if device_trace is not None:
      device_trace.begin()
    pauses.start()
    compiles.start()
    if progress is not None:
      progress(f"[{name}] clock started: the timed turns")
    start = time.perf_counter()
    marks = dict(bytes=cluster.bytes_by_path(),
                 forwards={n: len(g.forwards) for n, g in cluster.prefill_groups.items()},
                 stages={e.engine.name: dict(e.stage_s) for e in _engines(cluster)},
                 placements=_placements(cluster),
                 rounded={s.engine.name: s.rounded_batches for s in cluster.prefill_shards})
    for trajectory in trajectories:
      if primed[trajectory.agent_id] < len(trajectory.turns):
        submit(trajectory.agent_id, primed[trajectory.agent_id])

  name = label or runtime_config.mode
  try:
    if precompile:
      t0 = time.perf_counter()
      shapes = prefill_shapes(trajectories, first_turn=primed_turns, block_tokens=bt,
                              max_batch_requests=runtime_config.max_batch_requests)
      admits = sorted({cluster.admit_tokens(prompt) for prompt, _ in timed_turn_lengths(
          trajectories, first_turn=primed_turns, block_tokens=bt)})
      skipped = [(list(shape), error) for shard in cluster.prefill_shards
                 for shape, error in shard.precompile(shapes)]
      persists = [] if runtime_config.skips_kv_io else persisted_block_counts(
          trajectories, first_turn=primed_turns, block_tokens=bt)
      for worker in cluster.decode_workers:  # the oracle admits no KV, but decodes
        worker.precompile([] if runtime_config.skips_kv_io else admits, persists)
      precompiled = dict(shapes=[list(s) for s in shapes], admit_tokens=admits,
                         persist_blocks=persists, skipped=skipped,
                         seconds=time.perf_counter() - t0)
      if progress is not None:
        progress(f"[{name}] precompiled {len(shapes)} PE batch shapes (rows, tp, tn), "
                 f"{len(admits)} DE admission lengths and {len(persists)} persist reads in "
                 f"{precompiled['seconds']:.1f} s, untimed")
    primed_done = 0
    if total_primed:
      if progress is not None:
        progress(f"[{name}] priming: turns 0..{primed_turns - 1} of every agent, untimed")
      for trajectory in trajectories:
        if primed[trajectory.agent_id]:
          submit(trajectory.agent_id, 0)
    else:
      start_clock()
    while len(records) < total:
      request: TurnRequest = done_queue.get(timeout=600)
      if request.error is not None:
        raise RuntimeError(f"{request.agent_id} turn {request.turn} failed: "
                           f"{request.error!r}") from request.error
      agent_id = request.agent_id[len(namespace_prefix):]
      contexts[agent_id] = request.prompt.tolist() + request.generated
      with_kv[agent_id] = len(contexts[agent_id]) - 1
      generated[(agent_id, request.turn)] = list(request.generated)
      if request.turn < primed[agent_id]:
        primed_done += 1
        if request.turn + 1 < primed[agent_id]:
          submit(agent_id, request.turn + 1)
        elif primed_done == total_primed:
          start_clock()
        continue
      records.append(_record(request, agent_id, start, layout))
      if progress is not None:
        elapsed = time.perf_counter() - start
        eta = elapsed / len(records) * (total - len(records))
        progress(f"[{name}] turns {len(records)}/{total}  elapsed {elapsed:6.1f}s"
                 f"  eta {eta:6.1f}s")
      if request.turn + 1 < len(by_agent[agent_id].turns):
        submit(agent_id, request.turn + 1)
    jct_s = time.perf_counter() - start
  finally:
    if sampler is not None and marks is not None:
      thread_samples = sampler.stop()
    if device_trace is not None and marks is not None:
      trace = device_trace.end()
    if marks is not None:
      gc_stats = pauses.stop()
      compile_stats = compiles.stop()
    cluster.close()
  if marks is None:  # no turn was timed (every turn primed)
    sampler = device_trace = None
    pauses = GcPauses()
    start_clock()
    gc_stats = pauses.stop()
    compile_stats = compiles.stop()
  since = lambda records: [(r.t_start - start, r.t_end - start, r.nbytes)  # noqa: E731
                           for r in records if r.t_start >= start]
  first = marks["forwards"]
  steps = {w.engine.name: [r._replace(start=r.start - start, end=r.end - start)
                           for r in w.step_records if r.start >= start]
           for w in cluster.decode_workers}
  return OfflineRun(
      mode=runtime_config.mode, jct_s=jct_s, turns=records, generated=generated,
      bytes={k: v - marks["bytes"].get(k, 0) for k, v in cluster.bytes_by_path().items()},
      max_prefix_layers_on_pe=max(s.max_resident_layers for s in cluster.prefill_shards),
      max_de_staged_bytes=max(s.max_de_staged_bytes for s in cluster.prefill_shards),
      rounded_prefill_batches=sum(s.rounded_batches - marks["rounded"][s.engine.name]
                                  for s in cluster.prefill_shards),
      decode_step_s=[r.end - r.start for records in steps.values() for r in records],
      decode_steps=steps,
      engine_stage_s={role: {e.engine.name: {k: v - marks["stages"][e.engine.name].get(k, 0.0)
                                             for k, v in e.stage_s.items()} for e in engines}
                      for role, engines in (("prefill", cluster.prefill_shards),
                                            ("decode", cluster.decode_workers))},
      kv_moves=[(t0 - start, t1 - start, *rest) for tm in cluster.traffic.values()
                for t0, t1, *rest in tm.move_records if t0 >= start],
      link_records={i: since(link.read_records) for i, link in cluster.links.items()},
      link_write_records={i: since(link.write_records) for i, link in cluster.links.items()},
      forwards={node: list(group.forwards[first[node]:])
                for node, group in cluster.prefill_groups.items()},
      loaded_forwards={node: [f for f, loaded in zip(group.forwards[first[node]:],
                                                      group.loaded[first[node]:]) if loaded]
                       for node, group in cluster.prefill_groups.items()},
      describe=cluster.describe(), thread_samples=thread_samples, precompiled=precompiled,
      device_trace=trace, gc_pauses=gc_stats, compiles=compile_stats,
      decode_input_placements={k: v - marks["placements"].get(k, 0)
                               for k, v in _placements(cluster).items()},
      host_buffers=cluster.host_buffer_stats())


def _engines(cluster: Cluster) -> list:
  return [*cluster.prefill_shards, *cluster.decode_workers]


def _placements(cluster: Cluster) -> dict[str, int]:
  total = {}
  for worker in cluster.decode_workers:
    for key, count in getattr(worker, "input_placements", {}).items():
      total[key] = total.get(key, 0) + count
  return total


def _record(request: TurnRequest, agent_id: str, start: float, layout: KVLayout) -> dict:
  return dict(
      agent=agent_id, turn=request.turn, prefill_engine=request.prefill_engine,
      decode_engine=request.decode_engine, read_side=request.read_side,
      read_blocks={"pe": request.read_split[0], "de": request.read_split[1]},
      prefill_chunks=request.chunks, prompt_tokens=request.prompt_tokens,
      hit_tokens=request.hit_tokens,
      new_tokens=request.new_tokens, gen_tokens=request.gen_tokens,
      times_s={k: round(v - start, 6) for k, v in sorted(request.times.items(),
                                                        key=lambda kv: kv[1])},
      bytes=dict(request.bytes), generated=list(request.generated))


def run_reference(model, trajectories: Sequence[AgentTrajectory], max_context_tokens: int
                  ) -> dict[tuple[str, int], list[int]]:
  """Generated tokens of every turn with no cache at all (full recompute, one device)."""
  engine = ColocatedEngine(model, None, use_cache=False, max_context_tokens=max_context_tokens)
  generated = {}
  for trajectory in trajectories:
    context: list[int] = []
    for k, turn in enumerate(trajectory.turns):
      prompt = context + turn.append_ids.tolist()
      result = engine.run_turn(trajectory.agent_id, prompt, turn.gen_tokens)
      generated[(trajectory.agent_id, k)] = result.generated.tolist()
      context = prompt + result.generated.tolist()
  return generated

