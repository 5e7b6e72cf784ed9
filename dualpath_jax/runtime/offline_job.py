"""The offline experiment as a library: config dict -> typed records -> runs -> files in a workdir.

Notebooks and scripts both call `OfflineJob.from_config(config, workdir).run()`. Outputs:
  config.json   the config as run
  summary.json  {"runs": [{mode, jct_s, turns, tokens_prefilled, tokens_hit, bytes{...},
                 outputs_match_reference, snic_balance{...}, attn_balance{...}, ...}, ...]}
  turns.jsonl   one record per turn and mode: timestamps, hit and new tokens, read side, bytes
  links.json    {"runs": [{mode, link_bytes_per_s, nodes: {node: {role, reads: [[t0, t1, bytes]],
                 writes: [...]}}}]}: every storage-link transfer, seconds from the run's start
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import uuid
from collections.abc import Callable, Mapping

import numpy as np

from dualpath_jax.engines.topology import TopologyConfig, build_topology
from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec
from dualpath_jax.model import config as model_config
from dualpath_jax.model import weights
from dualpath_jax.runtime import cost_profile
from dualpath_jax.runtime.config import MODES, RuntimeConfig
from dualpath_jax.runtime.metrics import attn_balance, decode_inflation, snic_balance
from dualpath_jax.runtime.offline import OfflineRun, run_offline, run_reference
from dualpath_jax.runtime.profile_window import ProfileWindow
from dualpath_jax.runtime.storage_link import link_emulation
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.workload.build import WorkloadReport, build_workload
from dualpath_jax.workload.synthetic import AgentTrajectory

BYTE_KEYS = ("store_read_pe_side", "store_read_de_side", "store_write", "h2d", "d2h", "d2d")


def _resolve_checkpoint(checkpoint: str, preset: str) -> str:
  """'recall' -> the trained recall checkpoint of `preset`; a folder must exist; '' stays."""
  if checkpoint == "recall":
    from dualpath_jax.tasks import trained
    if preset not in trained.TRAIN_COMMANDS:
      raise ValueError(f"model.checkpoint: no recall checkpoint for preset {preset!r} (there are "
                       f"{sorted(trained.TRAIN_COMMANDS)}); use '' for random weights")
    path = trained.checkpoint_dir(preset)
    if not path.is_dir():
      raise ValueError(f"model.checkpoint: no trained {preset} recall checkpoint at {path}; "
                       f"train it with: {trained.TRAIN_COMMANDS[preset]}")
    return str(path)
  if checkpoint and not os.path.isdir(checkpoint):
    raise ValueError(f"model.checkpoint: no checkpoint folder at {checkpoint!r}")
  return checkpoint


def _typed(cls, section: str, values: Mapping):
  """cls(**values) with unknown keys reported by their config path."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"{section}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
  return cls(**values)


