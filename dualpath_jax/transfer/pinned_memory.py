"""Host memory for the node buffers, as writable numpy arrays: pageable or page-locked (pinned).

A GPU copies host memory into HBM by DMA only from page-locked memory. From plain (pageable)
numpy, the copy first goes through a staging buffer: record 5 (docs/perf/gpu_bench.md, 4x H100)
measured one 64 MiB `jax.device_put` from numpy at ~5 ms, so the PE's 3 layers in flight moved
13 GB/s against the link's 52. The node buffers (runtime/host_buffer.py) can therefore take their
pool blocks from one of these kinds:

  'numpy'            np.empty: pageable, on every backend.
  'jax_pinned'       a jax array placed in `device`'s 'pinned_host' memory (XLA's pinned host
                     allocator), held for the block's life and seen as a writable numpy array
                     through its buffer pointer. XLA treats its arrays as immutable; this one is
                     never handed to XLA, only its bytes are written and then copied from
                     (jax.device_put of the numpy view).
  'cuda_registered'  np.empty, page-locked in place by cudaHostRegister (CUDA runtime via ctypes;
                     unregistered when the array is collected).
  'dma_mapped'       np.empty, page-locked in place by the PJRT client itself (`client.dma_map`,
                     unmapped when the array is collected): XLA then knows the memory is mapped
                     and may copy from it without staging it first (PjRtClient::DmaMap). GPUs
                     only. On an H200 with jax 0.11.2 it moved no faster than 'cuda_registered'
                     (scripts/bench_h2d.py, docs/perf/gpu_bench.md record 12).

From either page-locked kind one 64 MiB jax.device_put took 1.8-1.9 ms against 14.5 ms from
numpy, and 3 in flight moved 41-46 GB/s against 11.8 (4x H100, the GPU bench's host_memory
section, docs/perf/gpu_bench.md record 6). `cuda_copy_to_host` is the D2H counterpart: the CUDA
runtime copies a device array straight into such memory.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
import threading
import weakref

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

HOST_MEMORY_KINDS = ("numpy", "jax_pinned", "cuda_registered", "dma_mapped")


def _check_kind(kind: str) -> None:
  if kind not in HOST_MEMORY_KINDS:
    raise ValueError(f"host_memory: expected one of {list(HOST_MEMORY_KINDS)}, got {kind!r}")


_locked: dict[int, int] = {}  # start address -> end address of live page-locked allocations
_locked_mutex = threading.Lock()


def _register(array: np.ndarray, owner) -> np.ndarray:
  """Records `array`'s bytes as page-locked for as long as `owner` (what keeps the memory alive,
  and every numpy view of it) lives."""
  start = array.ctypes.data
  with _locked_mutex:
    _locked[start] = start + array.nbytes
  weakref.finalize(owner, _unregister, start)
  return array


def _unregister(start: int) -> None:
  with _locked_mutex:
    _locked.pop(start, None)


def is_page_locked(array: np.ndarray) -> bool:
  """True if `array`'s bytes lie in one live allocation of a page-locked kind made here."""
  if not isinstance(array, np.ndarray) or array.nbytes == 0:
    return False
  start = array.__array_interface__["data"][0]
  end = start + array.nbytes
  with _locked_mutex:
    return any(s <= start and end <= e for s, e in _locked.items())


def allocate(nbytes: int, kind: str = "numpy", device: jax.Device | None = None) -> np.ndarray:
  """A writable 1-D uint8 array of `nbytes` in host memory of `kind` (see the module doc).

  device: whose pinned host memory 'jax_pinned' uses, or whose client maps 'dma_mapped'
    memory (default: jax.devices()[0]).
  """
  _check_kind(kind)
  if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
    raise ValueError(f"nbytes: expected a positive int, got {nbytes!r}")
  nbytes = int(nbytes)
  if kind == "numpy":
    return np.empty(nbytes, np.uint8)
  if kind == "jax_pinned":
    array = _jax_pinned(nbytes, device or jax.devices()[0])
    return _register(array, array.base.obj)  # views keep the ctypes array, not `array`, alive
  if kind == "dma_mapped":
    array = _dma_mapped(nbytes, device or jax.devices()[0])
  else:
    array = _cuda_registered(nbytes)
  return _register(array, array)  # owns its memory: every view keeps it alive


