r"""The DE's host work per decode step, alone and beside a thread that holds the GIL or copies KV.

Record 7's profiled window (1P1D dualpath, 2x H200, docs/perf/gpu_bench.md) had the DE's thread
spend ~10 ms a step inside the decode program's dispatch call (XLA's Execute 4.5 ms of it,
~870 kernels a step), against ~7.5 ms of device time; end to end (record 15) the DE's steps that
overlap KV moves are 60-70% longer than those that do not, while the decode_interference
section moves the same bytes beside the DE's loop at +0.5-3% (record 11). Its traffic threads
sit in C calls; a job's other threads (the PE's, its sender, the links', the copy threads) also
run Python, and a thread that wants the GIL back after a C call waits until the holder releases
it: at its next C call or after sys.getswitchinterval() (5 ms by default).

This runs the DE's loop (bench/engine.DecodeInputs.de_loop: each step's tokens the last one's
output on the device; `in_flight` steps dispatched ahead of the one whose tokens are read, as
runtime.decode_steps_in_flight) on one device with the GPU end-to-end preset's model (random
weights, our Pallas kernel) and measures per step:

  period_s    wall between two steps' token reads (what the runtime's step records hold)
  dispatch_s  host seconds inside the decode program's dispatch call (XLA launches the
              step's kernels, then the thread takes the GIL back)
  wait_s      host seconds reading the step's tokens (the device, then the GIL)

at each depth, under each contender (its inflation: against the same depth with none):

  none          no other thread
  python:<us>   a thread running Python bytecode for <us> microseconds, then one call that
                releases the GIL (time.sleep(0)), over and over; at each GIL switch interval
  h2d, d2d      a thread moving 32 MiB pieces onto the device from page-locked host memory, or
                off it to a second device, 3 in flight, in C calls (--copy_contenders): does
                the dispatch wait for the copies rather than for the GIL?

Conditions are interleaved over `rounds`. Run once per XLA_FLAGS setting to compare (the JSON
records XLA_FLAGS), e.g. command buffers off: XLA_FLAGS=--xla_gpu_enable_command_buffer=

  python scripts/bench_decode_host.py --out=/tmp/decode_host.json                  # GPU defaults
  python scripts/bench_decode_host.py --preset=tiny --dtype=float32 --paged_attention=gather \
      --shapes=4x256 --steps=20 --out=/tmp/decode_host.json                        # CPU
"""

