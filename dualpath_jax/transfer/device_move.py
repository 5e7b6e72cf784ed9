"""Device-to-device moves between engines (the paper's PE <-> DE RDMA over the compute network).

Two implementations behind one interface, because which is faster depends on the backend
(docs/perf/transfer.md has the measurements):

  DevicePutMover  jax.device_put to the destination sharding; the runtime picks the copy path.
  ShardMapMover   a ppermute collective under jax.shard_map (NCCL on GPUs, ICI on TPUs): the
                  source shards and a placeholder on the destination form one array over a
                  transfer submesh (source devices + destination devices, axis DEVICE_AXIS);
                  ppermute sends shard i of the source to device i of the destination.

The submesh holds only the devices that take part, not the whole global mesh: a ppermute over the
global mesh would need an input buffer and allocate an output on every device for each move.
"""

from __future__ import annotations

import abc
import collections
import threading
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from dualpath_jax.engines.topology import Engine
from dualpath_jax.sharding import DEVICE_AXIS

Destination = Union[Engine, Sharding]
MOVER_NAMES = ("device_put", "shard_map")
# Measured on the 2-core CPU sandbox (docs/perf/transfer.md); GPU numbers still to be measured.
DEFAULT_MOVER = "device_put"


def destination_sharding(dst: Destination) -> Sharding:
  """The sharding a move to `dst` produces: an engine's replicated sharding, or `dst` itself."""
  if isinstance(dst, Engine):
    return dst.replicated_sharding
  if isinstance(dst, Sharding):
    return dst
  raise TypeError(f"dst: expected an Engine or a jax.sharding.Sharding, got {type(dst).__name__}")


def ordered_devices(sharding: Sharding) -> tuple[jax.Device, ...]:
  """Devices of a sharding in a fixed order: mesh order for NamedSharding, else by device id."""
  if isinstance(sharding, NamedSharding):
    return tuple(sharding.mesh.devices.flat)
  return tuple(sorted(sharding.device_set, key=lambda d: d.id))


class DeviceMover(abc.ABC):
  """Moves a jax.Array onto the devices of another engine (or onto a given sharding)."""

  name: str

  @abc.abstractmethod
  def move(self, x: jax.Array, dst: Destination) -> jax.Array:
    """Returns a copy of `x` laid out as `destination_sharding(dst)`; `x` is left as it was."""


class DevicePutMover(DeviceMover):
  """jax.device_put to the destination sharding."""

  name = "device_put"

  def move(self, x: jax.Array, dst: Destination) -> jax.Array:
    if not isinstance(x, jax.Array):
      raise TypeError(f"x: expected a jax.Array on a device, got {type(x).__name__}")
    return jax.device_put(x, destination_sharding(dst))


class ShardMapMover(DeviceMover):
  """A shard_map ppermute from the source devices to the destination devices.

  Moves shard for shard: the source and destination shardings must have as many devices, and the
  i-th device of each (mesh order) must hold the same slice of the array (true for an array
  replicated within an engine moved to another engine of the same size).
  One compiled program and one placeholder buffer (as big as one shard) are cached per
  (source devices, destination devices, shard shape, dtype); the least recently used beyond
  `max_cached` are dropped.
  """

  name = "shard_map"

  def __init__(self, *, max_cached: int = 64):
    self._max_cached = max_cached
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def move(self, x: jax.Array, dst: Destination) -> jax.Array:
    if not isinstance(x, jax.Array):
      raise TypeError(f"x: expected a jax.Array on a device, got {type(x).__name__}")
    dst_sharding = destination_sharding(dst)
    src_devices, dst_devices = ordered_devices(x.sharding), ordered_devices(dst_sharding)
    if set(src_devices) == set(dst_devices):
      return jax.device_put(x, dst_sharding)  # same devices: a relayout at most, no link crossed
    if set(src_devices) & set(dst_devices) or len(src_devices) != len(dst_devices):
      raise ValueError(f"dst: ShardMapMover needs disjoint device sets of equal size, got source "
                       f"{[d.id for d in src_devices]} and destination "
                       f"{[d.id for d in dst_devices]}")
    src_index = x.sharding.devices_indices_map(x.shape)
    dst_index = dst_sharding.devices_indices_map(x.shape)
    if any(src_index[s] != dst_index[d] for s, d in zip(src_devices, dst_devices)):
      raise ValueError("dst: ShardMapMover moves shard for shard; source and destination shardings "
                       "split the array differently (use DevicePutMover)")
    shards = {s.device: s.data for s in x.addressable_shards}
    shard_shape = shards[src_devices[0]].shape
    if len(shard_shape) == 0:
      return self.move(x.reshape(1), dst).reshape(())  # ppermute stacks along axis 0
    program, placeholders, global_sharding = self._compiled(
        src_devices, dst_devices, shard_shape, x.dtype)
    k = len(src_devices)
    global_shape = (2 * k * shard_shape[0], *shard_shape[1:])
    stacked = jax.make_array_from_single_device_arrays(
        global_shape, global_sharding, [shards[d] for d in src_devices] + placeholders)
    out = program(stacked)
    received = {s.device: s.data for s in out.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, dst_sharding, [received[d] for d in dst_devices])

  def _compiled(self, src_devices, dst_devices, shard_shape, dtype):
    key = (tuple(d.id for d in src_devices), tuple(d.id for d in dst_devices), shard_shape,
           np.dtype(dtype).str)
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
    k = len(src_devices)
    mesh = Mesh(np.array(src_devices + dst_devices, dtype=object), (DEVICE_AXIS,),
                axis_types=(AxisType.Auto,))
    spec = PartitionSpec(DEVICE_AXIS)
    perm = [(i, k + i) for i in range(k)]

    # Send raw bits: XLA:CPU's ppermute is ~5x slower on bfloat16 than on uint16 of the same
    # bytes (jax 0.10.2), and an integer payload can never have its NaNs canonicalised.
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}.get(np.dtype(dtype).itemsize)

    def send(block):
      if bits is None or np.dtype(dtype) == np.dtype(bits):
        return jax.lax.ppermute(block, DEVICE_AXIS, perm)
      raw = jax.lax.ppermute(jax.lax.bitcast_convert_type(block, bits), DEVICE_AXIS, perm)
      return jax.lax.bitcast_convert_type(raw, dtype)

    program = jax.jit(jax.shard_map(send, mesh=mesh, in_specs=spec, out_specs=spec,
                                    check_vma=False))
    # Never donated and never written: one zero buffer per destination device serves every move.
    placeholders = [jax.device_put(np.zeros(shard_shape, dtype), d) for d in dst_devices]
    entry = (program, placeholders, NamedSharding(mesh, spec))
    with self._lock:
      self._cache[key] = entry
      while len(self._cache) > self._max_cached:
        self._cache.popitem(last=False)
    return entry


def make_mover(name: str = DEFAULT_MOVER) -> DeviceMover:
  """A DeviceMover by name: 'device_put' or 'shard_map'."""
  if name == "device_put":
    return DevicePutMover()
  if name == "shard_map":
    return ShardMapMover()
  raise ValueError(f"mover: expected one of {list(MOVER_NAMES)}, got {name!r}")
