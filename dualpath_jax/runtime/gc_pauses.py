"""Python's garbage-collector pauses over a timed run, and the option to freeze the heap first.

A collection holds the GIL from start to end, so every runtime thread (PE, its sender, DE) stops
for it. A jax.profiler window of 1P1D dualpath (2x H200, docs/perf/gpu_bench.md record 7) showed
all three host threads stalled together for 139 ms with both GPUs idle; this counts what the
collector takes, per generation. `freeze=True` runs a full collection and moves every object
alive when the clock starts into the permanent generation (gc.freeze), so that later
collections do not walk the model, the caches and the workload again.
"""

from __future__ import annotations

import gc
import time


class GcPauses:
  """Records every collection between start() and stop(): {generation: count, seconds, max}."""

  def __init__(self, freeze: bool = False):
    self.freeze = bool(freeze)
    self._began: float | None = None
    self._stats: dict[int, dict] = {}
    self._frozen = False

  def _callback(self, phase: str, info: dict) -> None:
    if phase == "start":
      self._began = time.perf_counter()
      return
    if self._began is None:
      return
    seconds = time.perf_counter() - self._began
    self._began = None
    s = self._stats.setdefault(int(info.get("generation", -1)),
                               dict(count=0, seconds=0.0, max_s=0.0))
    s["count"] += 1
    s["seconds"] += seconds
    s["max_s"] = max(s["max_s"], seconds)

  def start(self) -> "GcPauses":
    if self.freeze:
      gc.collect()
      gc.freeze()
      self._frozen = True
    gc.callbacks.append(self._callback)
    return self

  def stop(self) -> dict:
    """{'freeze': bool, 'frozen_objects': n, 'by_generation': {gen: {count, seconds, max_s}},
    'seconds': total}; unfreezes what start() froze."""
    if self._callback in gc.callbacks:
      gc.callbacks.remove(self._callback)
    frozen = gc.get_freeze_count()
    if self._frozen:
      gc.unfreeze()
      self._frozen = False
    return dict(freeze=self.freeze, frozen_objects=frozen if self.freeze else 0,
                by_generation={str(g): dict(v) for g, v in sorted(self._stats.items())},
                seconds=sum(v["seconds"] for v in self._stats.values()))