import json
import os
import statistics
import sys
import threading
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PRESET = flags.DEFINE_string("preset", "qwen2.5-7b", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Model and KV dtype.")
_PAGED = flags.DEFINE_string("paged_attention", "pallas", "ModelConfig.paged_attention.")
_SHAPES = flags.DEFINE_list("shapes", ["16x32768", "32x8192"],
                            "Decode batches as BATCHxCONTEXT (the end-to-end job: 16 agents at "
                            "16K-64K contexts).")
_CHUNKS = flags.DEFINE_list("chunks_us", ["0", "100", "1000", "100000"],
                            "Contenders: microseconds of Python between the contender's "
                            "GIL-releasing calls (0: no contender; longer than the switch "
                            "interval: the interpreter's switch decides).")
_COPIES = flags.DEFINE_list("copy_contenders", [],
                            "More contenders, each at the first switch interval: 'h2d' (a "
                            "thread moving 32 MiB pieces from page-locked host memory onto the "
                            "device, 3 in flight: the DE path's first hop, the admissions), "
                            "'d2d' (32 MiB pieces from the device to a second one, 3 in "
                            "flight: the DE path's second hop). These threads sit in C calls.")
_SWITCH = flags.DEFINE_list("switch_intervals_s", ["0.005", "0.0005"],
                            "sys.setswitchinterval values (Python's default is 0.005).")
_IN_FLIGHT = flags.DEFINE_list("in_flight", ["1", "2"],
                               "Steps dispatched ahead of the one read (the runtime's "
                               "decode_steps_in_flight).")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps a condition and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds over the conditions (interleaved).")
_PAGE_TOKENS = flags.DEFINE_integer("page_tokens", 64, "Tokens a KV page.")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and KV seed.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.", required=True)


def _numbers(flag: str, values, kind, minimum) -> list:
  try:
    out = [kind(v) for v in values]
  except ValueError:
    out = []
  if not out or min(out) < minimum:
    sys.exit(f"error: --{flag}: expected numbers >= {minimum}, got {','.join(values)}")
  return out


def _shapes(values) -> list[tuple[int, int]]:
  out = []
  for value in values:
    try:
      batch, context = (int(v) for v in value.lower().split("x"))
    except ValueError:
      batch = context = 0
    if batch <= 0 or context <= 0:
      sys.exit(f"error: --shapes: expected BATCHxCONTEXT of positive integers, got {value!r}")
    out.append((batch, context))
  return out


class Contender(threading.Thread):
  """Runs `work` over and over until stopped, counting the rounds."""

  def __init__(self, work):
    super().__init__(name="contender", daemon=True)
    self.work = work
    self.stopping = threading.Event()
    self.rounds = 0

  def run(self) -> None:
    while not self.stopping.is_set():
      self.work()
      self.rounds += 1


def python_work(chunk_s: float):
  """Python bytecode for chunk_s, then time.sleep(0) (releases the GIL)."""
  def work():
    clock, x = time.perf_counter, 0
    end = clock() + chunk_s
    while clock() < end:
      for i in range(50):
        x += i * i
    time.sleep(0)
  return work


def copy_work(kind: str, device, piece_bytes: int = 32 << 20, in_flight: int = 3):
  """A KV-sized copy onto (h2d, from page-locked host memory) or off (d2d, to a second device)
  `device`, at most `in_flight` unfinished."""
  import collections

  import jax
  import numpy as np

  from dualpath_jax.transfer import pinned_memory
  if kind == "h2d":
    source = pinned_memory.allocate(piece_bytes, "cuda_registered" if device.platform == "gpu"
                                    else "numpy", device)
    source[:] = 1
    move = lambda: jax.device_put(source, device)  # noqa: E731
  elif kind == "d2d":
    others = [d for d in jax.devices() if d != device]
    if not others:
      raise ValueError("copy_contenders: 'd2d' needs a second device")
    source = jax.device_put(np.ones(piece_bytes, np.uint8), device)
    move = lambda: jax.device_put(source, others[0])  # noqa: E731
  else:
    raise ValueError(f"copy_contenders: expected 'h2d' or 'd2d', got {kind!r}")
  pending = collections.deque()

  def work():
    pending.append(move())
    if len(pending) > in_flight:
      pending.popleft().block_until_ready()
  return work


def summarize(records) -> dict:
  period, dispatch, wait = ([r[i] for r in records] for i in range(3))
  return dict(steps=len(records), period_median_s=statistics.median(period),
              period_mean_s=statistics.fmean(period), period_p90_s=sorted(period)[
                  int(0.9 * (len(period) - 1))],
              dispatch_median_s=statistics.median(dispatch),
              dispatch_mean_s=statistics.fmean(dispatch), wait_median_s=statistics.median(wait),
              wait_mean_s=statistics.fmean(wait))


def measure(device, config, batch: int, context: int, chunks_us, copies, switch_intervals,
            in_flight, steps: int, rounds: int, page_tokens: int, seed: int, log=print
            ) -> list[dict]:
  import jax

  from dualpath_jax.bench.engine import DecodeInputs
  from dualpath_jax.model import weights
  with jax.default_device(device):
    model = jax.device_put(weights.init_random(config, seed=seed), device)
    inputs = DecodeInputs(config, batch, context, page_tokens, seed)
  works = {f"python:{c}": python_work(c * 1e-6) for c in chunks_us if c}
  works.update({kind: copy_work(kind, device) for kind in copies})
  try:
    inputs.de_loop(model, 3)  # compiles and warms
    for work in works.values():  # the copies' first calls compile too
      work()
    conditions = [(name, s, d) for d in in_flight for name in ("none", *works)
                  for s in (switch_intervals if name.startswith("python") else
                            switch_intervals[:1])]
    records = {condition: [] for condition in conditions}
    contended = {condition: 0 for condition in conditions}
    interval = sys.getswitchinterval()
    for _ in range(rounds):
      for name, switch, depth in conditions:
        sys.setswitchinterval(switch)
        contender = Contender(works[name]) if name != "none" else None
        try:
          if contender:
            contender.start()
            time.sleep(0.01)
          # the first read starts the clock: steps + 1 reads after a dispatch
          inputs.de_loop(model, steps + depth + 1, in_flight=depth,
                         timings=records[name, switch, depth])
        finally:
          if contender:
            contender.stopping.set()
            contender.join()
            contended[name, switch, depth] += contender.rounds
          sys.setswitchinterval(interval)
  finally:
    inputs.delete()
  rows = []
  for (name, switch, depth), recs in records.items():
    base = summarize(records["none", switch_intervals[0], depth])
    row = dict(batch=batch, context=context, in_flight=depth, contender=name,
               contender_chunk_us=int(name.split(":")[1]) if name.startswith("python") else 0,
               switch_interval_s=switch, contender_rounds=contended[name, switch, depth],
               **summarize(recs))
    # against the same depth without a contender
    row["period_inflation"] = row["period_median_s"] / base["period_median_s"] - 1
    row["period_mean_inflation"] = row["period_mean_s"] / base["period_mean_s"] - 1
    rows.append(row)
    log(f"decode_host: batch {batch} ctx {context} in flight {depth} {name:>12} "
        f"switch {switch * 1e3:.2f} ms: period {row['period_median_s'] * 1e3:7.3f} ms "
        f"(mean {row['period_mean_s'] * 1e3:7.3f}, {row['period_inflation'] * 100:+6.1f}%), "
        f"dispatch {row['dispatch_median_s'] * 1e3:6.3f} ms, wait "
        f"{row['wait_median_s'] * 1e3:6.3f} ms")
  return rows


def main(argv):
  del argv
  import jax

  from dualpath_jax.bench.hardware import run_meta
  from dualpath_jax.model.config import get_preset
  shapes = _shapes(_SHAPES.value)
  chunks = _numbers("chunks_us", _CHUNKS.value, int, 0)
  switches = _numbers("switch_intervals_s", _SWITCH.value, float, 1e-6)
  depths = _numbers("in_flight", _IN_FLIGHT.value, int, 1)
  if set(_COPIES.value) - {"h2d", "d2d"}:
    sys.exit(f"error: --copy_contenders: expected some of h2d, d2d, got "
             f"{','.join(_COPIES.value)}")
  if chunks[0] != 0:
    sys.exit(f"error: --chunks_us: the first must be 0 (no contender: the baseline), got "
             f"{','.join(_CHUNKS.value)}")
  for name, flag in (("steps", _STEPS), ("rounds", _ROUNDS), ("page_tokens", _PAGE_TOKENS)):
    if flag.value <= 0:
      sys.exit(f"error: --{name}: expected a positive integer, got {flag.value}")
  try:
    config = get_preset(_PRESET.value, dtype=_DTYPE.value, paged_attention=_PAGED.value)
  except (TypeError, ValueError) as e:
    sys.exit(f"error: --preset/--dtype/--paged_attention: {e}")
  device = jax.devices()[0]
  if "d2d" in _COPIES.value and len(jax.devices()) < 2:
    sys.exit(f"error: --copy_contenders: 'd2d' needs a second device; {len(jax.devices())} "
             f"present")
  result = dict(
      meta=dict(run_meta(device), preset=config.name, dtype=config.dtype,
                paged_attention=config.paged_attention, steps=_STEPS.value,
                rounds=_ROUNDS.value, cpu_count=os.cpu_count(),
                note="per step of the DE's loop (in_flight steps dispatched ahead of the one "
                     "read): period = wall between "
                     "token reads, dispatch = host seconds inside the decode program's call, "
                     "wait = host seconds reading the tokens; contender: a thread running "
                     "Python for chunk_us between GIL-releasing calls (python:<us>) or "
                     "moving 32 MiB pieces onto (h2d) or off (d2d) the device"),
      rows=[])
  for batch, context in shapes:
    result["rows"] += measure(device, config, batch, context, chunks, _COPIES.value, switches,
                              depths, _STEPS.value, _ROUNDS.value, _PAGE_TOKENS.value,
                              _SEED.value)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
