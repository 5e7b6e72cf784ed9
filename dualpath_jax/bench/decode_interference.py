"""Decode step-time inflation from the DE's own KV traffic, on one device.

The end-to-end jobs report decode inflation (runtime/metrics.py decode_inflation): the DE's steps
that overlap a KV move against its other steps. There the moves come with everything else the DE
does around them (admissions' page writes, persists' pool reads, other requests' arrivals), so a
large inflation does not say whether the bytes themselves slow the steps. This section leaves all
of that out. It runs the DE's loop (engine.DecodeInputs.de_loop: one step in flight, as the runtime kept up to record 16 (now
runtime.decode_steps_in_flight, default 2), each step
inside its TrafficManager's `model_step()` from dispatch to collection, as DecodeWorker does) at a
fixed batch and context on one device, while a thread keeps one kind of KV traffic going through
a TrafficManager of the same engine, with the runtime's own calls:

  none      no traffic: the baseline
  h2d       host -> device: a DE-read layer part (`h2d_tokens` tokens of one layer, from host
            memory of kind `host_memory`, as the DE's node buffer), `TrafficManager.h2d`, at
            most `in_flight` moves unfinished (the prefill side's LAYERS_IN_FLIGHT rule). This is
            the DE path's first hop and an admission's prompt H2D; the second hop, the D2D onto
            a PE, needs a second device and is not here.
  d2h       device -> host: a finished turn's blocks (`d2h_tokens` tokens of every layer) into
            host memory of kind `host_memory`, `TrafficManager.d2h` (the persist)
  h2d+d2h   both, each on its own thread
  admit     no traffic thread: the DE loop's own work for an arriving and a finishing request,
            every `admit_every` steps (the end-to-end DE at 16 rows and 150-token turns meets
            one of each about every 9 steps), as DecodeWorker does it: before the step's
            dispatch a landed prompt's KV (`admit_tokens` tokens of every layer, already on the
            device: the DE admits only once the H2D has landed, and that copy is the 'h2d'
            kind's) written into free pages (paged.write_kv_to_pages, DecodeWorker._admit);
            after it a finishing turn's `d2h_tokens` tokens read from its pages right behind the
            step (paged.read_kv_from_pages, _read_persisted_pages) and moved D2H into host
            memory on a persister thread (TrafficManager.d2h, _write_back). Its rows add the
            median period of the steps that followed an admission ('admission steps').

The traffic runs back to back for the whole window: the link's worst case, more than a DE
behind a capped storage link ever moves. Each kind runs under each TrafficConfig of `gates`
((chunk_bytes, max_kv_wait_s): 0 s = the priority gate off, the GPU end-to-end preset; > 0 =
pieces of chunk_bytes, each issued only once the steps running when it came have ended).
Conditions are interleaved, `rounds` rounds of every condition with 'none' first in each round,
so that the card's drift falls on all of them alike. A step's period is the DE's step record
(DecodeWorker.step_records): from the previous step's collection to its own. Per condition:
median, mean and p90 period over every round, inflation = median / the 'none' median - 1 (and
the same of means), GB/s the traffic moved while the steps ran and, right after each window,
for as long with no step running ('alone'), and the TrafficManager's seconds of KV waiting.
Moved bytes are checked outside the clock: the first and last H2D of each window against its
source, the D2H's landing array against the device's, and the 'admit' pages against the prompt.

On an H200 (docs/perf/gpu_bench.md record 11) the traffic cost the steps at most +3%, an H2D
onto the decoding GPU waited for the step in flight, and the admission's page write cost the
steps behind it +45% until its scatter was told its page ids are unique.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from dualpath_jax.bench import verify
from dualpath_jax.bench.engine import DecodeInputs
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model import paged
from dualpath_jax.transfer import pinned_memory

KINDS = ("none", "h2d", "d2h", "h2d+d2h", "admit")
"""Traffic kinds, as in the module doc."""


@dataclasses.dataclass
class _Stream:
  """One thread's back-to-back moves of one direction, until `stop` is set."""

  direction: str  # 'h2d' or 'd2h'
  move: Callable[[int], object]  # issues move i; returns what landing waits on (or the host copy)
  move_bytes: int
  in_flight: int
  stop: threading.Event
  moved: int = 0  # bytes whose move has landed
  issued: int = 0
  error: BaseException | None = None
  first: object = None  # the first and last landed results, checked outside the clock
  last: object = None

  def run(self) -> None:
    pending: list = []
    try:
      while not self.stop.is_set():
        if len(pending) >= self.in_flight:
          self._land(pending.pop(0))
        pending.append(self.move(self.issued))
        self.issued += 1
      for x in pending:
        self._land(x)
    except BaseException as e:  # noqa: BLE001  (reported by the caller)
      self.error = e

  def _land(self, x) -> None:
    jax.block_until_ready(x)
    self.moved += self.move_bytes
    if self.first is None:
      self.first = x
    else:
      self.last = x


