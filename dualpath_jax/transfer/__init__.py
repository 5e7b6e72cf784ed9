"""Transfers: the only code that moves arrays between meshes, or between host and device.

  device_move.py  DeviceMover: device -> device between engines (PE <-> DE over NVLink / ICI),
                  by jax.device_put (DevicePutMover) or a shard_map ppermute (ShardMapMover);
                  `make_mover()` returns the measured-faster one (docs/perf/transfer.md).
  host_device.py  host_to_device (H2D, staged through pinned host memory where the backend has
                  a separate one and the source is not page-locked already) and device_to_host
                  (D2H; start_device_to_host queues one).
  pinned_memory.py  writable host arrays, pageable or page-locked (the node buffers' memory).

The runtime never calls these directly for KV: it goes through runtime.traffic.TrafficManager,
which orders KV moves behind model work, chunks them and counts their bytes.
"""

from dualpath_jax.transfer.device_move import (DEFAULT_MOVER, MOVER_NAMES, DeviceMover,
                                               DevicePutMover, ShardMapMover,
                                               destination_sharding, make_mover)
from dualpath_jax.transfer.host_device import (device_to_host, has_pinned_host, host_to_device,
                                               start_device_to_host)

__all__ = ["DEFAULT_MOVER", "MOVER_NAMES", "DeviceMover", "DevicePutMover", "ShardMapMover",
           "destination_sharding", "make_mover", "device_to_host", "has_pinned_host",
           "host_to_device", "start_device_to_host"]
