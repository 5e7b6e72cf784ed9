"""Host <-> device copies (the paper's CNIC-assisted H2D / D2H, PAPER.md section 4.2).

H2D stages through pinned host memory where the backend has it and it is a separate memory: on
GPUs a pageable numpy buffer moves at ~9 GB/s and a pinned one at ~54 GB/s (DESIGN.md, H200), so
`host_to_device` first places the array in the 'pinned_host' memory of the destination devices and
then copies it into device memory. CPU backends also list a 'pinned_host' memory kind, but it is
the same RAM as the "device": staging there would only add a copy, so on CPU the copy goes
straight to the device. Nor is a source staged that is already page-locked memory of
transfer.pinned_memory (the node buffers under runtime.host_memory 'jax_pinned' or
'cuda_registered'): from there one 64 MiB copy took ~1.9 ms against ~15 ms from numpy (4x H100,
docs/perf/gpu_bench.md record 6).

Aliasing: jax.device_put of a suitably aligned numpy array may alias it on CPU (even with
may_alias=False, measured with jax 0.10.2), so a later write into a reused host buffer would
change the "device" array. `host_to_device` therefore copies unless the caller hands the buffer
over for good (copy=False).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding

from dualpath_jax.kvstore import host_copy
from dualpath_jax.transfer import pinned_memory
from dualpath_jax.transfer.device_move import Destination, destination_sharding

PINNED_HOST = "pinned_host"
STAGING_MODES = ("auto", "pinned", "direct")
D2H_STAGING_MODES = (*STAGING_MODES, "cuda_memcpy")
"""D2H also has 'cuda_memcpy': the CUDA runtime copies from the GPU straight into `out`
(pinned_memory.cuda_copy_to_host), one DMA with no host copy when `out` is page-locked."""


def has_pinned_host(sharding: Sharding) -> bool:
  """True if every device of `sharding` offers a 'pinned_host' memory kind."""
  for device in sharding.device_set:
    try:
      kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001  (backends without memory-kind support raise various errors)
      return False
    if PINNED_HOST not in kinds:
      return False
  return True


def _use_pinned(sharding: Sharding, staging: str, source: np.ndarray | None = None) -> bool:
  if staging not in STAGING_MODES:
    raise ValueError(f"staging: expected one of {list(STAGING_MODES)}, got {staging!r}")
  if staging == "direct":
    return False
  supported = has_pinned_host(sharding)
  if staging == "pinned":
    if not supported:
      raise ValueError("staging: 'pinned' asked for, but the destination has no pinned_host memory")
    return True
  on_cpu = all(d.platform == "cpu" for d in sharding.device_set)
  if source is not None and pinned_memory.is_page_locked(source):
    return False  # already page-locked (a node buffer's arena): staging would only add a copy
  return supported and not on_cpu


def host_to_device(host_array: np.ndarray, dst: Destination, *, copy: bool = True,
                   staging: str = "auto") -> jax.Array:
  """Copies a host array onto an engine's devices (replicated) or onto a given sharding.

  Args:
    host_array: the bytes to move. Write it again only once the result is ready: on GPUs a
      device_put may still be reading it when it returns (one call at a time was 7x slower than
      several in flight, docs/perf/gpu_bench.md record 5), so the runtime waits for the device
      array (DecodeWorker._admit_landed) or for the forward that consumed it.
    dst: an Engine (the array lands replicated on its devices) or a Sharding.
    copy: False only when the caller never writes `host_array` again (it may be aliased on CPU;
      on other backends no copy is made).
    staging: 'auto' (pinned staging where it is a separate memory and `host_array` is not
      already page-locked memory of transfer.pinned_memory), 'pinned', or 'direct'
      (jax.device_put from the caller's memory: on 4x H200 with jax 0.11.2 that ran at 53 GB/s,
      the pinned rate, against ~31 GB/s through the staging copy; docs/perf/gpu_bench.md).
  """
  sharding = destination_sharding(dst)
  host_array = np.asarray(host_array)
  if _use_pinned(sharding, staging, host_array):
    staged = jax.device_put(host_array, sharding.with_memory_kind(PINNED_HOST))
    return jax.device_put(staged, sharding.with_memory_kind("device"))
  if copy and any(d.platform == "cpu" for d in sharding.device_set):
    host_array = np.array(host_array, copy=True)
  return jax.device_put(host_array, sharding)


def _pinned_host_view(x: jax.Array) -> np.ndarray:
  """x copied into the backend's pinned host memory, seen as numpy without another copy where
  the backend gives its pointer (pinned_memory.host_view) or exports it over DLPack (else
  through np.asarray, one host copy more)."""
  staged = jax.device_put(x, x.sharding.with_memory_kind(PINNED_HOST))
  view = pinned_memory.host_view(staged)
  if view is not None:
    return view
  try:
    return np.from_dlpack(staged)
  except (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError):
    return np.asarray(staged)


def start_device_to_host(x: jax.Array, staging: str = "direct") -> jax.Array:
  """Starts x's copy to host memory and returns what device_to_host(..., staging) should then be
  given: x itself with its host copy under way ('direct'), or x's copy in the backend's pinned
  host memory, queued ('pinned', or 'auto' where that is pinned). Starting every piece of a move
  first lets the copies run while the earlier pieces are read."""
  if not isinstance(x, jax.Array):
    raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
  if staging == "cuda_memcpy":
    return x  # nothing to queue: the copy itself is one synchronous DMA
  if _use_pinned(x.sharding, staging):
    return jax.device_put(x, x.sharding.with_memory_kind(PINNED_HOST))
  x.copy_to_host_async()
  return x


def device_to_host(x: jax.Array, out: np.ndarray | None = None, *,
                   staging: str = "direct", axis: int | None = None) -> np.ndarray:
  """Copies a device array to host memory; into `out` (same shape and dtype) when given.

  With `axis`, `out` may be shorter than x along that axis: x's leading entries fill it (the rest
  is padding that keeps the number of compiled shapes on the device small).

  staging: 'direct' (np.asarray: the backend copies into a fresh host allocation), 'pinned'
  (device_put into the backend's pinned host memory, whose allocator reuses its blocks, then a
  threaded host copy into `out`), or 'auto' (pinned where it is a separate memory, as for H2D).
  'direct' measured 1.3 GB/s for 64 MiB layers into fresh arrays, 'pinned' 53.8 GB/s into pinned
  memory and 15.8 GB/s on into resident arrays (2x H200, docs/perf/gpu_bench.md record 6).
  'cuda_memcpy': the CUDA runtime copies into `out` directly (GPUs only; D2H_STAGING_MODES).
  A 'direct' D2H of 64 MiB also slowed the next run of H2Ds by 2-8 ms on an H200; 'pinned' and
  'cuda_memcpy' did not (docs/perf/gpu_bench.md record 12).
  x may already sit in pinned host memory (start_device_to_host).
  The result never aliases device memory the runtime may later reuse.
  """
  if not isinstance(x, jax.Array):
    raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
  if staging == "cuda_memcpy":
    out = np.empty(x.shape, x.dtype) if out is None else out
    return pinned_memory.cuda_copy_to_host(x, out, axis)
  pinned = _use_pinned(x.sharding, staging)
  if out is not None:
    head = out.shape == x.shape or (
        axis is not None and out.ndim == x.ndim and out.shape[axis] <= x.shape[axis]
        and out.shape[:axis] + out.shape[axis + 1:] == x.shape[:axis] + x.shape[axis + 1:])
    if not head or out.dtype != x.dtype:
      raise ValueError(f"out: expected {x.dtype} {list(x.shape)}"
                       f"{'' if axis is None else f' or shorter along axis {axis}'}, "
                       f"got {out.dtype} {list(out.shape)}")
    host = _pinned_host_view(x) if pinned else np.asarray(x)
    if out.shape != x.shape:
      host = host[(slice(None),) * axis + (slice(0, out.shape[axis]),)]
    return host_copy.copy(out, host)
  if pinned:
    view = _pinned_host_view(x)
    return host_copy.copy(np.empty(view.shape, view.dtype), view)
  return np.array(x, copy=True)
