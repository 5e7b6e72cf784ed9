"""The simple placement rule of the data-plane runtime (the full scheduler replaces it).

PE and DE are taken round robin; the read side is the PE's node in `basic` mode (the paper's
baseline reads on prefill nodes only) and, with the dual path on, the node (of the request's PE and
DE) whose storage link has the shorter read queue in tokens, ties going to the PE side.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadQueues:
  """Read queue of the two candidate nodes, in tokens (queued or in flight)."""

  pe_node_tokens: int
  """Read queue of the prefill engine's node."""
  de_node_tokens: int
  """Read queue of the decode engine's node."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
  """Where one request runs and which node's storage link reads its hit blocks."""

  prefill_engine: int
  """Index of the PE."""
  decode_engine: int
  """Index of the DE."""
  read_side: str
  """'pe' or 'de'."""


def place_round_robin(request_number: int, *, num_prefill_engines: int, num_decode_engines: int,
                      dual_path: bool, queues_of) -> Placement:
  """Placement of the `request_number`-th request (0-based).

  `queues_of(pe, de) -> ReadQueues` gives the read queues of the two nodes; it is called only with
  the dual path on.
  """
  pe = request_number % num_prefill_engines
  de = request_number % num_decode_engines
  side = "pe"
  if dual_path:
    queues = queues_of(pe, de)
    side = "de" if queues.de_node_tokens < queues.pe_node_tokens else "pe"
  return Placement(prefill_engine=pe, decode_engine=de, read_side=side)
