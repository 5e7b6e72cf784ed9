"""What the scheduler sees on each fetch: engine load reports and waiting requests (PAPER.md 5.1).

Plain records, built by the runtime (or the simulator, or a test) from its own state; the policies
in `inter_engine` read them and never mutate them.
"""

from __future__ import annotations

import dataclasses


def _check_non_negative_ints(record, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(record, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{type(record).__name__}.{name} must be a non-negative int, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineLoad:
  """One engine's load report on a fetch (seq_e, tok_e, read_q of its node)."""

  engine: int
  """Index of the engine among the engines of its role (PEs or DEs)."""
  group: int
  """Its group: the node id (all engines of one node form one group)."""
  seq: int
  """Unfinished requests assigned to it."""
  tok: int
  """Unfinished tokens assigned to it (the balancing proxy for GPU, read and network load)."""
  read_queue_tokens: int
  """Its node's storage read queue (queued or in flight), in tokens."""
  free_bytes: int = 0
  """Free device memory for KV, in bytes (DEs only; 0 for PEs)."""

  def __post_init__(self):
    _check_non_negative_ints(self, ("engine", "group", "seq", "tok", "read_queue_tokens",
                                    "free_bytes"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class WaitingRequest:
  """A request waiting for an engine (a PE, a DE group or a DE)."""

  request_id: int
  """The request's id (unique among waiting requests)."""
  total_tokens: int
  """len_r: the whole prompt (context + append), in tokens."""
  new_tokens: int
  """Tokens a PE must compute: the prompt minus its storage hit."""
  kv_bytes: int
  """DE device memory the request needs (prompt and generation KV), in bytes."""

  def __post_init__(self):
    _check_non_negative_ints(self, ("total_tokens", "new_tokens", "kv_bytes"))
    if self.new_tokens > self.total_tokens:
      raise ValueError(f"WaitingRequest.new_tokens ({self.new_tokens}) exceeds total_tokens "
                       f"({self.total_tokens})")
