"""One turn in flight through the runtime: what it is, where it runs, and when each step happened."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np


@dataclasses.dataclass(kw_only=True, eq=False)
class TurnRequest:
  """A turn of one agent, filled in as it moves from scheduler to PE to DE."""

  agent_id: str
  """The agent; also the store namespace of its blocks."""
  turn: int
  """Turn index within the agent's trajectory."""
  prompt: np.ndarray
  """[T] int32: context + append."""
  gen_tokens: int
  """Tokens to generate (forced length)."""
  hashes: list[str]
  """Chained hashes of the prompt's complete blocks."""
  hit_blocks: int
  """Leading blocks whose KV is read from the store (the rest is prefilled)."""
  block_tokens: int
  """Tokens per block."""
  # Placement (by the global scheduler).
  request_id: int = -1
  """Arrival number at the scheduler."""
  prefill_engine: int = -1
  decode_engine: int = -1
  read_split: tuple[int, int] = (0, 0)
  """Hit blocks read on the PE's node (the leading ones) and on the DE's node (the rest)."""
  # Filled in flight.
  read_futures: dict = dataclasses.field(default_factory=dict)
  """'pe'/'de' -> future of that side's storage-link read (list of Full Blocks or None)."""
  read_reservations: dict = dataclasses.field(default_factory=dict)
  """'pe'/'de' -> host-buffer reservation on that side's node for the blocks it reads."""
  read_kv: dict = dataclasses.field(default_factory=dict)
  """'pe'/'de' -> the KV that side read, layer-major [L, Cluster.read_rows, 2, H, D] in the
  side's reservation (Cluster.read_destination / land_read; set by PrefillShard._begin, kept
  until the first chunk ran)."""
  prefilled_tokens: int = 0
  """New tokens computed so far (chunked prefill: the cached length is hit + this)."""
  chunks: int = 0
  """PE forwards this request took part in."""
  de_reservation: object = None
  """Host-buffer reservation on the DE node for the prompt KV."""
  prompt_kv: np.ndarray | None = None
  """[L, T, 2, H, D]: the prompt KV assembled in the DE buffer."""
  first_token: int = -1
  generated: list[int] = dataclasses.field(default_factory=list)
  bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  """Bytes this turn moved per path."""
  times: dict[str, float] = dataclasses.field(default_factory=dict)
  """perf_counter timestamps: ready, placed, read_start, read_done, prefill_start, prefill_done,
  decode_start, first_token, second_token, last_token, done (persisted)."""
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  error: BaseException | None = None

  @property
  def hit_tokens(self) -> int:
    return self.hit_blocks * self.block_tokens

  @property
  def prompt_tokens(self) -> int:
    return int(self.prompt.shape[0])

  @property
  def new_tokens(self) -> int:
    return self.prompt_tokens - self.hit_tokens

  @property
  def read_side(self) -> str:
    """'pe', 'de', 'split' (both) or 'none' (no hit)."""
    pe, de = self.read_split
    return "split" if pe and de else "pe" if pe else "de" if de else "none"

  def reads_done(self) -> bool:
    return all(f.done() for f in self.read_futures.values())

  def release_reads(self) -> None:
    """Returns the read KV's host-buffer room; `read_kv` (views of it) goes with it."""
    for reservation in self.read_reservations.values():
      reservation.release()
    self.read_kv = {}

  def add_bytes(self, path: str, nbytes: int) -> None:
    self.bytes[path] = self.bytes.get(path, 0) + int(nbytes)
