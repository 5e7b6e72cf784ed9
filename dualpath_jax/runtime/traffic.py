"""TrafficManager: every KV movement of one engine, behind its model work (PAPER.md section 4).

The paper routes all of a GPU's traffic through its paired compute NIC and puts KV on a
low-priority InfiniBand virtual lane, so KV uses the links only when model communication leaves
them idle. On one host there are no virtual lanes to configure; what this class does instead:

  * priority gate: a model step runs inside `with tm.model_step():`. A KV piece that would start
    while steps are active waits until those steps have ended (a later step that starts
    meanwhile does not hold it again), at most `max_kv_wait_s` (the low lane's reserved share:
    KV is delayed, never starved). Moves issued from inside a step by the step's own thread go
    at once (layerwise prefill pulling its next layer; waiting would deadlock).
  * chunking: H2D, D2H and D2D moves are split along axis 0 into pieces of at most `chunk_bytes`
    (with the gate off, only H2D from pageable memory and D2H not by 'cuda_memcpy' are).
    With the gate on, each piece waits for the previous one to land before it is issued, so a
    model step queued on the device waits behind at most one chunk (JAX dispatch is
    asynchronous: without this every chunk would be enqueued ahead of the step). With the gate
    off (max_kv_wait_s = 0) pieces go back to back: one 64 MiB H2D piece at a time moved 4.4
    GB/s, back to back 32 GB/s (4x H200); 32 MiB pieces 5.7 against 33-35 GB/s (4x H100;
    2026-11-28, docs/perf/gpu_bench.md record 5): a single jax.device_put from pageable memory
    is slow, several in flight fill the link (from page-locked node buffers, runtime.host_memory,
    one at a time already moves 35-37 GB/s: record 6). D2H pieces then all start their copies
    (transfer.start_device_to_host) before the first is read; a 'cuda_memcpy' D2H is one move.
    Pieces are joined on the destination with one device-side concatenate.
  * counters: bytes per path (PATHS) and per link, and the seconds KV moves spent waiting.
  * move records: (t_start, t_end, path, source, destination) of every device-side move (H2D,
    D2H, D2D), from its first piece's issue to the return of the call (all pieces but the last
    have landed by then; the last may still be in flight). Decode step-time inflation is
    measured against them (runtime/metrics.py decode_inflation).

What it does not do: it cannot preempt a transfer already issued, does not shape bandwidth (the
storage links emulate NIC speeds; see storage_link.py), and does not emulate IB virtual lanes or
PCIe QoS. Store reads and writes do not touch the device, so they are not gated, only counted.
Cost of the gate: until 2026-11-27 a piece waited for an instant with no step active; a DE that
steps back to back leaves gaps shorter than a thread switch, so each piece waited the full
max_kv_wait_s and per-layer moves took seconds per request (4x H200, docs/perf/gpu_bench.md).
Now a piece waits at most for the steps running when it arrived. runtime.kv_max_wait_s sets
the cap (0 = gate off).
Its cost is measured as decode step-time inflation, by the benchmarks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.engines.topology import Engine
from dualpath_jax.runtime.storage_link import StorageLink
from dualpath_jax.transfer import device_move, host_device, pinned_memory

PATHS = ("store_read_pe_side", "store_read_de_side", "store_write", "h2d", "d2h", "d2d")
READ_SIDES = {"pe": "store_read_pe_side", "de": "store_read_de_side"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrafficConfig:
  """How KV moves yield to model work."""

  chunk_bytes: int = 4 << 20
  """Largest piece of one KV move issued at once; a model step waits behind at most one piece."""
  max_kv_wait_s: float = 0.05
  """Longest a KV piece waits for a gap in model work before it goes anyway."""
  h2d_staging: str = "auto"
  """transfer.host_to_device's staging for H2D moves: 'auto', 'pinned' or 'direct'."""
  d2h_staging: str = "direct"
  """transfer.device_to_host's staging for D2H moves: 'auto', 'pinned' or 'direct'."""

  def __post_init__(self):
    if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int) \
        or self.chunk_bytes <= 0:
      raise ValueError(f"chunk_bytes must be a positive int, got {self.chunk_bytes!r}")
    if not self.max_kv_wait_s >= 0:
      raise ValueError(f"max_kv_wait_s must be >= 0, got {self.max_kv_wait_s!r}")
    for field, modes in (("h2d_staging", host_device.STAGING_MODES),
                         ("d2h_staging", host_device.D2H_STAGING_MODES)):
      if getattr(self, field) not in modes:
        raise ValueError(f"{field}: expected one of {list(modes)}, got {getattr(self, field)!r}")