def _jax_pinned(nbytes: int, device: jax.Device) -> np.ndarray:
  sharding = SingleDeviceSharding(device, memory_kind="pinned_host")
  try:
    owner = jax.device_put(np.zeros(nbytes, np.uint8), sharding)
    owner.block_until_ready()
    pointer = owner.unsafe_buffer_pointer()
  except Exception as e:  # noqa: BLE001  (backends without pinned host memory raise various errors)
    raise RuntimeError(f"host_memory 'jax_pinned': no pinned host memory on {device}: {e!r}") from e
  if owner.sharding.memory_kind != "pinned_host":
    raise RuntimeError(f"host_memory 'jax_pinned': {device} placed the array in "
                       f"{owner.sharding.memory_kind!r} memory")
  return _view(owner, pointer, nbytes)


def _view(owner: jax.Array, pointer: int, nbytes: int) -> np.ndarray:
  view = (ctypes.c_uint8 * nbytes).from_address(pointer)
  view._owner = owner  # the numpy array -> memoryview -> ctypes array -> the jax array
  return np.ctypeslib.as_array(view)


def host_view(x: jax.Array) -> np.ndarray | None:
  """A numpy view (no copy) of a single-device jax array held in host memory ('pinned_host' or
  'unpinned_host'), keeping `x` alive; None where the backend gives no pointer to it. Read it
  only once `x` is ready; do not write it (XLA may share the buffer)."""
  if x.sharding.memory_kind not in ("pinned_host", "unpinned_host") or len(x.devices()) != 1:
    return None
  try:
    x.block_until_ready()
    pointer = x.unsafe_buffer_pointer()
  except Exception:  # noqa: BLE001  (backends that give no pointer raise various errors)
    return None
  flat = _view(x, pointer, x.nbytes)
  flat.flags.writeable = False
  return flat.view(x.dtype).reshape(x.shape)


@functools.lru_cache(maxsize=1)
def cuda_runtime() -> ctypes.CDLL:
  """The CUDA runtime library that jax's CUDA plugin ships (nvidia-cuda-runtime), or the
  system's."""
  candidates = []
  for root in sys.path:
    candidates += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib",
                                                 "libcudart.so*")))
  candidates += ["libcudart.so.12", "libcudart.so"]
  errors = []
  for name in candidates:
    try:
      return ctypes.CDLL(name)
    except OSError as e:
      errors.append(f"{name}: {e}")
  raise RuntimeError("host_memory 'cuda_registered': no CUDA runtime library found ("
                     + "; ".join(errors[-3:]) + ")")


_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def _cuda_registered(nbytes: int) -> np.ndarray:
  lib = cuda_runtime()
  array = np.empty(nbytes, np.uint8)
  array.fill(0)  # map the pages before locking them
  pointer = ctypes.c_void_p(array.ctypes.data)
  status = lib.cudaHostRegister(pointer, ctypes.c_size_t(nbytes), ctypes.c_uint(_PORTABLE))
  if status != 0:
    raise RuntimeError(f"host_memory 'cuda_registered': cudaHostRegister of {nbytes} bytes "
                       f"returned CUDA error {status}")
  weakref.finalize(array, lib.cudaHostUnregister, pointer)
  return array


def _dma_mapped(nbytes: int, device: jax.Device) -> np.ndarray:
  array = np.empty(nbytes, np.uint8)
  array.fill(0)  # map the pages before locking them
  client = device.client
  try:
    client.dma_map(array.ctypes.data, nbytes)
  except Exception as e:  # noqa: BLE001  (UNIMPLEMENTED on CPU, or a failed registration)
    raise RuntimeError(f"host_memory 'dma_mapped': the {device.platform} client could not map "
                       f"{nbytes} bytes: {e}") from e
  weakref.finalize(array, client.dma_unmap, array.ctypes.data)
  return array


_spare: dict[tuple, list[np.ndarray]] = {}  # (kind, device id, nbytes) -> allocations given back
_spare_mutex = threading.Lock()


