"""Whole-layer H2D and D2H by the kind of host memory, and by how many copies are in flight.

Record 5 (docs/perf/gpu_bench.md, 4x H100) found the PE's layer loads bounded by its 3 layers
in flight: one 64 MiB jax.device_put from numpy took ~5 ms, so 3 in flight moved 13 GB/s where
back to back moved 30 and the ceilings' H2D 52. This section measures, on the PE's device, the
same layers (num_layers arrays of layer_bytes) from each host memory kind of
transfer.pinned_memory, issued back to back or with at most N in flight:

  numpy            pageable arrays (what the node buffers held up to record 5)
  jax_pinned       numpy views of jax pinned_host arrays, copied by device_put of the view
  jax_pinned_array the jax pinned_host arrays themselves, copied by device_put (XLA's own
                   pinned -> device copy: the ceilings' source)
  cuda_registered  numpy arrays page-locked by cudaHostRegister
  dma_mapped       numpy arrays page-locked by the PJRT client's own dma_map

and D2H of those layers from the device: into fresh numpy (np.asarray), into XLA's pinned host
memory (device_put onto a pinned_host sharding), and into resident host arrays (the DE buffer's
reused blocks, what the PE's handoff does) through transfer.device_to_host 'direct' or 'pinned',
and on GPUs into page-locked arrays ('cuda_registered') through 'pinned' or 'cuda_memcpy' (one
DMA by the CUDA runtime; its bytes are checked). Every moved
layer is checked against its source outside the clock (first and last layer), compared on the
device (bench/verify.py: a D2H of them between runs slowed the next H2D run; up to 2026-11-29 the
H2D rows of page-locked sources read 43-47 GB/s for that reason, records 6 and 12).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from dualpath_jax.bench import verify
from dualpath_jax.bench.hardware import device_sharding, pinned_host_sharding
from dualpath_jax.bench.timing import median_seconds
from dualpath_jax.transfer import pinned_memory

SOURCES = ("numpy", "jax_pinned", "jax_pinned_array", "cuda_registered", "dma_mapped")


def _delete(arrays) -> None:
  for a in jax.tree_util.tree_leaves(arrays):
    if isinstance(a, jax.Array):
      a.delete()


def _issue(sources, device, bound: int | None) -> list:
  """device_put of every source onto `device`, at most `bound` unfinished at once."""
  sharding = device_sharding(device)
  moved = []
  for source in sources:
    if bound and len(moved) >= bound:
      jax.block_until_ready(moved[-bound])
    moved.append(jax.device_put(source, sharding))
  return moved


def _sources(kind: str, layers: Sequence[np.ndarray], device):
  """The layers' bytes in memory of `kind`: what device_put is handed."""
  if kind == "jax_pinned_array":
    return [jax.device_put(h, pinned_host_sharding(device)) for h in layers]
  out = []
  for h in layers:
    buffer = pinned_memory.allocate(h.nbytes, kind, device)
    buffer[:] = h.reshape(-1).view(np.uint8)
    out.append(buffer.view(h.dtype).reshape(h.shape))
  return out