def _periods(inputs: DecodeInputs, model, steps: int, tm,
             before_dispatch: Callable[[int], None] = lambda step: None,
             after_collect: Callable[[], None] = lambda: None) -> list[float]:
  """`steps` steps of the DE's loop with each step inside tm.model_step() from its dispatch to
  its collection; returns the period of every step but the first (from the previous step's
  collection to its own: periods[i] is step i + 1's). before_dispatch(step index) runs before
  each dispatch, after_collect after each collection (the 'admit' kind's work)."""
  gates: list[contextlib.ExitStack] = []
  dispatched = [0]

  def step_gate():
    before_dispatch(dispatched[0])
    dispatched[0] += 1
    gate = contextlib.ExitStack()
    gate.enter_context(tm.model_step())
    gates.append(gate)

  def collected():
    gates.pop(0).close()
    times.append(time.perf_counter())
    after_collect()

  times: list[float] = []
  try:
    inputs.de_loop(model, steps, before_dispatch=step_gate, after_collect=collected)
  finally:
    for gate in gates:
      gate.close()
  return list(np.diff(times))


class _Admissions:
  """The 'admit' kind's work in the DE's loop (module doc): every `every` steps, a landed
  prompt's KV written into spare pages before the dispatch, and a finishing turn's pages read
  right behind the step and moved D2H on a persister thread."""

  def __init__(self, inputs: DecodeInputs, tm, landed: jax.Array, persist_pages: np.ndarray,
               persist_tokens: int, landing: np.ndarray, every: int, admit_pages: int):
    self.inputs, self.tm, self.landed, self.landing = inputs, tm, landed, landing
    self.persist_pages, self.persist_tokens, self.every = persist_pages, persist_tokens, every
    self.admit_page_ids = inputs.spare_page_ids[:admit_pages]
    self.admitted_steps: list[int] = []
    self.unread = 0  # admissions whose turn-end read is not issued yet
    self.persister = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="persist")
    self.persists: list[concurrent.futures.Future] = []

  def before_dispatch(self, step: int) -> None:
    if step % self.every == self.every - 1:  # (step 0's period is not measured)
      self.inputs.pool = paged.write_kv_to_pages(self.inputs.pool, self.landed,
                                                 self.admit_page_ids)
      self.admitted_steps.append(step)
      self.unread += 1

  def after_collect(self) -> None:
    if self.unread:  # a finishing turn's pages, read behind the step in flight
      self.unread -= 1
      read = paged.read_kv_from_pages(self.inputs.pool, self.persist_pages, self.persist_tokens)
      self.persists.append(self.persister.submit(self.tm.d2h, read, out=self.landing))

  def finish(self) -> dict:
    for future in self.persists:
      future.result()
    self.persister.shutdown()
    steps = self.admitted_steps
    # Outside the clock: the page write and the page read moved the right bytes.
    written = paged.read_kv_from_pages(self.inputs.pool, self.admit_page_ids,
                                       self.landed.shape[1])
    # (compared on the device: a D2H here would slow the next window's H2Ds, bench/verify.py)
    if written.shape != self.landed.shape or not verify.device_bytes_equal(
        [written], verify.expected_bytes(self.landed, written)):
      raise RuntimeError("admit: the pages written differ from the landed KV")
    if self.persists:
      read = paged.read_kv_from_pages(self.inputs.pool, self.persist_pages, self.persist_tokens)
      if read.shape != self.landing.shape or not verify.device_bytes_equal(
          [read], verify.expected_bytes(self.landing, read)):
        raise RuntimeError("admit: the persisted pages differ from the pool's")
    return dict(admissions=len(steps), persists=len(self.persists),
                admit_step_indices=[s - 1 for s in steps])  # their periods' indices


def _random_kv(rng: np.random.Generator, shape, dtype: np.dtype) -> np.ndarray:
  """Random finite values of any float dtype of 2 or 4 bytes: every 16-bit word below 2**14.
  Every byte drawn (hardware.random_normal_bits repeats a 16 MiB tile, so two 32 MiB layers
  would be equal and a move of the wrong layer would pass the checks), with no float64
  temporary (a GB-sized standard_normal draw would take eight times its bytes)."""
  words = int(np.prod(shape)) * dtype.itemsize // 2
  return rng.integers(0, 1 << 14, words, np.uint16).view(dtype).reshape(shape)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _stats(periods: Sequence[float]) -> dict:
  p = np.asarray(periods)
  return dict(steps=int(p.size), median_s=float(np.median(p)), mean_s=float(p.mean()),
              p90_s=float(np.percentile(p, 90)), max_s=float(p.max()))