@jax.jit
def _concatenate(pieces):
  return jnp.concatenate(pieces, axis=0)


@functools.partial(jax.jit, static_argnames=("count",))
def _take_rows(x, start, count: int):
  return jax.lax.dynamic_slice_in_dim(x, start, count, axis=0)


def _piece(x: jax.Array, rows: slice) -> jax.Array:
  """x[rows] on the device with the start traced: one program per (shape, piece length). Eager
  x[a:b] compiles one program per distinct start as well: a whole-prefill handoff (a [L, T, ...]
  row in 64 MiB pieces) compiled a program per piece and row length. With it, that handoff
  still runs at ~0.9 GB/s: on 2x H200 (docs/perf/gpu_bench.md record 4) the thread samples put
  basic's PE 24% in the D2H into fresh host arrays, 15% in the copy from there, 9% compiling."""
  start, stop, _ = rows.indices(x.shape[0])
  return _take_rows(x, np.int32(start), stop - start)


@functools.partial(jax.jit, static_argnames=("batch_axis",))
def _row(x, row, batch_axis: int):
  """x[row] along batch_axis, as [L or 1, T, ...]. `row` is traced, so one program serves every
  row of a batch shape (TrafficManager.precompile_d2h_rows compiles it). Up to 2026-11-28 the
  head was cut on the device with sizes in admit_tokens buckets: up to 56 programs per batch
  shape, compiled inside the timed runs (2x H200, docs/perf/gpu_bench.md record 6)."""
  x = jax.lax.dynamic_index_in_dim(x, row, axis=batch_axis, keepdims=False)
  return x if batch_axis else x[None]  # [L or 1, T, ...]


