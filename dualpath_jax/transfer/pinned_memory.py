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

Whether XLA's device_put then skips its staging copy for the last two is what the GPU bench
measures (bench/host_memory.py); nothing here assumes it.
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

HOST_MEMORY_KINDS = ("numpy", "jax_pinned", "cuda_registered")


def _check_kind(kind: str) -> None:
  if kind not in HOST_MEMORY_KINDS:
    raise ValueError(f"host_memory: expected one of {list(HOST_MEMORY_KINDS)}, got {kind!r}")


_locked: dict[int, int] = {}  # start address -> end address of live page-locked allocations
_locked_mutex = threading.Lock()


def _register(array: np.ndarray) -> np.ndarray:
  start = array.ctypes.data
  with _locked_mutex:
    _locked[start] = start + array.nbytes
  weakref.finalize(array, _unregister, start)
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

  device: whose pinned host memory 'jax_pinned' uses (default: jax.devices()[0]).
  """
  _check_kind(kind)
  if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
    raise ValueError(f"nbytes: expected a positive int, got {nbytes!r}")
  nbytes = int(nbytes)
  if kind == "numpy":
    return np.empty(nbytes, np.uint8)
  if kind == "jax_pinned":
    return _register(_jax_pinned(nbytes, device or jax.devices()[0]))
  return _register(_cuda_registered(nbytes))


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
  """The CUDA runtime library that jax's CUDA plugin ships (nvidia-cuda-runtime), or the system's."""
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
