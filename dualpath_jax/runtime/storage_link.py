"""StorageLink: one node's path between the KV store and its host buffer (the paper's SNIC).

Each node owns one link with its own worker threads, so the links of different nodes run
concurrently and never wait on each other; reads and writes on one link have workers of their
own (a NIC is full duplex: persistence writes never delay the next turn's reads). The
scheduler reads `read_queue_tokens` (tokens of reads submitted and not yet completed) to pick the
read side of a request (PAPER.md section 5.4).

Bandwidth: uncapped (`link_bytes_per_s=None`), a link moves bytes as fast as the store and the
host allow. With a cap, a `LinkPacer` paces completions so that the link EMULATES A NIC OF THAT
SPEED: the store I/O itself runs at full speed, and a transfer is handed over once the emulated
wire has carried its bytes. The wire carries one transfer after another at the rate, and a
transfer's wire time may start when its store I/O starts (a NIC streams while the storage
serves), so a lone transfer takes max(store time, bytes / rate), not their sum. Reads and
writes have a wire each (a NIC is full duplex). An idle wire lends at most `burst_s` of credit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np


class BlockIO(Protocol):
  """What a link needs from a store (kvstore.KVBlockStore has it; tests use an in-memory fake)."""

  def read_blocks(self, namespace: str, hashes: Sequence[str]) -> list[np.ndarray | None]: ...

  def read_blocks_into(self, namespace: str, hashes: Sequence[str],
                       outs: Sequence[np.ndarray]) -> list[bool]: ...

  def write_blocks(self, namespace: str, hashes: Sequence[str], blocks: np.ndarray) -> object: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageLinkConfig:
  """Speed and concurrency of one node's storage link."""

  link_bytes_per_s: float | None = None
  """Emulated NIC speed in bytes/s per direction; None = the hardware's own limit."""
  burst_s: float = 0.005
  """Credit an idle wire lends, in seconds of traffic at link_bytes_per_s (bounds a burst)."""
  workers: int = 2
  """Threads that issue this link's store reads (and as many for its writes)."""

  def __post_init__(self):
    rate = self.link_bytes_per_s
    if rate is not None and (isinstance(rate, bool) or not rate > 0):
      raise ValueError(f"link_bytes_per_s must be positive or None, got {rate!r}")
    if not self.burst_s >= 0:
      raise ValueError(f"burst_s must be >= 0, got {self.burst_s!r}")
    if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers <= 0:
      raise ValueError(f"workers must be a positive int, got {self.workers!r}")


class TransferRecord(NamedTuple):
  """One completed read or write, for utilisation-over-time plots (time.perf_counter seconds)."""
  t_start: float
  t_end: float
  nbytes: int


class LinkPacer:
  """One direction of an emulated NIC: a wire that carries transfers one after another at
  `rate_bytes_per_s`. `pay(nbytes, since=t)` blocks until the wire has carried a transfer whose
  store I/O began at t: its wire time begins at the later of t - burst and the end of the
  previous transfer's wire time, and ends nbytes / rate later.

  Because the wire time may overlap the transfer's own store I/O, a lone transfer takes
  max(store time, bytes / rate - burst), as on a NIC that streams while the storage serves
  (until 2026-11-28 a token bucket paid only after the I/O, so a lone transfer took their sum:
  no capped read of docs/perf/gpu_bench.md record 7 took less than 1.37x its wire time).
  Transfers are charged in the order they finish their I/O; over any window the bytes handed
  over are at most rate * window + burst_bytes + one transfer's bytes.
  """

  def __init__(self, rate_bytes_per_s: float, burst_bytes: float, *, clock=time.perf_counter,
               sleep=time.sleep):
    self.rate_bytes_per_s = float(rate_bytes_per_s)
    self.burst_s = float(burst_bytes) / self.rate_bytes_per_s
    self._clock = clock  # injectable, so that tests check the pacing without wall-clock timing
    self._sleep = sleep
    self._wire_free_at = clock()  # starts with no credit
    self._lock = threading.Lock()

  def pay(self, nbytes: int, *, since: float | None = None) -> None:
    """Blocks until the wire has carried `nbytes` of a transfer that began at `since` (the
    clock's seconds; None: now)."""
    with self._lock:
      now = self._clock()
      began = now if since is None else min(since, now)
      wire_start = max(self._wire_free_at, began - self.burst_s)
      self._wire_free_at = wire_start + nbytes / self.rate_bytes_per_s
      wait_s = self._wire_free_at - now
    if wait_s > 0:
      self._sleep(wait_s)


def link_emulation(link_bytes_per_s: float | None) -> str:
  """What a run's links emulate, for its summary: named so that no capped number reads as
  hardware's."""
  if not link_bytes_per_s:
    return "uncapped"
  return ("paced wire over real store I/O per node (LinkPacer: transfers one after another at "
          "link_bytes_per_s, overlapping their store I/O), emulating a NIC of link_bytes_per_s")


def blocks_nbytes(blocks: Sequence[np.ndarray | None]) -> int:
  """Bytes of the blocks present in a read result (a missing block is None and counts 0)."""
  return sum(b.nbytes for b in blocks if b is not None)