def _flag(value, field: str) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{field}: expected True or False, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineJob:
  """Everything one offline experiment needs, validated."""

  workdir: str
  """Output folder."""
  config_dict: dict
  """The config as given (written to config.json)."""
  model_config: model_config.ModelConfig
  """Model geometry and dtype."""
  runtimes: tuple[RuntimeConfig, ...]
  """One runtime per run, in order."""
  run_names: tuple[str, ...]
  """Each run's name: a mode, or a variant (a mode plus switch overrides) of `variants`."""
  cost_model_path: str
  """The PE cost model's JSON ('' = profile at start-up and write WORKDIR/cost_model.json)."""
  snic_window_s: float
  """Sliding window of the storage-link balance metric."""
  store_spec: StoreSpec
  """Where the KV store lives."""
  trajectories: tuple[AgentTrajectory, ...]
  """The workload's trajectories (workload/build.py), cut to the runtime's context limit."""
  workload_report: WorkloadReport
  """What building the workload kept and cut."""
  seed: int
  """Weight seed (random weights when no checkpoint)."""
  checkpoint: str
  """Orbax checkpoint folder, or '' for random weights."""
  warmup: bool
  """Run each mode once untimed first, so that JCT excludes compilation."""
  warmup_agents: int
  """Trajectories of the warm-up pass (the first ones; 0 = all)."""
  warmup_turns: int
  """Turns per trajectory of the warm-up pass (0 = all). Fewer agents and turns make a cheaper
  pass that still compiles the programs of first turns (no hit) and later ones (hits)."""
  thread_sample_hz: float
  """Sample every thread's stack at this rate over each timed run (0 = off): summary.json's
  runs[i].thread_samples (runtime/thread_samples.py)."""
  gc_freeze: bool
  """gc.freeze() when each timed run's clock starts (runtime/gc_pauses.py); its collections are
  in summary.json's runs[i].gc_pauses either way."""
  device_trace: dict
  """{modes, start_s, seconds}: for each run named in modes, a window of its timed part recorded
  by jax.profiler into WORKDIR/device_trace/<run>, summarized in summary.json's
  runs[i].device_trace (runtime/profile_window.py); no modes = off."""
  primed_turns: int
  """Turns of every agent run untimed before the clock starts, into the timed run's own
  namespaces (runtime/offline.py): agents that resume with their early context stored."""
  check_reference: bool
  """Compare every generated token with a no-cache recompute."""

  @classmethod
  def from_config(cls, config, workdir: str) -> "OfflineJob":
    full = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    c = dict(full)
    for edge_only in ("platform", "num_cpu_devices", "matmul_precision", "variant"):
      c.pop(edge_only, None)  # applied by the experiment script before jax starts
    m = dict(c["model"])
    # attention, prefill_kv_splits, paged_attention, pallas_*: how attention is
    # computed, not a property of the weights (model_config.EXECUTION_FIELDS).
    model = model_config.get_preset(m.pop("preset"), dtype=m.pop("dtype"), **{
        key: m.pop(key) for key in model_config.EXECUTION_FIELDS if key in m})
    seed, checkpoint = m.pop("seed", 0), m.pop("checkpoint", "")
    if m:
      raise ValueError(f"model: unknown key(s) {sorted(m)}")
    checkpoint = _resolve_checkpoint(checkpoint, model.name)
    topology = _typed(TopologyConfig, "topology", c["topology"])
    build_topology(topology)  # the device split must fit the devices present, before any run
    if not c["modes"]:
      raise ValueError("modes: at least one mode is needed")
    runtime = dict(c["runtime"])
    cost_model_path = runtime.pop("cost_model", "")
    if runtime.get("scheduler") == "":
      runtime.pop("scheduler")
    variants = dict(c.get("variants") or {})
    runtimes = []
    for name in c["modes"]:
      if name in variants:
        overrides = dict(variants[name])
        if overrides.get("mode") not in MODES:
          raise ValueError(f"variants.{name}.mode: expected one of {MODES}, got "
                           f"{overrides.get('mode')!r}")
      elif name in MODES:
        overrides = dict(mode=name)
      else:
        raise ValueError(f"modes: {name!r} is neither a mode {MODES} nor a variant "
                         f"{sorted(variants)}")
      runtimes.append(_typed(RuntimeConfig, f"variants.{name}" if name in variants else
                             "runtime", dict(runtime, **overrides, topology=topology)))
    runtimes = tuple(runtimes)
    if cost_model_path == "auto":
      cost_model_path = cost_profile.default_path(model.name, model.dtype)
      if not os.path.exists(cost_model_path):
        cost_model_path = ""  # profiled at start-up
    elif cost_model_path:
      cost_profile.load(cost_model_path)  # a bad file is reported before any run
    window = c.get("snic_window_s", 0.5)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
      raise ValueError(f"snic_window_s must be positive, got {window!r}")
    layout = KVLayout.for_model(model)
    trajectories, report = build_workload(
        c["workload"], vocab_size=model.vocab_size, block_tokens=layout.block_tokens,
        max_context_tokens=runtimes[0].max_context_tokens)
    store = dict(c["store"])
    if store.get("driver", "file") == "file" and not store.get("path"):
      store["path"] = os.path.join(workdir, "store")
    counts = {key: c.get(key, 0) for key in ("warmup_agents", "warmup_turns", "primed_turns")}
    for key, value in counts.items():
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative int, got {value!r}")
    hz = c.get("thread_sample_hz", 0.0)
    if isinstance(hz, bool) or not isinstance(hz, (int, float)) or hz < 0:
      raise ValueError(f"thread_sample_hz must be a non-negative number, got {hz!r}")
    trace = dict(c.get("device_trace") or {})
    unknown = sorted(set(trace) - {"modes", "start_s", "seconds"})
    if unknown:
      raise ValueError(f"device_trace: unknown key(s) {unknown}; expected modes, start_s, seconds")
    trace = dict(modes=tuple(trace.get("modes") or ()), start_s=trace.get("start_s", 1.0),
                 seconds=trace.get("seconds", 0.5))
    if set(trace["modes"]) - set(c["modes"]):
      raise ValueError(f"device_trace.modes: {sorted(set(trace['modes']) - set(c['modes']))} "
                       f"are not runs of this job {list(c['modes'])}")
    if trace["modes"]:
      ProfileWindow("", trace["start_s"], trace["seconds"])  # a bad window is reported now
    if runtimes[0].host_buffer_bytes < layout.full_block_bytes:
      raise ValueError(f"runtime.host_buffer_bytes: {runtimes[0].host_buffer_bytes} is smaller "
                       f"than one Full Block ({layout.full_block_bytes} bytes)")
    return cls(workdir=workdir, config_dict=full, model_config=model, runtimes=runtimes,
               run_names=tuple(c["modes"]), cost_model_path=cost_model_path,
               snic_window_s=float(window), store_spec=StoreSpec.from_dict(store),
               trajectories=tuple(trajectories), workload_report=report, seed=seed,
               checkpoint=checkpoint, warmup=bool(c["warmup"]), **counts,
               thread_sample_hz=float(hz), device_trace=trace,
               gc_freeze=_flag(c.get("gc_freeze", False), "gc_freeze"),
               check_reference=bool(c["check_reference"]))

  def _profile_window(self, run_name: str) -> ProfileWindow | None:
    if run_name not in self.device_trace["modes"]:
      return None
    return ProfileWindow(os.path.join(self.workdir, "device_trace", run_name),
                         self.device_trace["start_s"], self.device_trace["seconds"])

  def warmup_trajectories(self) -> list[AgentTrajectory]:
    """The warm-up pass's trajectories: warmup_agents of them, warmup_turns turns each."""
    chosen = list(self.trajectories)[:self.warmup_agents or None]
    if self.warmup_turns:
      chosen = [dataclasses.replace(t, turns=t.turns[:self.warmup_turns]) for t in chosen]
    return chosen

  def start(self, workdir: str, config_dict: Mapping, progress) -> tuple:
    """What every job does first: WORKDIR/config.json, the model, its KV layout, the cost model.
    Returns (model, layout, cost_model)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2)
    model = self.load_model()
    return model, KVLayout.for_model(self.model_config), self.cost_model(model, progress)

  def run(self, progress: Callable[[str], None] | None = None) -> dict:
    model, layout, cost_model = self.start(self.workdir, self.config_dict, progress)
    trajectories = list(self.trajectories)
    reference = None
    if self.check_reference:
      if progress:
        progress("reference: no-cache full recompute of every turn on one device")
      reference = run_reference(model, trajectories, self.runtimes[0].max_context_tokens)
    runs, turn_lines, link_runs = [], [], []
    # Fresh namespaces per invocation: a rerun into the same store starts cold, like the first run.
    run_id = uuid.uuid4().hex[:8]
    with KVBlockStore.open(self.store_spec, layout) as store:
      for name, runtime in zip(self.run_names, self.runtimes):
        if self.warmup:
          warm = self.warmup_trajectories()
          if progress:
            progress(f"[{name}] warm-up pass (untimed, uncapped links, own namespaces; "
                     f"{len(warm)} agents, {sum(len(t.turns) for t in warm)} turns)")
          run_offline(dataclasses.replace(runtime, link_bytes_per_s=None), model, store, layout,
                      warm, cost_model=cost_model, namespace_prefix=f"{run_id}-warmup-{name}-")
        run = run_offline(runtime, model, store, layout, trajectories, cost_model=cost_model,
                          namespace_prefix=f"{run_id}-{name}-", progress=progress, label=name,
                          primed_turns=self.primed_turns,
                          thread_sample_hz=self.thread_sample_hz, precompile=True,
                          device_trace=self._profile_window(name), gc_freeze=self.gc_freeze)
        runs.append(dict(summarize(run, reference, snic_window_s=self.snic_window_s),
                         mode=name, base_mode=runtime.mode, switches=runtime.switches()))
        if run.precompiled is not None:
          runs[-1]["precompiled"] = run.precompiled
        if run.thread_samples is not None:
          runs[-1]["thread_samples"] = run.thread_samples
        if run.device_trace is not None:
          runs[-1]["device_trace"] = run.device_trace
        if run.gc_pauses is not None:
          runs[-1]["gc_pauses"] = run.gc_pauses
        if run.compiles is not None:
          runs[-1]["compiles_in_timed_part"] = run.compiles
        turn_lines += [json.dumps(dict(mode=name, **t)) for t in run.turns]
        link_runs.append(dict(mode=name, link_bytes_per_s=runtime.link_bytes_per_s, nodes={
            str(node): dict(role=self._node_role(runtime, node), reads=run.link_records[node],
                            writes=run.link_write_records[node]) for node in run.link_records}))
    summary = dict(runs=runs, run_id=run_id, model=self.model_config.name, topology=self.runtimes[0].topology.name,
                   link_bytes_per_s=self.runtimes[0].link_bytes_per_s,
                   link_emulation=link_emulation(self.runtimes[0].link_bytes_per_s),
                   warmup_excluded_from_jct=self.warmup,
                   warmup_agents=self.warmup_agents, warmup_turns=self.warmup_turns,
                   primed_turns=self.primed_turns,
                   primed_turns_meaning=("turns of every agent run untimed before the clock "
                                         "starts (their KV stored): JCT and every metric cover "
                                         "the later turns only") if self.primed_turns else None,
                   workload=dataclasses.asdict(self.workload_report), cost_model=cost_model.to_dict(),
                   cost_model_path=self.cost_model_path or os.path.join(self.workdir,
                                                                         "cost_model.json"))
    with open(os.path.join(self.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(self.workdir, "turns.jsonl"), "w") as f:
      f.write("\n".join(turn_lines) + "\n")
    with open(os.path.join(self.workdir, "links.json"), "w") as f:
      json.dump(dict(runs=link_runs), f)
    return summary


  @staticmethod
  def _node_role(runtime: RuntimeConfig, node: int) -> str:
    topo = runtime.topology
    return "prefill" if node < topo.num_prefill_engines // topo.engines_per_node else "decode"

  def load_model(self):
    """The configured checkpoint's weights, or random ones (seed) when there is none."""
    return (weights.restore_weights(self.checkpoint, self.model_config) if self.checkpoint
            else weights.init_random(self.model_config, seed=self.seed))

  def cost_model(self, model, progress) -> CostModel:
    """The configured cost model, or one profiled now on the first PE's device (and saved)."""
    if self.cost_model_path:
      return cost_profile.load(self.cost_model_path)
    import jax  # the profile runs on the device kind the job runs on
    if progress:
      progress("cost model: none for this device kind, model and dtype; profiling PE forwards "
               "now (scripts/profile_prefill.py writes one to reuse)")
    device = jax.devices()[0]
    longest = self.runtimes[0].max_context_tokens
    cost, error, rows = cost_profile.profile(
        jax.device_put(model, device), device, cached=[0, longest // 4, longest // 2],
        new=[64, 256, 512], batches=[1, 2], block_tokens=KVLayout.for_model(
            self.model_config).block_tokens, reps=3, progress=progress)
    cost_profile.save(os.path.join(self.workdir, "cost_model.json"), cost, error, rows,
                      dict(device_kind=device.device_kind, preset=self.model_config.name,
                           dtype=self.model_config.dtype, what="profiled at job start-up"))
    return cost


def _stage_totals(per_engine: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  total: dict[str, float] = {}
  for stages in per_engine.values():
    for stage, seconds in stages.items():
      total[stage] = total.get(stage, 0.0) + seconds
  return total


def summarize(run: OfflineRun, reference: dict | None, *, snic_window_s: float = 0.5) -> dict:
  ttft = [t["times_s"]["first_token"] - t["times_s"]["ready"] for t in run.turns]
  match = None
  if reference is not None and run.mode != "oracle":
    match = all(run.generated[key] == tokens for key, tokens in reference.items())
  steps = run.decode_step_s
  return dict(
      mode=run.mode, jct_s=run.jct_s, turns=len(run.turns),
      tokens_prefilled=sum(t["new_tokens"] for t in run.turns),
      tokens_hit=sum(t["hit_tokens"] for t in run.turns),
      bytes={k: int(run.bytes.get(k, 0)) for k in BYTE_KEYS},
      outputs_match_reference=match,
      outputs_meaningful=run.mode != "oracle",
      ttft_mean_s=statistics.fmean(ttft) if ttft else None,
      ttft_p99_s=float(np.percentile(ttft, 99)) if ttft else None,
      decode_step_median_s=statistics.median(steps) if steps else None,
      decode_inflation=decode_inflation(run.decode_steps, run.kv_moves),
      decode_input_placements=run.decode_input_placements,
      host_buffers=run.host_buffers,
      # Where each engine's thread spent the run (seconds per stage; PE and DE totals first).
      engine_time_s={role: dict(total=_stage_totals(engines), per_engine=engines)
                     for role, engines in run.engine_stage_s.items()},
      max_prefix_layers_on_pe=run.max_prefix_layers_on_pe,
      max_de_staged_bytes=run.max_de_staged_bytes,
      rounded_prefill_batches=run.rounded_prefill_batches,
      read_side_counts={side: sum(t["read_side"] == side for t in run.turns)
                        for side in ("pe", "de", "split", "none")},
      snic_balance=snic_balance(run.link_records, window_s=snic_window_s),
      # Headline: forwards in which the group was loaded (every shard's batch cut by the quota
      # with work left over), the regime of the paper's figure; all forwards alongside.
      attn_balance=dict(
          attn_balance([f for forwards in run.loaded_forwards.values() for f in forwards]),
          regime="loaded forwards: every shard had more ready work than its batch took",
          all_forwards=attn_balance([f for forwards in run.forwards.values() for f in forwards])),
      prefill_forwards=sum(len(f) for f in run.forwards.values()),
      chunked_turns=sum(t["prefill_chunks"] > 1 for t in run.turns),
      cluster=run.describe,
      link_read_bytes={str(node): sum(r[2] for r in records)
                       for node, records in run.link_records.items()})
