"""Wall-clock timing of asynchronous device work, and a progress log with a time budget.

JAX dispatch is asynchronous, so every timed call blocks until its outputs are ready before the
clock is read. Warm-up calls (compilation, first allocations) run untimed first; the median of
the timed repeats is reported (robust to a stray slow repeat on a shared host).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax


def median_seconds(fn: Callable[..., Any], repeats: int, warmup: int, *,
                   cleanup: Callable[[Any], None] | None = None,
                   setup: Callable[[], Any] | None = None) -> tuple[float, list[float]]:
  """Median seconds of `fn()` (its outputs ready) over `repeats` calls after `warmup` calls.

  Returns (median, every timed repeat). `cleanup(outputs)`, if given, runs after each call with
  the clock stopped (e.g. deleting device arrays so that repeats do not pile up memory).
  `setup()`, if given, runs before each call with the clock stopped, and the call is
  `fn(setup())` (e.g. fresh device arrays: jax caches an array's host copy after the first D2H).
  """
  if repeats <= 0:
    raise ValueError(f"repeats must be positive, got {repeats}")
  times = []
  for i in range(warmup + repeats):
    args = () if setup is None else (setup(),)
    if args:
      jax.block_until_ready(args[0])
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    if cleanup is not None:
      cleanup(out)
    del out, args
  return statistics.median(times), times


def median_gbps(fn: Callable[[], Any], nbytes: int, repeats: int, warmup: int
                ) -> tuple[float, float]:
  """(GB/s as 1e9 bytes/s, median seconds) of a call that moves `nbytes`."""
  median_s, _ = median_seconds(fn, repeats, warmup)
  return nbytes / median_s / 1e9, median_s


class Progress:
  """Timestamped progress lines on stderr and a soft wall-clock budget for a whole run.

  The budget is soft: a measurement already running is never interrupted, but callers ask
  `out_of_time()` before starting the next one and record it as skipped instead.
  """

  def __init__(self, budget_s: float | None = None, stream: TextIO | None = None):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.stream = stream

  def elapsed_s(self) -> float:
    return time.perf_counter() - self.start

  def time_left_s(self) -> float:
    return float("inf") if not self.budget_s else self.budget_s - self.elapsed_s()

  def out_of_time(self, reserve_s: float = 0.0) -> bool:
    """True once fewer than `reserve_s` seconds of the budget are left."""
    return self.time_left_s() <= reserve_s

  def __call__(self, message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{self.elapsed_s():7.1f}s] {message}", file=self.stream or sys.stderr,
          flush=True)
