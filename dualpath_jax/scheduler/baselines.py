"""Load-oblivious placement baselines: round robin over PEs and DEs.

With the dual path off this is the paper's Basic (every read on the PE's node); with it on, the
read side alternates PE, DE, PE, ... regardless of load: the round-robin baseline the paper's
SNIC-balance result (1.53 vs 1.18 for DualPath) compares against.
"""

from __future__ import annotations


class RoundRobinPlacer:
  """Places the n-th request (0-based) on PE n % P and DE n % D; pure apart from its counter."""

  def __init__(self, *, num_prefill_engines: int, num_decode_engines: int):
    for name, value in (("num_prefill_engines", num_prefill_engines),
                        ("num_decode_engines", num_decode_engines)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    self.num_prefill_engines = num_prefill_engines
    self.num_decode_engines = num_decode_engines
    self.placed = 0
    """Requests placed so far (the next request's number)."""

  def place(self, *, dual_path: bool) -> tuple[int, int, str]:
    """(pe, de, read_side) of the next request.

    read_side is always 'pe' without the dual path; with it, 'pe' for even request numbers and
    'de' for odd ones.
    """
    n = self.placed
    self.placed += 1
    side = "de" if dual_path and n % 2 == 1 else "pe"
    return n % self.num_prefill_engines, n % self.num_decode_engines, side