def row_slices(shape: Sequence[int], itemsize: int, chunk_bytes: int) -> list[slice]:
  if not shape or shape[0] <= 1:
    return [slice(None)]
  row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
  rows = max(1, chunk_bytes // row_bytes)
  return [slice(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


class TrafficManager:
  """Owns the KV traffic of one engine: store I/O through links, H2D, D2H and D2D."""

  def __init__(self, engine: Engine, *, mover: device_move.DeviceMover | None = None,
               config: TrafficConfig | None = None):
    self.engine = engine
    self.mover = mover or device_move.make_mover()
    self.config = config or TrafficConfig()
    self._cond = threading.Condition()
    self._active_steps = 0
    self._ended_steps = 0
    self._local = threading.local()
    self._bytes_by_path = collections.Counter({p: 0 for p in PATHS})
    self._bytes_by_link: collections.Counter = collections.Counter()
    self._kv_wait_s = 0.0
    self._names: dict = {}  # sharding -> _name's answer
    self.move_records: list[tuple[float, float, str, str, str]] = []
    """(t_start, t_end, path, source, destination) per device move; perf_counter seconds; the
    ends are engine names (or 'host', or 'dev<ids>' for a bare sharding)."""

  # --- model work ------------------------------------------------------------------------------

  @contextlib.contextmanager
  def model_step(self):
    """Marks a model step as running on this engine; KV moves wait for it to end."""
    with self._cond:
      self._active_steps += 1
    self._local.depth = getattr(self._local, "depth", 0) + 1
    try:
      yield
    finally:
      self._local.depth -= 1
      with self._cond:
        self._active_steps -= 1
        self._ended_steps += 1
        self._cond.notify_all()

  def _wait_for_gap(self) -> None:
    if not self.gated or getattr(self._local, "depth", 0):
      return
    t0 = time.perf_counter()
    deadline = t0 + self.config.max_kv_wait_s
    with self._cond:
      # Steps end in any order, but every step active now ends before the count reaches this.
      target = self._ended_steps + self._active_steps
      while self._ended_steps < target and (remaining := deadline - time.perf_counter()) > 0:
        self._cond.wait(remaining)
      self._kv_wait_s += time.perf_counter() - t0

  # --- device moves ----------------------------------------------------------------------------

  @property
  def gated(self) -> bool:
    """True if KV pieces yield to model steps (max_kv_wait_s > 0): one piece in flight at once."""
    return self.config.max_kv_wait_s > 0

  def _chunked(self, shape, itemsize, issue, path: str, link: str, nbytes: int,
               ends: tuple[str, str], slices: list[slice] | None = None):
    t_start = time.perf_counter()
    pieces, previous = [], None
    for rows in row_slices(shape, itemsize, self.config.chunk_bytes) if slices is None else slices:
      if previous is not None and self.gated:
        jax.block_until_ready(previous)  # at most one piece ahead of a model step
      self._wait_for_gap()
      previous = issue(rows)
      pieces.append(previous)
    self._count(path, link, nbytes, (t_start, time.perf_counter(), path, *ends))
    return pieces

  def h2d(self, host_array: np.ndarray, dst: device_move.Destination | None = None) -> jax.Array:
    """Host -> device (default: replicated on this engine). host_array must not be written
    until the result is ready (transfer.host_to_device)."""
    host_array = np.asarray(host_array)
    dst = self.engine if dst is None else dst
    # Gate off, page-locked source: one copy already fills the link (record 6); pieces would
    # only add a join on the device.
    whole = not self.gated and pinned_memory.is_page_locked(host_array)
    pieces = self._chunked(host_array.shape, host_array.itemsize,
                           lambda rows: host_device.host_to_device(
                               host_array if whole else host_array[rows], dst,
                               staging=self.config.h2d_staging),
                           "h2d", f"host:{self._name(dst)}", host_array.nbytes,
                           ("host", self._name(dst)), [slice(None)] if whole else None)
    return pieces[0] if len(pieces) == 1 else _concatenate(pieces)

  def d2h(self, x: jax.Array, out: np.ndarray | None = None, axis: int | None = None
          ) -> np.ndarray:
    """Device -> host, into `out` when given (e.g. an array held in a host-buffer reservation);
    with `axis` > 0, `out` may be shorter than x along it (transfer.device_to_host)."""
    if axis == 0:
      raise ValueError("axis: the leading axis is the one moves are chunked along; use axis > 0")
    out = np.empty(x.shape, x.dtype) if out is None else out
    # 'cuda_memcpy' is one 2-D DMA straight into `out`: pieces would only add a program per
    # piece length (_piece) and a copy each.
    slices = ([slice(None)] if self.config.d2h_staging == "cuda_memcpy" else
              row_slices(x.shape, x.dtype.itemsize, self.config.chunk_bytes))
    started = {}
    if not self.gated and len(slices) > 1:
      # Gate off: every piece's copy starts now; each is read (and copied into `out`) in turn.
      for rows in slices:
        started[rows.start] = host_device.start_device_to_host(_piece(x, rows),
                                                               self.config.d2h_staging)
    self._chunked(x.shape, x.dtype.itemsize,
                  lambda rows: host_device.device_to_host(
                      x if len(slices) == 1 else started[rows.start] if started
                      else _piece(x, rows),
                      out[rows], staging=self.config.d2h_staging, axis=axis),
                  "d2h", f"host:{self._name(x.sharding)}", x.nbytes,
                  (self._name(x.sharding), "host"), slices)
    return out

  def d2h_rows(self, x: jax.Array, copies: Sequence[tuple[int, np.ndarray]], batch_axis: int
               ) -> list[int]:
    """Batch rows of x ([B, T, ...] for batch_axis 0, [L, B, T, ...] for 1) into host arrays:
    copies is [(row, out)], out [1 or L, count, ...] with count <= T (the row's first `count`
    tokens land). Returns the bytes each copy moved. 'cuda_memcpy': one wait for x and a 2-D
    copy a row straight from its buffer (pinned_memory.cuda_copy_rows_to_host), the bytes that
    land; otherwise each row is cut on the device (_row) and moves whole, padding included."""
    if self.config.d2h_staging != "cuda_memcpy":
      moved = []
      for row, out in copies:
        part = _row(x, np.int32(row), batch_axis)
        self.d2h(part, out=out, axis=1)
        moved.append(part.nbytes)
      return moved
    t_start = time.perf_counter()
    self._wait_for_gap()
    pinned_memory.cuda_copy_rows_to_host(x, copies, batch_axis)
    moved = [out.nbytes for _, out in copies]
    self._count("d2h", f"host:{self._name(x.sharding)}", sum(moved),
                (t_start, time.perf_counter(), "d2h", self._name(x.sharding), "host"))
    return moved

  def precompile_d2h_rows(self, x: jax.Array, batch_axis: int) -> None:
    """Compiles what d2h_rows runs on the device for a batch array of x's shape (the row cut,
    unless the CUDA runtime copies the rows)."""
    if self.config.d2h_staging != "cuda_memcpy":
      jax.block_until_ready(_row(x, np.int32(0), batch_axis))

  def d2d(self, x: jax.Array, dst: device_move.Destination) -> jax.Array:
    """Device -> device onto another engine (or sharding), through the mover; in pieces only
    with the gate on (off, pieces would only add a cut on the source and a join on the
    destination per piece)."""
    slices = (row_slices(x.shape, x.dtype.itemsize, self.config.chunk_bytes) if self.gated
              else [slice(None)])
    src_name, dst_name = self._name(x.sharding), self._name(dst)
    link = f"d2d:{src_name}->{dst_name}"
    pieces = self._chunked(x.shape, x.dtype.itemsize,
                           lambda rows: self.mover.move(x if len(slices) == 1 else _piece(x, rows),
                                                        dst),
                           "d2d", link, x.nbytes, (src_name, dst_name), slices)
    return pieces[0] if len(pieces) == 1 else _concatenate(pieces)

  def precompile_moves(self, shape, dtype, *, page_locked: bool,
                       d2d_to: device_move.Destination | None = None) -> None:
    """Compiles, on zeros and moving no bytes, the device programs that h2d of a host array of
    `shape` (from page-locked memory or not) runs onto this engine, and with `d2d_to` those that
    d2d of the result onto it runs: the cuts and the joins of their pieces. (Moving real bytes to
    compile them cost start-up up to ~22 GB of H2D a PE for whole-prefix prefill.)"""
    dtype = np.dtype(dtype)

    def join(slices, sharding):
      if len(slices) > 1:
        jax.block_until_ready(_concatenate([
            jnp.zeros((s.stop - s.start, *shape[1:]), dtype, device=sharding) for s in slices]))

    here = self.engine.replicated_sharding
    whole = not self.gated and page_locked
    join([slice(None)] if whole else row_slices(shape, dtype.itemsize, self.config.chunk_bytes),
         here)
    if d2d_to is not None and self.gated:  # gate off, a D2D goes whole
      slices = row_slices(shape, dtype.itemsize, self.config.chunk_bytes)
      x = jnp.zeros(shape, dtype, device=here)
      if len(slices) > 1:
        jax.block_until_ready([_piece(x, rows) for rows in slices])
      join(slices, device_move.destination_sharding(d2d_to))

  # --- store I/O -------------------------------------------------------------------------------

  def read(self, link: StorageLink, namespace: str, hashes: Sequence[str], tokens: int, *,
           side: str, into=None, then=None) -> concurrent.futures.Future:
    """Queues a Full-Block read on `link`; `side` is 'pe' or 'de' (which node's link reads);
    `into`: the blocks' destinations, `then(blocks)` after they arrived
    (StorageLink.submit_read)."""
    if side not in READ_SIDES:
      raise ValueError(f"side: expected 'pe' or 'de', got {side!r}")
    return link.submit_read(namespace, hashes, tokens, on_bytes=lambda nbytes: self._count(
        READ_SIDES[side], f"storage:node{link.node_id}", nbytes), then=then, into=into)

  def write(self, link: StorageLink, namespace: str, hashes: Sequence[str], blocks: np.ndarray
            ) -> concurrent.futures.Future:
    """Queues a Full-Block write [n, L, B, W] on `link` (persistence of completed blocks)."""
    return link.submit_write(namespace, hashes, blocks, on_bytes=lambda nbytes: self._count(
        "store_write", f"storage:node{link.node_id}", nbytes))

  # --- counters --------------------------------------------------------------------------------

  def _count(self, path: str, link: str, nbytes: int, record: tuple | None = None) -> None:
    """Adds a move's bytes (and its move record, if given) under one lock."""
    with self._cond:
      self._bytes_by_path[path] += nbytes
      self._bytes_by_link[link] += nbytes
      if record is not None:
        self.move_records.append(record)

  def _name(self, where) -> str:
    if isinstance(where, Engine):
      return where.name
    name = self._names.get(where)
    if name is None:
      devices = device_move.ordered_devices(where)
      name = (self.engine.name if set(devices) == set(self.engine.devices)
              else "dev" + "+".join(str(d.id) for d in devices))
      self._names[where] = name
    return name

  @property
  def bytes_by_path(self) -> dict[str, int]:
    """Bytes moved per path (keys: PATHS), completed moves only for store I/O."""
    with self._cond:
      return dict(self._bytes_by_path)

  @property
  def bytes_by_link(self) -> dict[str, int]:
    """Bytes per link: 'storage:node<i>', 'host:<engine>', 'd2d:<src>-><dst>'."""
    with self._cond:
      return dict(self._bytes_by_link)

  @property
  def kv_wait_s(self) -> float:
    """Seconds KV pieces spent waiting for gaps in model work."""
    with self._cond:
      return self._kv_wait_s

  def describe(self) -> str:
    return (f"TrafficManager({self.engine.name}): model work first, KV pieces of <= "
            f"{self.config.chunk_bytes} bytes wait <= {self.config.max_kv_wait_s} s for a gap; "
            f"mover={self.mover.name}; no IB virtual lanes or PCIe QoS emulated")
