"""Raw link ceilings of one host: H2D per GPU, GPU-to-GPU per link, multipath ingest into GPU 0.

What DualPath can gain on one host is bounded by these numbers (DESIGN.md: each GPU's host link
plays a storage NIC, NVLink the compute network):

  h2d_alone        host -> GPU i, from buffers in GPU i's pinned host memory, one GPU at a time
  h2d_all_at_once  every GPU copies its own pinned buffers at once (shared host memory / root
                   complex limits show up here)
  h2d_pageable     host -> GPU 0 from plain numpy (what an unpinned host buffer gets)
  d2d              GPU i -> GPU j by jax.device_put, every ordered pair
  ingest           into GPU 0 over k + 1 paths: its own H2D plus k other GPUs' H2D each forwarded
                   to GPU 0 by a D2D, for k = 0 .. n - 1. The bytes are cut into equal chunks
                   dealt round robin to the paths; a path moves its chunks one after another.

Ingest is issued two ways and the faster is the ceiling: 'threads' (one Python thread a path,
each issuing its chunks in order) and 'async' (one thread issuing every path's next chunk in
turn, relying on asynchronous dispatch). Host buffers are placed in pinned host memory by
jax.device_put onto a sharding with memory_kind='pinned_host'; where that fails, plain numpy
arrays are used and the result says so (`h2d_source`).
"""

from __future__ import annotations

import concurrent.futures
import statistics
from collections.abc import Callable, Sequence

import jax
import numpy as np

from dualpath_jax.bench import hardware
from dualpath_jax.bench.timing import median_seconds

ISSUE_MODES = ("threads", "async")


def _gbps(nbytes: int, seconds: float) -> float:
  return nbytes / seconds / 1e9


class HostChunks:
  """Equal host chunks for each GPU, staged in that GPU's pinned host memory where possible."""

  def __init__(self, devices: Sequence[jax.Device], *, total_bytes: int, chunk_bytes: int,
               seed: int = 0, use_pinned: bool = True):
    if chunk_bytes <= 0 or total_bytes < chunk_bytes:
      raise ValueError(f"ceilings: need 0 < chunk_bytes <= total_bytes, got chunk_bytes="
                       f"{chunk_bytes}, total_bytes={total_bytes}")
    self.devices = tuple(devices)
    self.chunk_bytes = chunk_bytes
    self.num_chunks = total_bytes // chunk_bytes
    self.total_bytes = self.num_chunks * chunk_bytes
    works, note = hardware.probe_pinned_host(self.devices[0]) if use_pinned else (
        False, "pinned staging disabled by the caller")
    self.pinned, self.pinned_note = works, note
    source = hardware.random_bytes(chunk_bytes, seed)
    self.chunks: list[list] = []
    for device in self.devices:
      if self.pinned:
        sharding = hardware.pinned_host_sharding(device)
        per_device = [jax.device_put(source, sharding) for _ in range(self.num_chunks)]
        jax.block_until_ready(per_device)
      else:
        per_device = [source.copy() for _ in range(self.num_chunks)]
      self.chunks.append(per_device)

  @property
  def source_kind(self) -> str:
    return "pinned_host" if self.pinned else "numpy (pageable)"


def _h2d(chunk, device):
  return jax.device_put(chunk, hardware.device_sharding(device))


def _issue_path(chunks, device, target):
  """H2D of `chunks` onto `device`, each forwarded to `target` by a D2D when they differ."""
  out = []
  for chunk in chunks:
    x = _h2d(chunk, device)
    if device != target:
      x = jax.device_put(x, hardware.device_sharding(target))
    out.append(x)
  return out


def _deal(num_chunks: int, num_paths: int) -> list[list[int]]:
  """Chunk indices of each path: chunk c goes to path c % num_paths."""
  return [list(range(p, num_chunks, num_paths)) for p in range(num_paths)]


def _delete(arrays) -> None:
  for a in jax.tree_util.tree_leaves(arrays):
    a.delete()


class _Timer:
  """Median seconds of a call returning device arrays, which are freed between repeats."""

  def __init__(self, repeats: int, warmup: int):
    self.repeats, self.warmup = repeats, warmup

  def __call__(self, fn: Callable[[], list]) -> float:
    return median_seconds(fn, self.repeats, self.warmup, cleanup=_delete)[0]