def lease(nbytes: int, kind: str, device: jax.Device | None = None) -> np.ndarray:
  """allocate(), or an allocation of the same kind, device and size that an earlier holder gave
  back: page-locking gigabytes takes seconds, and each run of a job builds its own cluster."""
  key = (kind, None if device is None else device.id, int(nbytes))
  with _spare_mutex:
    spare = _spare.get(key)
    if spare:
      return spare.pop()
  return allocate(nbytes, kind, device)


def give_back(array: np.ndarray, kind: str, device: jax.Device | None = None) -> None:
  """Returns a lease()d allocation for the next lease() of that kind, device and size. The caller
  must no longer use it, nor have copies from it in flight."""
  key = (kind, None if device is None else device.id, int(array.nbytes))
  with _spare_mutex:
    _spare.setdefault(key, []).append(array)


_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost
_NON_BLOCKING = 1  # cudaStreamNonBlocking
_streams = threading.local()


def _copy_stream(lib, ordinal: int, stream: ctypes.c_void_p) -> int:
  """This thread's copy stream on GPU `ordinal` into `stream` (created once); a CUDA status.

  Non-blocking: a copy on the legacy default stream waits for (and holds up) the work of every
  blocking stream of the device. With the copies there, dualpath's decode inflation was +25%
  against +4% through XLA's own pinned copies (2x H200, docs/perf/gpu_bench.md record 6)."""
  cache = getattr(_streams, "by_device", None)
  if cache is None:
    cache = _streams.by_device = {}
  if ordinal not in cache:
    made = ctypes.c_void_p()
    status = lib.cudaStreamCreateWithFlags(ctypes.byref(made), ctypes.c_uint(_NON_BLOCKING))
    if status != 0:
      return status
    cache[ordinal] = made.value
  stream.value = cache[ordinal]
  return 0


def cuda_copy_to_host(x: jax.Array, out: np.ndarray, axis: int | None = None) -> np.ndarray:
  """x's bytes copied by the CUDA runtime (cudaMemcpy2D) from its GPU straight into `out`: one
  DMA and no host copy when `out` is page-locked (a node buffer's arena). With `axis`, `out` may
  be shorter than x along it (x's leading entries land). x must be a single-GPU array; out's
  axes from `axis` on must be C-contiguous and the axes before it collapse to one stride.
  Blocks until x is ready and the copy is done (the GIL is released during the copy), which runs
  on a non-blocking stream of this thread's own."""
  device = _one_gpu(x)
  _copy_to_host(x, device, [(out, (0, *memcpy2d_geometry(x.shape, x.dtype, out, axis)))])
  return out


def cuda_copy_rows_to_host(x: jax.Array, copies, batch_axis: int) -> None:
  """Several batch rows of one GPU array into their own host arrays, by the CUDA runtime: x is
  [B, T, ...] (batch_axis 0) or [L, B, T, ...] (batch_axis 1); copies is [(row, out), ...] with
  out [1 or L, count, ...], count <= T (the row's first `count` entries land). One wait for x,
  one 2-D copy a row straight from x's buffer (no device program cuts the row out), one stream
  sync for all: a PE layer's sends were a jitted row cut and a copy a row, ~0.9 ms of host time
  each (2x H200, docs/perf/gpu_bench.md record 7)."""
  device = _one_gpu(x)
  _copy_to_host(x, device, [(out, row_geometry(x.shape, x.dtype, row, batch_axis, out))
                            for row, out in copies])


def _one_gpu(x: jax.Array):
  devices = x.devices()
  if len(devices) != 1 or next(iter(devices)).platform != "gpu":
    raise ValueError(f"d2h_staging 'cuda_memcpy' needs an array on one CUDA GPU, got one on "
                     f"{sorted(str(d) for d in devices)}")
  return next(iter(devices))