class StorageLink:
  """The store <-> host path of one node, with a read queue, an optional cap and counters."""

  def __init__(self, store: BlockIO, *, node_id: int, config: StorageLinkConfig | None = None):
    self.store = store
    self.node_id = node_id
    self.config = config or StorageLinkConfig()
    rate = self.config.link_bytes_per_s
    burst = 0.0 if rate is None else rate * self.config.burst_s
    self._read_wire = None if rate is None else LinkPacer(rate, burst)
    self._write_wire = None if rate is None else LinkPacer(rate, burst)
    # Full duplex, like a NIC: reads and writes have their own workers (and wires), so a burst
    # of persistence writes never queues the next turn's reads behind it.
    self._read_pool = concurrent.futures.ThreadPoolExecutor(
        self.config.workers, thread_name_prefix=f"storage-link-{node_id}-read")
    self._write_pool = concurrent.futures.ThreadPoolExecutor(
        self.config.workers, thread_name_prefix=f"storage-link-{node_id}-write")
    self._lock = threading.Lock()
    self._read_queue_tokens = 0
    self._in_flight = 0
    self._busy_since = 0.0
    self._busy_s = 0.0
    self.bytes_read = 0
    """Bytes of blocks delivered by completed reads (missing blocks count 0)."""
    self.bytes_written = 0
    """Bytes of blocks handed to the store by completed writes."""
    self.read_records: list[TransferRecord] = []
    self.write_records: list[TransferRecord] = []

  # --- the scheduler's view --------------------------------------------------------------------

  @property
  def read_queue_tokens(self) -> int:
    """Tokens of reads submitted and not yet completed (queued or in flight)."""
    with self._lock:
      return self._read_queue_tokens

  @property
  def busy_s(self) -> float:
    """Seconds during which at least one read or write was in flight (until now)."""
    with self._lock:
      ongoing = time.perf_counter() - self._busy_since if self._in_flight else 0.0
      return self._busy_s + ongoing

  def describe(self) -> str:
    rate = self.config.link_bytes_per_s
    speed = ("uncapped (the store's and the host's own limit)" if rate is None else
             f"emulates a NIC of {rate / 1e6:.1f} MB/s per direction (paced wire overlapping real "
             f"store I/O, burst {rate * self.config.burst_s / 1e6:.3g} MB)")
    return f"StorageLink(node {self.node_id}): {speed}; {self.config.workers} workers"

  # --- I/O -------------------------------------------------------------------------------------

  def submit_read(self, namespace: str, hashes: Sequence[str], tokens: int, *,
                  on_bytes: Callable[[int], None] | None = None,
                  then: Callable[[list], object] | None = None,
                  into: Sequence[np.ndarray] | None = None) -> concurrent.futures.Future:
    """Queues a read of Full Blocks; the future gives one array (or None if missing) a hash.
    With `into` (one destination [L, B, W] a hash) the store writes each block straight into its
    destination (read_blocks_into) and the arrays given are those destinations.

    `tokens` is what the read adds to read_queue_tokens until it completes. `on_bytes(nbytes)` is
    called on success before the future completes (a done-callback would race with result()).
    `then(blocks)`, if given, runs on the link's worker after the read has left the link (its
    time is not the link's) and its result is the future's: where the blocks land on the host.
    """
    if tokens < 0:
      raise ValueError(f"tokens must be >= 0, got {tokens!r}")
    hashes = list(hashes)
    with self._lock:
      self._read_queue_tokens += tokens
    try:
      if into is None:
        io = lambda: self.store.read_blocks(namespace, hashes)  # noqa: E731
      else:
        into = list(into)
        def io():
          return self._landed(self.store.read_blocks_into(namespace, hashes, into), into)
      return self._read_pool.submit(self._run, "read", tokens, io, on_bytes, then)
    except BaseException:
      with self._lock:
        self._read_queue_tokens -= tokens
      raise

  def submit_write(self, namespace: str, hashes: Sequence[str], blocks: np.ndarray, *,
                   on_bytes: Callable[[int], None] | None = None) -> concurrent.futures.Future:
    """Queues a write of Full Blocks [n, L, B, W]; the future gives the store's result."""
    hashes = list(hashes)
    return self._write_pool.submit(self._run, "write", 0,
                             lambda: (self.store.write_blocks(namespace, hashes, blocks), blocks),
                             on_bytes)

  @staticmethod
  def _landed(flags: list[bool], into: list[np.ndarray]) -> list:
    """read_blocks_into's result in read_blocks' form: the landed destinations, None where a
    block did not land."""
    return [out if ok else None for ok, out in zip(flags, into)]

  def _run(self, op: str, tokens: int, io, on_bytes, then=None):
    result = self._io(op, tokens, io, on_bytes)
    return result if then is None else then(result)

  def _io(self, op: str, tokens: int, io, on_bytes):
    t_start = self._start()
    nbytes = 0
    try:
      if op == "read":
        result = io()
        nbytes = blocks_nbytes(result)
        wire = self._read_wire
      else:
        result, blocks = io()
        nbytes = int(np.asarray(blocks).nbytes)
        wire = self._write_wire
      if wire is not None:
        wire.pay(nbytes, since=t_start)
      if on_bytes is not None:
        on_bytes(nbytes)
      return result
    finally:
      self._finish(op, tokens, t_start, nbytes)

  def _start(self) -> float:
    now = time.perf_counter()
    with self._lock:
      if self._in_flight == 0:
        self._busy_since = now
      self._in_flight += 1
    return now

  def _finish(self, op: str, tokens: int, t_start: float, nbytes: int) -> None:
    now = time.perf_counter()
    with self._lock:
      self._in_flight -= 1
      if self._in_flight == 0:
        self._busy_s += now - self._busy_since
      record = TransferRecord(t_start, now, nbytes)
      if op == "read":
        self._read_queue_tokens -= tokens
        self.bytes_read += nbytes
        self.read_records.append(record)
      else:
        self.bytes_written += nbytes
        self.write_records.append(record)

  def close(self) -> None:
    self._read_pool.shutdown(wait=True)
    self._write_pool.shutdown(wait=True)

  def __enter__(self) -> "StorageLink":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