def measure_host_memory(device: jax.Device, *, layer_bytes: int, num_layers: int,
                        bounds: Sequence[int | None] = (None, 1, 3, 6, 12),
                        sources: Sequence[str] = SOURCES, repeats: int, warmup: int,
                        seed: int = 0, log: Callable[[str], None] = print,
                        out_of_time: Callable[[], bool] = lambda: False) -> dict:
  """GB/s of num_layers x layer_bytes H2D per (source, bound), and D2H per target."""
  unknown = set(sources) - set(SOURCES)
  if unknown or not sources:
    raise ValueError(f"host_memory.sources: expected some of {SOURCES}, got {list(sources)}")
  for bound in bounds:
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
      raise ValueError(f"host_memory.bounds: expected None or positive ints, got {list(bounds)}")
  rng = np.random.default_rng(seed)
  layers = [rng.integers(0, 256, layer_bytes, np.uint8) for _ in range(num_layers)]
  total = layer_bytes * num_layers
  check = sorted({0, num_layers - 1})
  result = dict(device=str(device), layer_bytes=layer_bytes, num_layers=num_layers,
                bytes=total, repeats=repeats, warmup=warmup, h2d=[], d2h={},
                note=("one thread; bound = most copies unfinished at once (None: back to back); "
                      "GB/s = 1e9 bytes/s of the median run; layers "
                      f"{check} checked after every run"))
  want = {}  # layer -> its bytes on the device, placed at the first check
  for kind in sources:
    if out_of_time():
      result["h2d"].append(dict(source=kind, skipped="time budget"))
      continue
    try:
      held = _sources(kind, layers, device)
    except Exception as e:  # noqa: BLE001  (a kind this backend does not have)
      result["h2d"].append(dict(source=kind, error=f"{type(e).__name__}: {e}"[:300]))
      log(f"host_memory: {kind} unavailable: {e!r}")
      continue
    for bound in bounds:
      bad = []

      def cleanup(out, bad=bad):  # compared on the device: a D2H here slows the next run
        for i in check:
          if i not in want:
            want[i] = verify.expected_bytes(layers[i], out[i])
          if not verify.device_bytes_equal([out[i]], want[i]):
            bad.append(i)
        _delete(out)

      s, _ = median_seconds(lambda held=held, bound=bound: _issue(held, device, bound),
                            repeats, warmup, cleanup=cleanup)
      row = dict(source=kind, bound=bound, gbps=total / s / 1e9, median_s=s,
                 ms_per_layer=1e3 * s / num_layers, bytes_equal=not bad)
      result["h2d"].append(row)
      log(f"host_memory: h2d {kind:17s} bound {str(bound):4s} {row['gbps']:7.2f} GB/s"
          + ("" if not bad else f"  WRONG BYTES in layers {sorted(set(bad))}"))
    _delete(held)
    del held
  if not out_of_time():
    from dualpath_jax.transfer import device_to_host
    def fresh():  # new device arrays each run: jax caches an array's host copy after a D2H
      return [jax.device_put(h, device_sharding(device)) for h in layers]

    resident = [np.zeros_like(h) for h in layers]  # a reused pool block's state
    targets = {
        "numpy_fresh": lambda x, i: np.asarray(x),
        "jax_pinned_host": lambda x, i: jax.device_put(x, pinned_host_sharding(device)),
        "resident_direct": lambda x, i: device_to_host(x, resident[i], staging="direct"),
        "resident_pinned": lambda x, i: device_to_host(x, resident[i], staging="pinned")}
    checked = {}
    if device.platform == "gpu":  # the CUDA runtime's copy straight into page-locked arrays
      try:
        locked = [pinned_memory.allocate(h.nbytes, "cuda_registered") for h in layers]
        targets["locked_pinned"] = lambda x, i: device_to_host(x, locked[i], staging="pinned")
        targets["locked_cuda_memcpy"] = lambda x, i: device_to_host(x, locked[i],
                                                                    staging="cuda_memcpy")
        checked = {"locked_pinned": locked, "locked_cuda_memcpy": locked}
      except Exception as e:  # noqa: BLE001
        result["d2h"]["locked"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    for name, fn in targets.items():
      try:
        s, _ = median_seconds(lambda on_device, fn=fn: [fn(x, i) for i, x in enumerate(on_device)],
                              repeats, warmup, setup=fresh, cleanup=_delete)
        result["d2h"][name] = dict(gbps=total / s / 1e9, median_s=s)
        if name in checked:
          result["d2h"][name]["bytes_equal"] = all(
              np.array_equal(checked[name][i].reshape(-1), layers[i]) for i in check)
          for buffer in checked[name]:
            buffer.fill(0)
        log(f"host_memory: d2h into {name} {total / s / 1e9:.2f} GB/s")
      except Exception as e:  # noqa: BLE001
        result["d2h"][name] = dict(error=f"{type(e).__name__}: {e}"[:300])
    on_device = fresh()
    pinned = jax.device_put(on_device[0], pinned_host_sharding(device))
    result["d2h"]["pinned_host_view"] = (
        "pointer view (no copy)" if pinned_memory.host_view(pinned) is not None
        else "no pointer: np.from_dlpack or np.asarray (a copy)")
    _delete(on_device + [pinned])
  return result
