"""What the card can do on paper, whether pinned host memory works, host test data, and what a
benchmark script records about the run's machine.

Peak rates are datasheet numbers (dense bf16 tensor-core FLOP/s, HBM bytes/s) looked up by
`device.device_kind`; a run may override both (config), and must on a card not listed here.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

PINNED_HOST = "pinned_host"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CardSpec:
  """Datasheet ceilings of one accelerator."""

  name: str
  """What matched (a substring of device_kind), or 'override' / 'unknown'."""
  peak_flops: float | None
  """Dense bf16 FLOP/s (multiply-add = 2), or None when unknown."""
  hbm_bytes_per_s: float | None
  """Device-memory bandwidth, or None when unknown."""
  source: str
  """'datasheet (matched ...)', 'config override', or 'unknown'."""


# First match wins: the more specific names come first. Dense bf16 FLOP/s (no sparsity).
_DATASHEET = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H200", 989e12, 4.8e12),
    ("H100", 989e12, 3.35e12),  # SXM: 'NVIDIA H100 80GB HBM3'
    ("A100", 312e12, 2.0e12),
)


def detect_card(device: jax.Device, *, peak_flops: float = 0.0,
                hbm_bytes_per_s: float = 0.0) -> CardSpec:
  """The card's ceilings: nonzero overrides win; otherwise the datasheet table by device_kind."""
  kind = getattr(device, "device_kind", "") or ""
  match = next(((name, f, b) for name, f, b in _DATASHEET if name.lower() in kind.lower()), None)
  flops = peak_flops or (match[1] if match else None)
  hbm = hbm_bytes_per_s or (match[2] if match else None)
  if peak_flops or hbm_bytes_per_s:
    source = "config override" + (f" (datasheet for the rest: {match[0]})" if match else "")
  else:
    source = f"datasheet ({match[0]})" if match else "unknown"
  return CardSpec(name=match[0] if match else kind or "unknown", peak_flops=flops,
                  hbm_bytes_per_s=hbm, source=source)


def run_meta(device: jax.Device) -> dict:
  """Date, device, jax and Python versions and XLA_FLAGS: the head of a script's JSON `meta`."""
  return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), device=str(device),
              device_kind=device.device_kind, jax=jax.__version__,
              python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""))


def pinned_host_sharding(device: jax.Device) -> SingleDeviceSharding:
  return SingleDeviceSharding(device, memory_kind=PINNED_HOST)


def device_sharding(device: jax.Device) -> SingleDeviceSharding:
  return SingleDeviceSharding(device, memory_kind="device")


def probe_pinned_host(device: jax.Device) -> tuple[bool, str]:
  """(works, note): can a host array be placed in `device`'s pinned_host memory and copied in?"""
  try:
    kinds = sorted(m.kind for m in device.addressable_memories())
  except Exception as e:  # noqa: BLE001  (backends without memory kinds raise various errors)
    return False, f"addressable_memories() failed: {e!r}"
  if PINNED_HOST not in kinds:
    return False, f"no pinned_host memory on {device} (memories: {kinds})"
  try:
    data = np.arange(4096, dtype=np.uint8)
    staged = jax.device_put(data, pinned_host_sharding(device))
    if staged.sharding.memory_kind != PINNED_HOST:
      return False, f"device_put to pinned_host gave memory_kind {staged.sharding.memory_kind!r}"
    on_device = jax.device_put(staged, device_sharding(device))
    if not np.array_equal(np.asarray(on_device), data):
      return False, "pinned_host -> device copy changed the bytes"
  except Exception as e:  # noqa: BLE001
    return False, f"pinned_host round trip failed: {e!r}"
  return True, f"pinned_host works (memories: {kinds})"


def random_bytes(nbytes: int, seed: int = 0, *, tile_bytes: int = 16 << 20) -> np.ndarray:
  """`nbytes` uint8 of random data, fast: one random tile of <= tile_bytes repeated."""
  rng = np.random.default_rng(seed)
  tile = rng.integers(0, 256, min(nbytes, tile_bytes), dtype=np.uint8)
  return np.resize(tile, nbytes)


def random_normal_bits(nbytes: int, dtype: str, seed: int = 0, *,
                       tile_bytes: int = 16 << 20) -> np.ndarray:
  """`nbytes` uint8 holding standard-normal values of `dtype` (finite KV, unlike random bits)."""
  np_dtype = np.dtype(dtype)
  if nbytes % np_dtype.itemsize:
    raise ValueError(f"nbytes={nbytes} is not a multiple of the {dtype} item size")
  rng = np.random.default_rng(seed)
  tile = rng.standard_normal(min(nbytes, tile_bytes) // np_dtype.itemsize).astype(np_dtype)
  return np.resize(tile.view(np.uint8), nbytes)
