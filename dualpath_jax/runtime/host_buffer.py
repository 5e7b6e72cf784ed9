"""HostBuffer: the bounded host-memory buffer of one node (the paper's PE / DE buffer).

A request reserves the bytes of its Full Blocks before its read is queued on the node's storage
link, holds the blocks (numpy [n, L, B, W] uint8, as the store returns them) while its layers are
streamed to the prefill engine, and releases them when the last layer has left (PE side) or the
decode engine has taken the prompt KV onto its devices (DE side, PAPER.md section 2.4).

Memory: arrays a request builds in its reservation (`Reservation.empty`: the stacked read blocks,
the prompt KV in the DE buffer) come from the buffer's pool of reused host blocks, as the paper's
buffers are allocated once and reused. A fresh numpy array of a gigabyte is fresh pages that the
kernel faults in (and zeroes) on first write: on the 4x H200 host a host gather into fresh arrays
moved 9.8 against 32.0 GB/s into resident ones on 8 threads (docs/perf/gpu_bench.md, record 3).
Pool blocks come in size classes eight per power of two (at most 12.5% larger than asked for);
freed blocks wait for the next request of their class, and are dropped (largest first) when a new
block would take the pool past the buffer's capacity plus that rounding.

Pinned memory: pool blocks come from `allocate(nbytes)`, plain numpy by default. The cluster
passes transfer.pinned_memory.allocate of the runtime's `host_memory` kind, so on GPUs the blocks
can be page-locked and a device copy from them needs no staging copy. Page-locking is slow (a
first run allocating pinned blocks per size class spent 22% of basic's PE samples there, 4x H100),
so the buffer can be given its whole capacity once (`arena_memory`, which the cluster leases
from transfer.pinned_memory and returns at close for the next cluster) and carve blocks out of
it (first fit, freed blocks merge with free neighbours); a block that finds no room there
(fragmentation) comes from `allocate` as before and is counted in `arena_misses`. The store's
reads land in a pool block: the store writes each read block straight into its view of it
(Cluster.read_destination, KVBlockStore.read_blocks_into).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

import numpy as np


class Reservation:
  """Bytes of one node's host buffer held for one request, and the arrays that fill them."""

  def __init__(self, buffer: "HostBuffer", nbytes: int, request_id: object):
    self.buffer = buffer
    self.nbytes = nbytes
    """Bytes reserved."""
    self.request_id = request_id
    """Whose bytes these are (any hashable id), for debugging and accounting."""
    self.arrays: list[np.ndarray] = []
    """Arrays held in this reservation (Full Blocks [n, L, B, W] uint8, per read)."""
    self._pooled: list[np.ndarray] = []  # the buffer's pool blocks behind empty() arrays
    self._released = False

  @property
  def held_bytes(self) -> int:
    return sum(a.nbytes for a in self.arrays)

  @property
  def released(self) -> bool:
    return self._released

  def hold(self, array: np.ndarray) -> np.ndarray:
    """Keeps `array` in this reservation; it must fit in the bytes reserved."""
    if self._released:
      raise RuntimeError(f"reservation of request {self.request_id!r} was already released")
    if self.held_bytes + array.nbytes > self.nbytes:
      raise ValueError(f"array: {array.nbytes} bytes do not fit in the reservation of request "
                       f"{self.request_id!r} ({self.nbytes - self.held_bytes} of {self.nbytes} "
                       "bytes left)")
    self.arrays.append(array)
    return array

  def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array held in this reservation, on a block of the buffer's pool (reused
    memory: no page faults). It must not be used after release(), which returns the block."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if self._released:
      raise RuntimeError(f"reservation of request {self.request_id!r} was already released")
    if self.held_bytes + nbytes > self.nbytes:
      raise ValueError(f"shape {list(shape)} {dtype}: {nbytes} bytes do not fit in the "
                       f"reservation of request {self.request_id!r} "
                       f"({self.nbytes - self.held_bytes} of {self.nbytes} bytes left)")
    block = self.buffer._pool_take(nbytes)
    self._pooled.append(block)
    array = block[:nbytes].view(dtype).reshape(shape)
    self.arrays.append(array)
    return array

  def release(self) -> None:
    """Drops the held arrays and returns the bytes to the buffer (a second call does nothing)."""
    if not self._released:
      self._released = True
      self.arrays.clear()
      pooled, self._pooled = self._pooled, []
      self.buffer._give_back(self.nbytes, pooled)

  def __enter__(self) -> "Reservation":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class HostBuffer:
  """A byte budget of host memory on one node; reserve() blocks, try_reserve() does not."""

  def __init__(self, *, host_buffer_bytes: int, full_block_bytes: int, node_id: int = 0,
               allocate: Callable[[int], np.ndarray] | None = None,
               arena_memory: np.ndarray | None = None):
    if isinstance(full_block_bytes, bool) or not full_block_bytes > 0:
      raise ValueError(f"full_block_bytes must be positive, got {full_block_bytes!r}")
    if isinstance(host_buffer_bytes, bool) or not host_buffer_bytes >= full_block_bytes:
      raise ValueError(f"host_buffer_bytes: {host_buffer_bytes!r} is smaller than one Full Block "
                       f"({full_block_bytes} bytes)")
    self.capacity_bytes = int(host_buffer_bytes)
    self.full_block_bytes = int(full_block_bytes)
    self.node_id = node_id
    self._allocate = allocate or (lambda nbytes: np.empty(nbytes, np.uint8))
    self._used_bytes = 0
    self._peak_bytes = 0
    self._cond = threading.Condition()
    self._free_blocks: dict[int, list[np.ndarray]] = {}  # size class -> unused pool blocks
    self._pool_bytes = 0  # every pool block, in use or free
    self.pool_hits = 0
    """empty() calls served by a reused block (against `pool_misses`, fresh allocations)."""
    self.pool_misses = 0
    self.arena_misses = 0
    """Blocks that found no room in the arena and were allocated on their own."""
    self._arena = None
    if arena_memory is not None:
      if arena_memory.nbytes < self.capacity_bytes:
        raise ValueError(f"arena_memory: {arena_memory.nbytes} bytes, less than node "
                         f"{node_id}'s host_buffer_bytes ({self.capacity_bytes})")
      self._arena = Arena(arena_memory)

  def stats(self) -> dict:
    """Peak bytes reserved and where pool blocks came from (for run summaries)."""
    with self._cond:
      return dict(capacity_bytes=self.capacity_bytes, peak_bytes=self._peak_bytes,
                  pool_hits=self.pool_hits, pool_misses=self.pool_misses,
                  arena=self._arena is not None, arena_misses=self.arena_misses)

  @property
  def used_bytes(self) -> int:
    with self._cond:
      return self._used_bytes

  @property
  def free_bytes(self) -> int:
    with self._cond:
      return self.capacity_bytes - self._used_bytes

  @property
  def peak_bytes(self) -> int:
    """Most bytes ever reserved at once."""
    with self._cond:
      return self._peak_bytes

  def _check(self, nbytes: int) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
      raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    if nbytes > self.capacity_bytes:
      raise ValueError(f"nbytes: {nbytes} bytes can never fit in node {self.node_id}'s host buffer "
                       f"of {self.capacity_bytes} bytes (host_buffer_bytes)")

  def _take(self, nbytes: int, request_id: object) -> Reservation:
    self._used_bytes += nbytes
    self._peak_bytes = max(self._peak_bytes, self._used_bytes)
    return Reservation(self, int(nbytes), request_id)

  def try_reserve(self, nbytes: int, request_id: object = None) -> Reservation | None:
    """A reservation of `nbytes`, or None at once if they are not free now."""
    self._check(nbytes)
    with self._cond:
      if self.capacity_bytes - self._used_bytes < nbytes:
        return None
      return self._take(nbytes, request_id)

  def reserve(self, nbytes: int, request_id: object = None, *,
              timeout_s: float | None = None) -> Reservation:
    """A reservation of `nbytes`, waiting for releases; TimeoutError after `timeout_s`."""
    self._check(nbytes)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with self._cond:
      while self.capacity_bytes - self._used_bytes < nbytes:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
          raise TimeoutError(f"node {self.node_id}'s host buffer: {nbytes} bytes not free after "
                             f"{timeout_s} s ({self._used_bytes} of {self.capacity_bytes} in use)")
        self._cond.wait(remaining)
      return self._take(nbytes, request_id)

  def reserve_blocks(self, num_blocks: int, request_id: object = None, *,
                     timeout_s: float | None = None) -> Reservation:
    """reserve() of `num_blocks` Full Blocks."""
    return self.reserve(num_blocks * self.full_block_bytes, request_id, timeout_s=timeout_s)

  def _pool_take(self, nbytes: int) -> np.ndarray:
    """A 1-D uint8 pool block of at least `nbytes` (its size class), reused where one is free."""
    size = size_class(nbytes)
    with self._cond:
      if self._arena is not None:
        block = self._arena.take(nbytes)
        if block is not None:
          self.pool_hits += 1
          return block
        self.arena_misses += 1
      free = self._free_blocks.get(size)
      if free:
        self.pool_hits += 1
        return free.pop()
      self.pool_misses += 1
      limit = self.capacity_bytes + self.capacity_bytes // 8
      while self._pool_bytes + size > limit and self._free_blocks:
        largest = max(self._free_blocks)
        self._pool_bytes -= largest
        self._free_blocks[largest].pop()
        if not self._free_blocks[largest]:
          del self._free_blocks[largest]
      self._pool_bytes += size
    return self._allocate(size)

  def _give_back(self, nbytes: int, blocks: list[np.ndarray] = ()) -> None:
    with self._cond:
      self._used_bytes -= nbytes
      for block in blocks:
        if self._arena is None or not self._arena.give(block):
          self._free_blocks.setdefault(block.nbytes, []).append(block)
      self._cond.notify_all()


