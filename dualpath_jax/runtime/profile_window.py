"""A window of a timed run recorded by jax.profiler: device streams and host threads on one clock.

The thread samples (runtime/thread_samples.py) say where the Python threads wait, not what the
devices do meanwhile. This records `seconds` of the run from `start_s` after its clock starts:
the GPUs' kernels and copies per stream (CUPTI), XLA's host-side work, and the runtime's own
spans (PrefillShard stages and sends, DecodeWorker steps: `span` below). The Python tracer is off:
it records every Python call and would slow the run it measures. The trace lands as
LOG_DIR/plugins/profile/<time>/perfetto_trace.json.gz (open it in ui.perfetto.dev, or summarize it
with analysis/device_trace.py); `end()` returns its summary.

Known hazard on GPUs: after stop_trace, CUPTI's teardown can leave the CUDA context broken (jax
issue 40260: CUDA_ERROR_LAUNCH_FAILED at the next synchronisation). On 2x H200 (record 7 of
docs/perf/gpu_bench.md) one of two traced runs failed that way 3 s after its window, the trace
already written; the other completed. Trace one mode in a process of its own
(--config.end_to_end.modes="('dualpath',)"), as the bench calls there did.
"""

from __future__ import annotations

import glob
import os
import threading

import jax

_active = threading.Event()  # set while a window records: spans cost nothing otherwise


def span(name: str):
  """A named span on the calling thread in a recording window (jax.profiler.TraceAnnotation);
  outside one, a no-op context."""
  if _active.is_set():
    return jax.profiler.TraceAnnotation(name)
  return _NULL


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


_NULL = _Null()


def trace_options() -> "jax.profiler.ProfileOptions":
  """Device streams, XLA's host-side launches and copies, our spans; no Python tracer."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  options.host_tracer_level = 1  # TraceMe level 1: XLA's launches, copies and our spans
  return options


def latest_trace(log_dir: str) -> str | None:
  """The newest perfetto_trace.json.gz jax.profiler wrote under log_dir, or None."""
  paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*",
                                        "perfetto_trace.json.gz")))
  return paths[-1] if paths else None


class ProfileWindow:
  """Records jax.profiler's trace from start_s to start_s + seconds after begin()."""

  def __init__(self, log_dir: str, start_s: float, seconds: float):
    for field, value, low in (("start_s", start_s, "a number >= 0"), ("seconds", seconds,
                                                                       "a positive number")):
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not number or not (value >= 0 if field == "start_s" else value > 0):
        raise ValueError(f"device_trace.{field}: expected {low}, got {value!r}")
    self.log_dir, self.start_s, self.seconds = log_dir, float(start_s), float(seconds)
    self._lock = threading.Lock()
    self._state = "idle"  # idle -> waiting -> recording -> done
    self._timers: list[threading.Timer] = []
    self.error = ""

  def begin(self) -> None:
    """Arms the window: the clock of the run it records starts now."""
    self._state = "waiting"
    for delay, fn in ((self.start_s, self._start), (self.start_s + self.seconds, self._stop)):
      timer = threading.Timer(delay, fn)
      timer.daemon = True
      timer.start()
      self._timers.append(timer)

  def _start(self) -> None:
    with self._lock:
      if self._state != "waiting":
        return
      try:
        os.makedirs(self.log_dir, exist_ok=True)
        jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True,
                                 profiler_options=trace_options())
      except Exception as e:  # noqa: BLE001  (a failed trace must not fail the run)
        self.error = f"start_trace: {e!r}"
        self._state = "done"
        return
      self._state = "recording"
      _active.set()

  def _stop(self) -> None:
    with self._lock:
      if self._state != "recording":
        self._state = "done"
        return
      _active.clear()
      try:
        jax.profiler.stop_trace()
      except Exception as e:  # noqa: BLE001
        self.error = f"stop_trace: {e!r}"
      self._state = "done"

  def end(self) -> dict:
    """Stops a window still recording (the run ended first) and summarizes the trace:
    {path, start_s, seconds, summary} (analysis/device_trace.summarize), or {error}."""
    for timer in self._timers:
      timer.cancel()
    self._stop()
    out = dict(start_s=self.start_s, seconds=self.seconds)
    path = latest_trace(self.log_dir)
    if self.error or not path:
      out["error"] = self.error or "no trace written (the run ended before the window began?)"
      return out
    from dualpath_jax.analysis.device_trace import summarize
    out["path"] = path
    try:
      out["summary"] = summarize(path)
    except (OSError, ValueError, KeyError) as e:
      out["error"] = f"summarize: {e!r}"
    return out