def measure_ceilings(devices: Sequence[jax.Device], *, total_bytes: int, chunk_bytes: int,
                     d2d_bytes: int, repeats: int, warmup: int,
                     issue_modes: Sequence[str] = ISSUE_MODES, pageable: bool = True,
                     pinned: bool = True, seed: int = 0, log: Callable[[str], None] = print,
                     out_of_time: Callable[[], bool] = lambda: False,
                     on_update: Callable[[dict], None] | None = None) -> dict:
  """All ceilings above; `on_update(result_so_far)` after each part (incremental saving).

  pinned=False stages nothing in pinned host memory (every H2D from numpy), e.g. where pinned
  allocations fail.
  """
  unknown = set(issue_modes) - set(ISSUE_MODES)
  if unknown or not issue_modes:
    raise ValueError(f"ceilings.issue_modes: expected some of {ISSUE_MODES}, got {issue_modes}")
  devices = tuple(devices)
  n = len(devices)
  timer = _Timer(repeats, warmup)
  chunks = HostChunks(devices, total_bytes=total_bytes, chunk_bytes=chunk_bytes, seed=seed,
                      use_pinned=pinned)
  total = chunks.total_bytes
  result = dict(
      num_gpus=n, h2d_source=chunks.source_kind,
      pinned_host=dict(works=chunks.pinned, note=chunks.pinned_note),
      total_bytes=total, chunk_bytes=chunk_bytes, d2d_bytes=d2d_bytes, repeats=repeats,
      warmup=warmup, gb="1e9 bytes", timing="median wall-clock seconds, outputs ready")
  if not chunks.pinned:
    result["note"] = ("pinned host memory unavailable; every H2D here is from plain numpy "
                      f"(pageable): {chunks.pinned_note}")
  log(f"ceilings: {n} device(s), H2D source {chunks.source_kind} ({chunks.pinned_note}); "
      f"{total / 2**20:.0f} MiB in {chunks.num_chunks} chunks of {chunk_bytes / 2**20:.0f} MiB")

  def update():
    if on_update:
      on_update(result)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(n, 1))
  try:
    # --- H2D, one GPU at a time -------------------------------------------------------------
    result["h2d_alone"] = []
    for i, device in enumerate(devices):
      s = timer(lambda i=i, device=device: [_h2d(c, device) for c in chunks.chunks[i]])
      result["h2d_alone"].append(dict(gpu=i, gbps=_gbps(total, s), median_s=s))
      log(f"ceilings: h2d gpu{i} alone {_gbps(total, s):7.2f} GB/s")
    update()

    if pageable:
      # A copy: np.asarray of a pinned_host array may view the pinned memory itself (up to
      # 2026-11-28 this row did that and read 52 GB/s where numpy moved 29 back to back).
      host = ([np.array(np.asarray(c), copy=True) for c in chunks.chunks[0]] if chunks.pinned
              else chunks.chunks[0])
      s = timer(lambda: [_h2d(c, devices[0]) for c in host])
      result["h2d_pageable_gpu0"] = dict(gbps=_gbps(total, s), median_s=s)
      log(f"ceilings: h2d gpu0 from pageable numpy {_gbps(total, s):7.2f} GB/s")
      del host
      update()

    # --- H2D, all GPUs at once --------------------------------------------------------------
    def all_at_once():
      futures = [pool.submit(lambda i=i: [_h2d(c, devices[i]) for c in chunks.chunks[i]])
                 for i in range(n)]
      return [f.result() for f in futures]

    s = timer(all_at_once)
    result["h2d_all_at_once"] = dict(gbps_total=_gbps(n * total, s),
                                     gbps_per_gpu=_gbps(total, s), median_s=s)
    log(f"ceilings: h2d all {n} at once {_gbps(n * total, s):7.2f} GB/s total "
        f"({_gbps(total, s):.2f} each)")
    update()

    # --- GPU to GPU, every ordered pair -----------------------------------------------------
    result["d2d"] = []
    if n > 1 and not out_of_time():
      source = hardware.random_bytes(d2d_bytes, seed + 1)
      on_device = [jax.device_put(source, hardware.device_sharding(d)) for d in devices]
      for i in range(n):
        for j in range(n):
          if i == j:
            continue
          s = timer(lambda i=i, j=j: [jax.device_put(on_device[i],
                                                     hardware.device_sharding(devices[j]))])
          result["d2d"].append(dict(src=i, dst=j, gbps=_gbps(d2d_bytes, s), median_s=s))
      _delete(on_device)
      rates = [r["gbps"] for r in result["d2d"]]
      result["d2d_summary"] = dict(min_gbps=min(rates), median_gbps=statistics.median(rates),
                                   max_gbps=max(rates))
      log(f"ceilings: d2d per link min/median/max {min(rates):.1f} / "
          f"{statistics.median(rates):.1f} / {max(rates):.1f} GB/s")
      update()

    # --- multipath ingest into GPU 0 --------------------------------------------------------
    result["ingest"] = []
    target = devices[0]
    for k in range(n):
      if out_of_time():
        result["ingest_skipped_from_k"] = k
        log(f"ceilings: out of time budget, ingest skipped from k={k}")
        break
      deal = _deal(chunks.num_chunks, k + 1)

      def threads(deal=deal):
        futures = [pool.submit(_issue_path, [chunks.chunks[p][c] for c in indices], devices[p],
                               target) for p, indices in enumerate(deal)]
        return [f.result() for f in futures]

      def interleaved(deal=deal):
        out = [[] for _ in deal]
        for step in range(max(len(indices) for indices in deal)):
          for p, indices in enumerate(deal):
            if step < len(indices):
              out[p] += _issue_path([chunks.chunks[p][indices[step]]], devices[p], target)
        return out

      by_mode = {}
      for mode in issue_modes:
        s = timer(threads if mode == "threads" else interleaved)
        by_mode[mode] = dict(gbps=_gbps(total, s), median_s=s)
      best = max(by_mode, key=lambda m: by_mode[m]["gbps"])
      row = dict(k=k, paths=k + 1, gbps=by_mode[best]["gbps"], best_mode=best, by_mode=by_mode,
                 chunks_per_path=[len(d) for d in deal])
      if result["ingest"]:
        row["speedup_vs_own_link"] = row["gbps"] / result["ingest"][0]["gbps"]
      result["ingest"].append(row)
      modes = ", ".join(f"{m} {v['gbps']:.2f}" for m, v in by_mode.items())
      log(f"ceilings: ingest into gpu0, own link + {k} forwarding: {row['gbps']:7.2f} GB/s "
          f"({modes})")
      update()
  finally:
    pool.shutdown(wait=True)
    for per_device in chunks.chunks:
      if chunks.pinned:
        _delete(per_device)
  return result
