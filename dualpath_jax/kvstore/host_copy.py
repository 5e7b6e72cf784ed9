"""Large host-memory copies split over a shared thread pool.

The KV data plane moves gigabytes through host memory per request (stacking read blocks, the
per-layer gather out of Full Blocks, transposes into model layout, device-to-host copies into a
node buffer). One Python thread copies at ~4-10 GB/s, far below a GPU's 53 GB/s host link
(docs/perf/gpu_bench.md); numpy releases the GIL while it copies, so splitting a copy over a few
threads scales it: the per-layer gather of a 16K-token Qwen2.5-7B prefix ran at 9.6 GB/s on one
thread and 17.5 GB/s on two (2-core sandbox, 2026-11-27, docs/perf/gpu_bench.md).

Copies below MIN_PARALLEL_BYTES, or with one worker, run inline. Workers: DUALPATH_COPY_THREADS,
default min(8, CPUs). Tasks never submit tasks of their own, so callers on many threads (PE
shards, DE workers, link workers) share the pool without deadlock.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

MIN_PARALLEL_BYTES = 8 << 20
"""Smaller copies are not split (a pool round trip costs more than they take)."""

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def workers() -> int:
  """Threads of the shared copy pool (DUALPATH_COPY_THREADS, default min(8, CPUs))."""
  value = os.environ.get("DUALPATH_COPY_THREADS", "")
  if value:
    try:
      count = int(value)
    except ValueError:
      raise ValueError(f"DUALPATH_COPY_THREADS: expected a positive integer, got {value!r}"
                       ) from None
    if count < 1:
      raise ValueError(f"DUALPATH_COPY_THREADS: expected a positive integer, got {value!r}")
    return count
  return max(1, min(8, os.cpu_count() or 1))


def _executor() -> concurrent.futures.ThreadPoolExecutor:
  global _pool
  with _lock:
    if _pool is None:
      _pool = concurrent.futures.ThreadPoolExecutor(workers(), thread_name_prefix="host-copy")
    return _pool


def for_ranges(count: int, nbytes: int, fn: Callable[[slice], None]) -> None:
  """fn(rows) over disjoint slices covering range(count): split over the pool when `nbytes`
  (what the whole call copies) is large, else one inline call. Re-raises a task's error."""
  parts = min(workers(), count)
  if parts <= 1 or nbytes < MIN_PARALLEL_BYTES:
    fn(slice(0, count))
    return
  bounds = np.linspace(0, count, parts + 1).astype(int)
  futures = [_executor().submit(fn, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
  for future in futures:
    future.result()


def copy(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
  """np.copyto(dst, src) (same shape), split along axis 0. Returns dst."""
  if dst.shape != src.shape:
    raise ValueError(f"copy: dst {list(dst.shape)} and src {list(src.shape)} differ in shape")
  if dst.ndim == 0:
    np.copyto(dst, src)
    return dst
  for_ranges(dst.shape[0], dst.nbytes, lambda rows: np.copyto(dst[rows], src[rows]))
  return dst


def stack(arrays: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
  """np.stack(arrays) (equal shapes and dtypes), its copies split over the pool; into `out`
  ([len(arrays), *shape], same dtype) when given."""
  if not len(arrays):
    raise ValueError("stack: no arrays")
  first = np.asarray(arrays[0])
  shape = (len(arrays), *first.shape)
  if out is None:
    out = np.empty(shape, first.dtype)
  elif out.shape != shape or out.dtype != first.dtype:
    raise ValueError(f"stack: out is {out.dtype} {list(out.shape)}, expected {first.dtype} "
                     f"{list(shape)}")

  def rows(part: slice) -> None:
    for i in range(part.start, part.stop):
      if np.shape(arrays[i]) != first.shape:
        raise ValueError(f"stack: array {i} has shape {list(np.shape(arrays[i]))}, array 0 "
                         f"{list(first.shape)}")
      out[i] = arrays[i]
  for_ranges(len(arrays), out.nbytes, rows)
  return out
