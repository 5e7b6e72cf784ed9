"""Scheduling policies: pure functions over explicit state (no devices, no clocks, no threads).

The runtime and, later, the simulator call the same functions, so that their decisions agree on
the same state; tests build the states by hand.

  state.py         EngineLoad (seq, tok, read queue, free bytes of one engine), WaitingRequest
  inter_engine.py  PAPER.md 5.2-5.4: alpha/beta, PE selection (C2 before C3, never C1; [ours] the
                   groups' fetches interleaved, least summed tok first), DE phase 1
                   (groups by least summed tok) and phase 2 (HBM fit, the Z rule), the read side
                   (shorter read queue, ties to the PE) and, beyond the paper, a split read
  quota.py         PAPER.md 5.5: the cost model of a forward, its fit, compute-quota batches with
                   chunked prefill, and the token-budget baseline
  baselines.py     round robin over PEs and DEs (Basic; alternating read sides with the dual path)
"""

from dualpath_jax.scheduler.baselines import RoundRobinPlacer
from dualpath_jax.scheduler.inter_engine import (
    assign_decode_groups,
    choose_read_side,
    derive_alpha_beta,
    interleave_prefill_fetches,
    select_decode_engines,
    select_prefill_engines,
    split_read,
)
from dualpath_jax.scheduler.quota import (
    Chunk,
    CostModel,
    QueuedPrefill,
    attention_work,
    fit_cost_model,
    remainder,
    select_quota_batch,
    select_token_budget_batch,
)
from dualpath_jax.scheduler.state import EngineLoad, WaitingRequest

__all__ = [
    "Chunk",
    "CostModel",
    "EngineLoad",
    "QueuedPrefill",
    "RoundRobinPlacer",
    "WaitingRequest",
    "assign_decode_groups",
    "attention_work",
    "choose_read_side",
    "derive_alpha_beta",
    "fit_cost_model",
    "interleave_prefill_fetches",
    "remainder",
    "select_decode_engines",
    "select_prefill_engines",
    "select_quota_batch",
    "select_token_budget_batch",
    "split_read",
]