class Arena:
  """One host allocation carved into blocks: first fit, page-aligned; a freed block merges with
  its free neighbours. Not thread-safe: HostBuffer calls it under its lock."""

  ALIGN = 4096

  def __init__(self, memory: np.ndarray):
    self.memory = memory.reshape(-1).view(np.uint8)
    self._base = self.memory.ctypes.data
    self._free: list[tuple[int, int]] = [(0, self.memory.nbytes)]  # (offset, size), by offset
    self._taken: dict[int, int] = {}  # offset -> size

  @property
  def free_bytes(self) -> int:
    return sum(size for _, size in self._free)

  def take(self, nbytes: int) -> np.ndarray | None:
    """A block of at least `nbytes`, or None if no free run is that long."""
    size = -(-nbytes // self.ALIGN) * self.ALIGN
    for i, (offset, free) in enumerate(self._free):
      if free >= size:
        if free == size:
          del self._free[i]
        else:
          self._free[i] = (offset + size, free - size)
        self._taken[offset] = size
        return self.memory[offset:offset + size]
    return None

  def give(self, block: np.ndarray) -> bool:
    """Frees a block that take() returned; False (nothing done) for any other array."""
    offset = block.ctypes.data - self._base
    if offset not in self._taken or block.nbytes != self._taken[offset]:
      return False
    size = self._taken.pop(offset)
    i = bisect.bisect(self._free, (offset, 0))
    if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next run
      size += self._free.pop(i)[1]
    if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and the previous
      offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
      self._free[i - 1] = (offset, size)
    else:
      self._free.insert(i, (offset, size))
    return True


def size_class(nbytes: int) -> int:
  """`nbytes` rounded up to one of eight sizes per power of two (at most 12.5% more)."""
  if nbytes <= 4096:
    return 4096
  step = 1 << max(0, int(nbytes - 1).bit_length() - 4)  # 8 classes in (2^(k-1), 2^k]
  return -(-nbytes // step) * step
