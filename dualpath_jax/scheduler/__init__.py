"""Scheduling policies: pure functions over explicit state (no devices, no clocks).

`simple` holds the placement rules of the data-plane runtime (round-robin engines; the read side
is the node with the shorter read queue). The runtime and, later, the simulator call the same
functions, so that their decisions agree on the same state.
"""

from dualpath_jax.scheduler.simple import Placement, ReadQueues, place_round_robin

__all__ = ["Placement", "ReadQueues", "place_round_robin"]