def measure_decode_interference(
    device: jax.Device, *, model_config, shapes: Sequence[tuple[int, int]], page_tokens: int,
    steps: int, rounds: int, kinds: Sequence[str] = KINDS,
    gates: Sequence[tuple[int, float]] = ((32 << 20, 0.0),), h2d_tokens: int, d2h_tokens: int,
    in_flight: int = 3, admit_every: int = 10, admit_tokens: int = 16384,
    host_memory: str = "numpy", h2d_staging: str = "auto",
    d2h_staging: str = "direct", target_inflation: float = 0.05, seed: int = 0,
    log: Callable[[str], None] = print, out_of_time: Callable[[], bool] = lambda: False,
    on_update: Callable[[dict], None] | None = None) -> dict:
  """Decode step periods per (batch, context) of `shapes` and traffic condition; see the
  module doc. gates: (chunk_bytes, max_kv_wait_s) TrafficConfigs the traffic kinds run under."""
  from dualpath_jax.engines.topology import single_engine
  from dualpath_jax.model import weights
  from dualpath_jax.runtime.traffic import TrafficConfig, TrafficManager

  kinds = tuple(kinds)
  if not kinds or set(kinds) - set(KINDS) or "none" not in kinds:
    raise ValueError(f"decode_interference.kinds: expected 'none' and some of {KINDS}, got "
                     f"{kinds}")
  for name, value in (("steps", steps), ("rounds", rounds), ("in_flight", in_flight),
                      ("h2d_tokens", h2d_tokens), ("d2h_tokens", d2h_tokens),
                      ("page_tokens", page_tokens), ("admit_every", admit_every),
                      ("admit_tokens", admit_tokens)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"decode_interference.{name}: expected a positive int, got {value!r}")
  if steps < 2:
    raise ValueError(f"decode_interference.steps: expected at least 2, got {steps}")
  shapes = [tuple(s) for s in shapes]
  for shape in shapes:
    if len(shape) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape):
      raise ValueError(f"decode_interference.shapes: expected (batch, context) pairs of "
                       f"positive ints, got {shape!r}")
  try:
    configs = [TrafficConfig(chunk_bytes=int(c), max_kv_wait_s=float(w), h2d_staging=h2d_staging,
                             d2h_staging=d2h_staging) for c, w in gates]
  except (TypeError, ValueError) as e:
    raise ValueError(f"decode_interference.gates: expected (chunk_bytes, max_kv_wait_s) pairs; "
                     f"{e}") from None
  if not configs:
    raise ValueError("decode_interference.gates: expected at least one (chunk_bytes, "
                     "max_kv_wait_s) pair")
  if host_memory not in pinned_memory.HOST_MEMORY_KINDS:
    raise ValueError(f"decode_interference.host_memory: expected one of "
                     f"{list(pinned_memory.HOST_MEMORY_KINDS)}, got {host_memory!r}")

  layout = KVLayout.for_model(model_config)
  engine = single_engine(device, role="decode")
  conditions = [("none", None)] + [(kind, i) for i in range(len(configs))
                                   for kind in kinds if kind != "none"]

  def condition_name(kind, gate):
    if gate is None:
      return kind
    c = configs[gate].max_kv_wait_s
    return (f"{kind}, gate {'off' if c == 0 else f'{c:g} s'}, "
            f"{configs[gate].chunk_bytes / 2**20:g} MiB")

  result = dict(
      device=str(device), model=dict(preset=model_config.name, dtype=model_config.dtype,
                                     paged_attention=model_config.paged_attention,
                                     pallas_kernel=model_config.pallas_kernel),
      page_tokens=page_tokens, steps=steps, rounds=rounds, in_flight=in_flight,
      host_memory=host_memory, h2d_staging=h2d_staging, d2h_staging=d2h_staging,
      h2d_move_bytes=h2d_tokens * layout.token_layer_bytes,
      d2h_move_bytes=d2h_tokens * layout.kv_bytes_per_token, h2d_tokens=h2d_tokens,
      d2h_tokens=d2h_tokens, admit_every=admit_every, admit_tokens=admit_tokens,
      gates=[dict(chunk_bytes=c.chunk_bytes, max_kv_wait_s=c.max_kv_wait_s) for c in configs],
      target_inflation=target_inflation,
      note=("one device: the DE's loop with KV traffic of one kind kept going back to back "
            "through a TrafficManager of the same engine (the link's worst case); the D2D "
            "onto a PE, admissions' page writes and persists' pool reads are not in it. "
            "inflation = median step period / the 'none' median - 1"),
      rows=[])

  def update():
    if on_update:
      on_update(result)

  # Host memory of the node buffer's kind: a DE-read layer part of every layer, and the persist's
  # landing array (both reused by every move, as the node buffer's blocks are).
  h2d_shape = (layout.num_layers, h2d_tokens, *layout.token_kv_shape)
  d2h_shape = (layout.num_layers, d2h_tokens, *layout.token_kv_shape)

  rng = np.random.default_rng(seed)

  def host_array(shape, fill: bool):
    nbytes = int(np.prod(shape)) * layout.np_dtype.itemsize
    array = pinned_memory.allocate(nbytes, host_memory, device)
    if fill:
      array.view(layout.np_dtype)[...] = _random_kv(rng, (nbytes // layout.np_dtype.itemsize,),
                                                    layout.np_dtype)
    return array.view(layout.np_dtype).reshape(shape)

  source = host_array(h2d_shape, fill=True)
  landing = host_array(d2h_shape, fill=False)
  with jax.default_device(device):
    model = weights.init_random(model_config, seed=seed)
  persisted_host = _random_kv(rng, d2h_shape, layout.np_dtype)
  persisted = jax.device_put(persisted_host, engine.replicated_sharding)
  # The 'admit' kind's landed prompt KV and the pages it is written into / a turn is read from.
  admit_pages = -(-admit_tokens // page_tokens)
  persist_pages = np.arange(1, 1 + -(-d2h_tokens // page_tokens), dtype=np.int32)  # row 0's
  landed = (jax.device_put(_random_kv(rng, (layout.num_layers, admit_tokens,
                                             *layout.token_kv_shape), layout.np_dtype),
                           engine.replicated_sharding) if "admit" in kinds else None)
  log(f"decode_interference: {model_config.name} {model_config.dtype} "
      f"({model_config.paged_attention}, kernel {model_config.pallas_kernel}) on {device}; "
      f"h2d moves of {result['h2d_move_bytes'] / 2**20:.0f} MiB ({host_memory}), d2h moves of "
      f"{result['d2h_move_bytes'] / 2**20:.0f} MiB, at most {in_flight} unfinished")

  def run_condition(inputs, kind, gate, alone_s: float | None = None) -> dict:
    """One window of `steps` decode steps under the condition's traffic; with `alone_s`, the
    traffic alone for that many seconds instead (no step runs)."""
    tm = TrafficManager(engine, config=configs[gate if gate is not None else 0])
    stop = threading.Event()
    streams = []
    if "h2d" in kind:
      streams.append(_Stream("h2d", lambda i: tm.h2d(source[i % layout.num_layers]),
                             result["h2d_move_bytes"], in_flight, stop))
    if "d2h" in kind:
      streams.append(_Stream("d2h", lambda i: tm.d2h(persisted, out=landing),
                             result["d2h_move_bytes"], 1, stop))
    admit = _Admissions(inputs, tm, landed, persist_pages, d2h_tokens, landing, admit_every,
                        admit_pages) if kind == "admit" and alone_s is None else None
    threads = [threading.Thread(target=s.run, name=f"traffic-{s.direction}", daemon=True)
               for s in streams]
    for t in threads:
      t.start()
    time.sleep(0.05 if streams else 0.0)  # the traffic is under way when the first step goes
    moved0 = [s.moved for s in streams]
    t0 = time.perf_counter()
    if admit is not None:
      periods = _periods(inputs, model, steps, tm, admit.before_dispatch, admit.after_collect)
    elif alone_s is None:
      periods = _periods(inputs, model, steps, tm)
    else:
      periods = []
      time.sleep(alone_s)
    seconds = time.perf_counter() - t0
    moved = [s.moved - m for s, m in zip(streams, moved0)]
    stop.set()
    for t in threads:
      t.join()
    out = dict(periods=periods, seconds=seconds, kv_wait_s=tm.kv_wait_s)
    if admit is not None:
      out.update(admit.finish())  # waits for the persists, checks the pages outside the clock
    for s, m in zip(streams, moved):
      if s.error is not None:
        raise RuntimeError(f"{s.direction} traffic failed: {s.error!r}") from s.error
      out[f"{s.direction}_bytes"] = m
      out[f"{s.direction}_moves"] = s.issued
      # Outside the clock: what landed is what was sent.
      if s.direction == "h2d":
        for i, x in ((0, s.first), (s.issued - 1, s.last)):
          want = source[i % layout.num_layers]
          if x is not None and (x.shape != want.shape or not verify.device_bytes_equal(
              [x], verify.expected_bytes(want, x))):  # on the device (bench/verify.py)
            raise RuntimeError(f"h2d traffic: move {i} landed different bytes")
      elif not _same_bytes(landing, persisted_host):
        raise RuntimeError("d2h traffic: the landing array differs from the device's")
    return out

  for batch, context in shapes:
    if out_of_time():
      log(f"decode_interference: out of time budget, batch {batch} ctx {context} skipped")
      result["rows"].append(dict(batch=batch, context=context, skipped="time budget"))
      update()
      continue
    inputs = DecodeInputs(model_config, batch, context, page_tokens, seed,
                          spare_pages=admit_pages if "admit" in kinds else 0)
    try:
      # Compiles the step and the moves (their cuts and joins) before any clock.
      for kind, gate in conditions:
        run_condition(inputs, kind, gate)
      by_condition: dict[str, dict] = {condition_name(k, g): dict(
          kind=k, gate=g, periods=[], seconds=0.0, kv_wait_s=0.0) for k, g in conditions}
      for _ in range(rounds):
        for kind, gate in conditions:
          got = run_condition(inputs, kind, gate)
          acc = by_condition[condition_name(kind, gate)]
          first = len(acc["periods"])
          acc["periods"] += got.pop("periods")
          window_s = got.pop("seconds")
          acc["seconds"] += window_s
          acc["kv_wait_s"] += got.pop("kv_wait_s")
          for key, value in got.items():  # bytes and moves of each direction; admissions
            if key == "admit_step_indices":
              value = [first + i for i in value]  # into the condition's periods
            acc[key] = acc[key] + value if key in acc else value
          if kind not in ("none", "admit"):  # the same traffic for as long, no step running
            alone = run_condition(inputs, kind, gate, alone_s=window_s)
            acc["alone_seconds"] = acc.get("alone_seconds", 0.0) + alone["seconds"]
            for direction in ("h2d", "d2h"):
              if f"{direction}_bytes" in alone:
                key = f"{direction}_alone_bytes"
                acc[key] = acc.get(key, 0) + alone[f"{direction}_bytes"]
      base = _stats(by_condition["none"]["periods"])
      conditions_out = []
      for name, acc in by_condition.items():
        periods = acc.pop("periods")
        stats = _stats(periods)
        if "admit_step_indices" in acc:  # the periods of the steps behind an admission
          admitted = _stats([periods[i] for i in acc.pop("admit_step_indices")])
          acc.update(admission_steps=admitted,
                     admission_step_inflation=admitted["median_s"] / base["median_s"] - 1.0)
        gate = acc.pop("gate")
        row = dict(condition=name, **acc, **stats,
                   **(dataclasses.asdict(configs[gate]) if gate is not None else {}),
                   inflation=stats["median_s"] / base["median_s"] - 1.0,
                   mean_inflation=stats["mean_s"] / base["mean_s"] - 1.0)
        for direction in ("h2d", "d2h"):
          if f"{direction}_bytes" in row:  # while the timed steps ran, every round together
            row[f"{direction}_gbps"] = row[f"{direction}_bytes"] / row["seconds"] / 1e9
            row[f"{direction}_alone_gbps"] = (row[f"{direction}_alone_bytes"]
                                              / row["alone_seconds"] / 1e9)
        if name != "none":
          row["met"] = bool(row["inflation"] <= target_inflation)
        conditions_out.append(row)
        log(f"decode_interference: batch {batch} ctx {context} {name:28s} "
            f"median {stats['median_s'] * 1e3:7.3f} ms (mean {stats['mean_s'] * 1e3:.3f}, "
            f"p90 {stats['p90_s'] * 1e3:.3f}) {row['inflation']:+.1%}"
            + "".join(f", {d} {row[f'{d}_gbps']:.1f} GB/s (alone "
                      f"{row[f'{d}_alone_gbps']:.1f})" for d in ("h2d", "d2h")
                      if f"{d}_gbps" in row))
      result["rows"].append(dict(batch=batch, context=context, conditions=conditions_out))
    except Exception as e:  # noqa: BLE001  (a failed shape is reported; the next one runs)
      result["rows"].append(dict(batch=batch, context=context, error=repr(e)))
      log(f"decode_interference: batch {batch} ctx {context} FAILED: {e!r}")
    finally:
      inputs.delete()
    update()
  return result
