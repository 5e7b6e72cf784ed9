"""Checking what a timed run moved, on the device, without copying it back to the host.

The benchmarks check every run's output outside the clock. Up to 2026-11-29 they did so by
np.asarray of the moved layers (a D2H into fresh host memory), and that slowed the next timed
H2D run: on one H200 with jax 0.11.2, 28 layers of 64 MiB moved in 34.8 ms after nothing, a
tiny D2H or a device-side compare, and in 39-43 ms after np.asarray of two of the layers, even
with 1 s of sleep in between (docs/perf/gpu_bench.md record 12). The data plane's k = 0 rows
read 80-88% of the ceiling for that reason alone. So the bytes are compared on the device, and
only the verdict (one bool) crosses to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _bytes(x: jax.Array) -> jax.Array:
  """x's bytes as a flat uint8 array, in the order numpy's .view(np.uint8) sees them (host and
  device are both little-endian)."""
  if x.dtype != jnp.uint8:
    x = lax.bitcast_convert_type(x, jnp.uint8)  # a trailing axis of itemsize bytes
  return x.reshape(-1)


@jax.jit
def _bytes_equal(parts: Sequence[jax.Array], want: jax.Array) -> jax.Array:
  got = jnp.concatenate([_bytes(p) for p in parts]) if len(parts) > 1 else _bytes(parts[0])
  return jnp.array_equal(got, want)


_bytes_jit = jax.jit(_bytes)


def expected_bytes(source: np.ndarray | jax.Array, like: jax.Array) -> jax.Array:
  """`source`'s bytes (a host array, or a device array: no D2H) placed where `like` lies."""
  if isinstance(source, jax.Array):
    return jax.device_put(_bytes_jit(source), like.sharding)
  flat = np.ascontiguousarray(source).reshape(-1).view(np.uint8)
  return jax.device_put(flat, like.sharding)


def device_bytes_equal(parts: Sequence[jax.Array], want: jax.Array) -> bool:
  """True if the bytes of `parts`, one after another, equal `want` (uint8 from expected_bytes).

  Compared by the device(s) holding them: no D2H of the parts (see the module doc). A part on
  another device than `want` is rejected rather than copied."""
  parts = list(parts)
  if not parts:
    raise ValueError("parts: expected at least one array")
  if any(p.sharding.device_set != want.sharding.device_set for p in parts):
    return False
  if sum(p.nbytes for p in parts) != want.nbytes:
    return False
  return bool(_bytes_equal(parts, want))