def _copy_to_host(x: jax.Array, device, plans) -> None:
  """Waits for x, then one cudaMemcpy2DAsync per (out, (source offset, height, width, source
  pitch, destination pitch)) on this thread's stream for x's GPU, then one sync."""
  plans = [(out, g) for out, g in plans if g[1] and g[2]]
  if not plans:
    return
  lib = cuda_runtime()
  x.block_until_ready()
  ordinal = getattr(device, "local_hardware_id", None)
  ordinal = device.id if ordinal is None else ordinal
  status = lib.cudaSetDevice(ctypes.c_int(ordinal))
  stream = ctypes.c_void_p()
  if status == 0:
    status = _copy_stream(lib, ordinal, stream)
  base = x.unsafe_buffer_pointer()
  for out, (offset, height, width, src_pitch, dst_pitch) in plans:
    if status != 0:
      break
    status = lib.cudaMemcpy2DAsync(
        ctypes.c_void_p(out.__array_interface__["data"][0]), ctypes.c_size_t(dst_pitch),
        ctypes.c_void_p(base + offset), ctypes.c_size_t(src_pitch),
        ctypes.c_size_t(width), ctypes.c_size_t(height), ctypes.c_int(_DEVICE_TO_HOST), stream)
  if status == 0:
    status = lib.cudaStreamSynchronize(stream)
  if status != 0:
    raise RuntimeError(f"d2h_staging 'cuda_memcpy': CUDA error {status} copying {len(plans)} "
                       f"part(s) of {list(x.shape)} from {device}")


def row_geometry(x_shape, dtype, row: int, batch_axis: int, out: np.ndarray
                 ) -> tuple[int, int, int, int, int]:
  """(source offset, height, width, source pitch, destination pitch) in bytes of the 2-D copy
  that puts the head of batch row `row` of a C-contiguous array of `x_shape` ([B, T, ...] for
  batch_axis 0, [L, B, T, ...] for 1) into `out` ([1 or L, count, ...])."""
  x_shape = tuple(x_shape)
  if batch_axis not in (0, 1) or len(x_shape) < batch_axis + 2:
    raise ValueError(f"batch_axis: expected 0 or 1 of an array with a token axis after it, got "
                     f"{batch_axis} for {list(x_shape)}")
  if not 0 <= row < x_shape[batch_axis]:
    raise ValueError(f"row: {row} is outside the batch of {x_shape[batch_axis]}")
  row_shape = ((1, *x_shape[1:]) if batch_axis == 0 else (x_shape[0], *x_shape[2:]))
  height, width, src_pitch, dst_pitch = memcpy2d_geometry(row_shape, dtype, out, 1)
  row_bytes = int(np.prod(x_shape[batch_axis + 1:], dtype=np.int64)) * np.dtype(dtype).itemsize
  if batch_axis == 1:
    src_pitch = x_shape[1] * row_bytes  # from one layer's row to the next layer's
  return row * row_bytes, height, width, src_pitch, dst_pitch


def memcpy2d_geometry(x_shape, dtype, out: np.ndarray, axis: int | None
                      ) -> tuple[int, int, int, int]:
  """(height, width, source pitch, destination pitch) in bytes of the 2-D copy that puts a
  C-contiguous array of `x_shape` into `out` (shorter than it along `axis`, if given)."""
  x_shape = tuple(x_shape)
  axis = 0 if axis is None else axis
  if out.dtype != np.dtype(dtype) or out.ndim != len(x_shape) or out.shape[axis] > x_shape[axis] \
      or out.shape[:axis] + out.shape[axis + 1:] != x_shape[:axis] + x_shape[axis + 1:]:
    raise ValueError(f"out: expected {np.dtype(dtype)} {list(x_shape)} or shorter along axis "
                     f"{axis}, got {out.dtype} {list(out.shape)}")
  tail = int(np.prod(out.shape[axis + 1:], dtype=np.int64)) * out.itemsize
  width = out.shape[axis] * tail  # bytes of one row of the 2-D copy
  contiguous = [out.strides[d] == out.strides[d + 1] * out.shape[d + 1]
                for d in range(out.ndim - 1)]
  if out.strides[-1] != out.itemsize or not all(contiguous[axis:]):
    raise ValueError(f"out: axes {axis}.. must be C-contiguous, strides {out.strides}")
  if not all(contiguous[:max(axis - 1, 0)]):
    raise ValueError(f"out: axes before {axis} must collapse to one stride, strides {out.strides}")
  height = int(np.prod(out.shape[:axis], dtype=np.int64)) if axis else 1
  dst_pitch = out.strides[axis - 1] if axis else width
  return height, width, x_shape[axis] * tail, dst_pitch
