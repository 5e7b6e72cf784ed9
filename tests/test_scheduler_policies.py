"""Scheduling policies on hand-built states: every rule of PAPER.md 5 and its boundaries.

No jax: the policies are pure (state in, decisions out), and a subprocess checks that importing
them never imports jax.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax.runtime.metrics import attn_balance, snic_balance
from dualpath_jax.scheduler import (
    Chunk,
    CostModel,
    EngineLoad,
    QueuedPrefill,
    RoundRobinPlacer,
    WaitingRequest,
    assign_decode_groups,
    attention_work,
    choose_read_side,
    derive_alpha_beta,
    fit_cost_model,
    interleave_prefill_fetches,
    remainder,
    select_decode_engines,
    select_prefill_engines,
    select_quota_batch,
    select_token_budget_batch,
    split_read,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
PURE_MODULES = ("dualpath_jax/scheduler/inter_engine.py", "dualpath_jax/scheduler/quota.py",
                "dualpath_jax/scheduler/baselines.py", "dualpath_jax/scheduler/state.py",
                "dualpath_jax/runtime/metrics.py")
PROPERTY = settings(max_examples=150, deadline=None)


def pe(engine, tok, read_q=0, *, seq=0, group=0):
  return EngineLoad(engine=engine, group=group, seq=seq, tok=tok, read_queue_tokens=read_q)


def de(engine, *, seq=0, tok=0, free=10**9, group=0):
  return EngineLoad(engine=engine, group=group, seq=seq, tok=tok, read_queue_tokens=0,
                    free_bytes=free)


def req(request_id, *, new=None, total=None, kv=1):
  """A waiting request; new and total default to each other (10 if neither is given)."""
  if new is None:
    new = 10 if total is None else total
  total = new if total is None else total
  return WaitingRequest(request_id=request_id, total_tokens=total, new_tokens=new, kv_bytes=kv)


# --- records ------------------------------------------------------------------------------------


def test_records_reject_bad_values():
  with pytest.raises(ValueError, match="tok"):
    pe(0, -1)
  with pytest.raises(ValueError, match="new_tokens"):
    req(0, new=5, total=4)
  with pytest.raises(ValueError, match="remaining"):
    QueuedPrefill(request_id=0, cached=0, remaining=0)
  with pytest.raises(ValueError, match="new"):
    Chunk(request_id=0, cached=0, new=0)


# --- alpha, beta --------------------------------------------------------------------------------


def test_derive_alpha_beta():
  # 1 GB/s over 100 kB per token: 10k tokens/s read, 3 s -> 30k; 2k tokens/s prefill, 5 s -> 10k.
  assert derive_alpha_beta(link_bytes_per_s=1e9, kv_bytes_per_token=100_000,
                           prefill_tokens_per_s=2000.0) == (30_000, 10_000)
  assert derive_alpha_beta(link_bytes_per_s=1e9, kv_bytes_per_token=100_000,
                           prefill_tokens_per_s=2000.0, read_window_s=1.0,
                           compute_window_s=0.5) == (10_000, 1000)
  for bad in ("link_bytes_per_s", "kv_bytes_per_token", "prefill_tokens_per_s", "read_window_s",
              "compute_window_s"):
    kwargs = {"link_bytes_per_s": 1e9, "kv_bytes_per_token": 100, "prefill_tokens_per_s": 1.0}
    kwargs[bad] = 0
    with pytest.raises(ValueError, match=bad):
      derive_alpha_beta(**kwargs)


# --- PE selection -------------------------------------------------------------------------------


def test_overloaded_pe_is_never_chosen():
  engines = [pe(0, tok=101, read_q=0), pe(1, tok=50, read_q=10_000)]
  assert select_prefill_engines([req(7)], engines, alpha=100, beta=100) == [(7, 1)]
  # Only overloaded engines: nothing is assigned.
  assert select_prefill_engines([req(7)], [pe(0, tok=101)], alpha=100, beta=100) == []


def test_tok_equal_to_beta_still_qualifies():
  assert select_prefill_engines([req(3)], [pe(0, tok=100)], alpha=0, beta=100) == [(3, 0)]


def test_c2_before_c3_even_with_more_tokens():
  # Engine 0: read queue == alpha (C2) with 80 tokens; engine 1: read queue > alpha (C3), idle.
  engines = [pe(0, tok=80, read_q=10), pe(1, tok=0, read_q=11)]
  assert select_prefill_engines([req(1)], engines, alpha=10, beta=100) == [(1, 0)]


def test_c3_used_when_c2_empty_or_overloaded():
  engines = [pe(0, tok=101, read_q=0), pe(1, tok=30, read_q=50), pe(2, tok=20, read_q=60)]
  # Engine 0 is C1 (overloaded, short queue); C3 = {1, 2}: least tok wins.
  assert select_prefill_engines([req(1)], engines, alpha=10, beta=100) == [(1, 2)]


def test_pe_fetch_stops_when_none_qualifies():
  engines = [pe(0, tok=90)]
  waiting = [req(1, new=20), req(2, new=5), req(3, new=1)]
  assert select_prefill_engines(waiting, engines, alpha=0, beta=100) == [(1, 0)]


def test_pe_tok_update_changes_next_choice():
  engines = [pe(0, tok=0), pe(1, tok=10)]
  waiting = [req(1, new=30), req(2, new=5), req(3, new=5), req(4, new=30)]
  # 1 -> e0 (0<10; e0=30); 2 -> e1 (10; e1=15); 3 -> e1 (15; e1=20); 4 -> e1 (20; e1=50).
  assert select_prefill_engines(waiting, engines, alpha=0, beta=1000) == [
      (1, 0), (2, 1), (3, 1), (4, 1)]


def test_pe_c2_engine_overloads_into_c1_then_c3_takes_over():
  # Read queues are not updated within a fetch, so C2 keeps winning until its tok passes beta.
  engines = [pe(0, tok=0, read_q=0), pe(1, tok=0, read_q=500)]
  waiting = [req(i, new=40) for i in range(5)]
  # e0: 0 -> 40 -> 80 -> 120 (> beta 100: C1); the rest go to e1 (C3): 0 -> 40 -> 80.
  assert select_prefill_engines(waiting, engines, alpha=100, beta=100) == [
      (0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]


def test_pe_ties_go_to_lowest_index():
  engines = [pe(3, tok=5), pe(1, tok=5), pe(2, tok=5)]
  assert select_prefill_engines([req(9)], engines, alpha=0, beta=10) == [(9, 1)]


def test_pe_no_engines_or_no_requests():
  assert select_prefill_engines([req(1)], [], alpha=0, beta=0) == []
  assert select_prefill_engines([], [pe(0, tok=0)], alpha=0, beta=0) == []
  with pytest.raises(ValueError, match="unique"):
    select_prefill_engines([req(1)], [pe(0, tok=0), pe(0, tok=1)], alpha=0, beta=0)


@PROPERTY
@given(
    engine_states=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1,
                           max_size=5),
    news=st.lists(st.integers(0, 200), max_size=30),
    alpha=st.integers(0, 300),
    beta=st.integers(0, 300),
)
def test_pe_selection_properties(engine_states, news, alpha, beta):
  waiting = [req(i, new=n, total=n) for i, n in enumerate(news)]
  tok = {i: t for i, (t, _) in enumerate(engine_states)}
  read_q = {i: q for i, (_, q) in enumerate(engine_states)}
  scheduled: list[int] = []
  for _ in range(len(waiting) + 1):
    if not waiting:
      break
    engines = [pe(i, tok=tok[i], read_q=read_q[i]) for i in tok]
    assigned = select_prefill_engines(waiting, engines, alpha=alpha, beta=beta)
    # FIFO: the assigned requests are the head of the waiting queue, in order.
    assert [r for r, _ in assigned] == [r.request_id for r in waiting[:len(assigned)]]
    # Replay the rule step by step: qualified, C2 first, least tok.
    replay = dict(tok)
    for (request_id, engine), request in zip(assigned, waiting):
      qualified = [i for i in replay if replay[i] <= beta]
      c2 = [i for i in qualified if read_q[i] <= alpha]
      assert engine in (c2 or qualified)
      assert replay[engine] == min(replay[i] for i in (c2 or qualified))
      replay[engine] += request.new_tokens
    if len(assigned) < len(waiting):  # the fetch ended because no engine qualified
      assert all(replay[i] > beta for i in replay)
    scheduled += [r for r, _ in assigned]
    waiting = waiting[len(assigned):]
    tok = {i: 0 for i in tok}  # the engines drain: their requests finish
  # Every request is scheduled exactly once.
  assert scheduled == list(range(len(news)))


# --- PE groups interleaved [ours] ----------------------------------------------------------------


def test_interleave_equal_groups_alternate():
  groups = {0: [pe(0, tok=0, group=0)], 1: [pe(1, tok=0, group=1)]}
  waiting = [req(i, new=10) for i in range(5)]
  assert interleave_prefill_fetches(waiting, groups, alpha=100, beta=1000) == (
      [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)], 1)
  # The rotation decides ties: starting at position 1, group 1 goes first.
  assert interleave_prefill_fetches(waiting[:2], groups, alpha=100, beta=1000, start=1) == (
      [(0, 1), (1, 0)], 1)


def test_interleave_rotation_alternates_zero_token_requests():
  # Full hits add no tok: only the rotation (past the group that took the last one) spreads them.
  groups = {0: [pe(0, tok=0, group=0)], 1: [pe(1, tok=0, group=1)], 2: [pe(2, tok=0, group=2)]}
  waiting = [req(i, new=0, total=10) for i in range(4)]
  assert interleave_prefill_fetches(waiting, groups, alpha=0, beta=0) == (
      [(0, 0), (1, 1), (2, 2), (3, 0)], 1)


def test_interleave_least_summed_tok_first():
  groups = {0: [pe(0, tok=30, group=0), pe(1, tok=0, group=0)], 1: [pe(2, tok=10, group=1)]}
  waiting = [req(i, new=10) for i in range(4)]
  # Sums 30 and 10: 0 -> g1 (20), 1 -> g1 (30), tie -> g0 (rotation after g1), engine 1 (least
  # tok in the group) -> 40, then g1 (30 < 40).
  assert interleave_prefill_fetches(waiting, groups, alpha=100, beta=1000) == (
      [(0, 2), (1, 2), (2, 1), (3, 2)], 0)


def test_interleave_keeps_c2_before_c3_and_skips_c1():
  # g0: e0 overloaded (C1), e1 C3 (long read queue), e2 C2 with more tok than e1.
  groups = {0: [pe(0, tok=200, group=0), pe(1, tok=0, read_q=50, group=0),
                pe(2, tok=20, group=0)],
            1: [pe(3, tok=150, group=1)]}
  waiting = [req(i, new=30) for i in range(3)]
  # Sums 220 and 150: g1 (e3 -> 180), g1 (e3 -> 210 > beta: C1 now), g0: e2 (C2) not e1 (C3).
  assert interleave_prefill_fetches(waiting, groups, alpha=10, beta=200) == (
      [(0, 3), (1, 3), (2, 2)], 1)


def test_interleave_stops_when_no_engine_qualifies():
  groups = {0: [pe(0, tok=90, group=0)], 1: [pe(1, tok=95, group=1)]}
  waiting = [req(i, new=10) for i in range(5)]
  # 0 -> g0 (100), 1 -> g1 (105: C1), 2 -> g0 (110: C1), then nothing qualifies: FIFO stops.
  assert interleave_prefill_fetches(waiting, groups, alpha=0, beta=100) == (
      [(0, 0), (1, 1), (2, 0)], 1)
  full = {0: [pe(0, tok=101, group=0)], 1: [pe(1, tok=101, group=1)]}
  assert interleave_prefill_fetches(waiting, full, alpha=0, beta=100, start=1) == ([], 1)
  assert interleave_prefill_fetches([], groups, alpha=0, beta=100, start=3) == ([], 1)
  assert interleave_prefill_fetches(waiting, {}, alpha=0, beta=100) == ([], 0)
  with pytest.raises(ValueError, match="unique"):
    interleave_prefill_fetches(waiting, {0: [pe(0, tok=0)], 1: [pe(0, tok=0, group=1)]},
                               alpha=0, beta=100)


def test_interleave_one_group_is_one_fetch():
  engines = [pe(0, tok=40), pe(1, tok=0, read_q=50), pe(2, tok=10)]
  waiting = [req(i, new=n) for i, n in enumerate([30, 30, 50, 40, 20])]
  assigned, _ = interleave_prefill_fetches(waiting, {0: engines}, alpha=20, beta=80)
  assert assigned == select_prefill_engines(waiting, engines, alpha=20, beta=80)


@PROPERTY
@given(
    group_states=st.lists(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)),
                                   min_size=1, max_size=3), min_size=1, max_size=4),
    news=st.lists(st.integers(0, 200), max_size=30),
    alpha=st.integers(0, 300),
    beta=st.integers(0, 300),
    start=st.integers(0, 5),
)
def test_interleave_properties(group_states, news, alpha, beta, start):
  groups, group_of, read_q = {}, {}, {}
  for g, states in enumerate(group_states):
    groups[g] = []
    for t, q in states:
      e = len(group_of)
      groups[g].append(pe(e, tok=t, read_q=q, group=g))
      group_of[e], read_q[e] = g, q
  waiting = [req(i, new=n) for i, n in enumerate(news)]
  assigned, position = interleave_prefill_fetches(waiting, groups, alpha=alpha, beta=beta,
                                                  start=start)
  assert [r for r, _ in assigned] == [r.request_id for r in waiting[:len(assigned)]]  # FIFO
  tok = {e.engine: e.tok for es in groups.values() for e in es}
  n, pos = len(groups), start % len(groups)
  for (_, engine), request in zip(assigned, waiting):
    ok = [g for g in groups if any(tok[e.engine] <= beta for e in groups[g])]
    total = {g: sum(tok[e.engine] for e in groups[g]) for g in groups}
    # The group: least summed tok among those with a qualifying engine, ties by rotation.
    assert group_of[engine] == min(ok, key=lambda g: (total[g], (g - pos) % n))
    qualified = [e.engine for e in groups[group_of[engine]] if tok[e.engine] <= beta]
    c2 = [i for i in qualified if read_q[i] <= alpha]
    assert tok[engine] == min(tok[i] for i in (c2 or qualified))
    tok[engine] += request.new_tokens
    pos = (group_of[engine] + 1) % n
  assert position == pos
  if len(assigned) < len(waiting):
    assert all(t > beta for t in tok.values())


# --- DE phase 1 ---------------------------------------------------------------------------------


def test_decode_groups_least_summed_tokens():
  groups = {0: [de(0, tok=10, group=0), de(1, tok=5, group=0)], 1: [de(2, tok=3, group=1)]}
  waiting = [req(1, total=10), req(2, total=10), req(3, total=1)]
  # Sums 15 and 3: 1 -> g1 (13), 2 -> g1 (23), 3 -> g0 (15 < 23).
  assert assign_decode_groups(waiting, groups) == [(1, 1), (2, 1), (3, 0)]


def test_decode_groups_ties_to_lowest_group():
  groups = {5: [de(1, tok=4)], 2: [de(0, tok=4)]}
  assert assign_decode_groups([req(1, total=1), req(2, total=1)], groups) == [(1, 2), (2, 5)]
  assert assign_decode_groups([], {}) == []
  with pytest.raises(ValueError, match="no decode groups"):
    assign_decode_groups([req(1)], {})


# --- DE phase 2 ---------------------------------------------------------------------------------


def test_de_needs_free_memory():
  engines = [de(0, seq=9, tok=900, free=100), de(1, seq=0, tok=0, free=50)]
  assert select_decode_engines([req(1, total=10, kv=80)], engines) == [(1, 0)]


def test_de_fetch_stops_when_head_does_not_fit():
  engines = [de(0, free=100), de(1, free=100)]
  # The head needs 200 (only the summed free memory has that much): nothing is assigned, even if
  # the next request would fit.
  assert select_decode_engines([req(1, kv=200), req(2, kv=10)], engines) == []
  # Memory runs out after two requests.
  queue = [req(1, kv=60), req(2, kv=60), req(3, kv=60), req(4, kv=1)]
  assert select_decode_engines(queue, engines) == [(1, 0), (2, 1)]


def test_de_prefers_min_seq_below_z():
  # Z = 1.05 * (100 + 1250) / 3 = 472.5: engine 1 (1000 + 100) is high-token although it has the
  # fewest requests; of the others (0: 200, 2: 250), the least seq wins.
  engines = [de(0, seq=5, tok=100), de(1, seq=0, tok=1000), de(2, seq=1, tok=150)]
  assert select_decode_engines([req(1, total=100)], engines) == [(1, 2)]


def test_de_min_tok_when_all_above_z():
  # Z = 1.05 * (1000 + 10) / 2 = 530.25: both are high-token; the least tok wins, not least seq.
  engines = [de(0, seq=0, tok=10), de(1, seq=5, tok=0)]
  assert select_decode_engines([req(1, total=1000)], engines) == [(1, 1)]


def test_de_z_counts_only_requests_that_fit():
  # R = [r1] (r2 does not fit in the summed free memory), so Z = 1.05 * (100 + 100) / 2 = 105:
  # engine 0 (100 + 100) is high-token, engine 1 (0 + 100) is not. Were r2 in Z, both would be
  # below it and engine 0 (seq 0) would win. Then r2 does not fit: the fetch ends.
  engines = [de(0, seq=0, tok=100, free=50), de(1, seq=1, tok=0, free=50)]
  queue = [req(1, total=100, kv=50), req(2, total=10_000, kv=1000)]
  assert select_decode_engines(queue, engines) == [(1, 1)]


def test_de_ties_and_updates():
  # Equal seq: least tok; equal seq and tok: lowest index. Each choice updates seq.
  assert select_decode_engines([req(1, total=1)], [de(0, seq=1, tok=9), de(1, seq=1, tok=8)]) \
      == [(1, 1)]
  engines = [de(2), de(0), de(1)]
  queue = [req(i, total=1) for i in range(4)]
  assert select_decode_engines(queue, engines) == [(0, 0), (1, 1), (2, 2), (3, 0)]
  assert select_decode_engines(queue, []) == []


@PROPERTY
@given(
    capacities=st.lists(st.integers(1, 400), min_size=1, max_size=4),
    requests=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 400)), max_size=25),
)
def test_de_selection_properties(capacities, requests):
  big = max(capacities)
  queue = [req(i, total=t, new=0, kv=min(kv, big)) for i, (t, kv) in enumerate(requests)]
  scheduled: list[int] = []
  for _ in range(len(queue) + 1):
    if not queue:
      break
    engines = [de(i, free=c) for i, c in enumerate(capacities)]  # drained: all memory free
    assigned = select_decode_engines(queue, engines)
    assert assigned, "a drained group always takes the head (it fits the largest DE)"
    assert [r for r, _ in assigned] == [r.request_id for r in queue[:len(assigned)]]
    free = list(capacities)
    for (_, engine), request in zip(assigned, queue):
      assert free[engine] >= request.kv_bytes
      free[engine] -= request.kv_bytes
    if len(assigned) < len(queue):
      assert all(f < queue[len(assigned)].kv_bytes for f in free)
    scheduled += [r for r, _ in assigned]
    queue = queue[len(assigned):]
  assert scheduled == list(range(len(requests)))


# --- read side ----------------------------------------------------------------------------------


def test_read_side():
  assert choose_read_side(pe_queue_tokens=5, de_queue_tokens=5) == "pe"
  assert choose_read_side(pe_queue_tokens=5, de_queue_tokens=4) == "de"
  assert choose_read_side(pe_queue_tokens=4, de_queue_tokens=5) == "pe"
  assert choose_read_side(pe_queue_tokens=0, de_queue_tokens=0) == "pe"
  # Ties go to the link that read less recently; the queue always wins over history.
  assert choose_read_side(pe_queue_tokens=0, de_queue_tokens=0, pe_recent_tokens=9,
                          de_recent_tokens=3) == "de"
  assert choose_read_side(pe_queue_tokens=0, de_queue_tokens=0, pe_recent_tokens=3,
                          de_recent_tokens=3) == "pe"
  assert choose_read_side(pe_queue_tokens=1, de_queue_tokens=2, pe_recent_tokens=99,
                          de_recent_tokens=0) == "pe"


def test_split_read_proportional_and_clamped():
  kw = {"block_tokens": 16, "pe_queue_tokens": 0, "de_queue_tokens": 0}
  assert split_read(hit_blocks=4, pe_tokens_per_s=1.0, de_tokens_per_s=1.0, **kw) == (2, 2)
  assert split_read(hit_blocks=3, pe_tokens_per_s=2.0, de_tokens_per_s=1.0, **kw) == (2, 1)
  assert split_read(hit_blocks=3, pe_tokens_per_s=1.0, de_tokens_per_s=1.0, **kw) == (2, 1)
  assert split_read(hit_blocks=0, pe_tokens_per_s=1.0, de_tokens_per_s=1.0, **kw) == (0, 0)
  # A queue behind one side shifts blocks to the other: 32 queued tokens on the PE = 2 blocks.
  assert split_read(hit_blocks=4, block_tokens=16, pe_queue_tokens=32, de_queue_tokens=0,
                    pe_tokens_per_s=1.0, de_tokens_per_s=1.0) == (1, 3)
  # Clamped: a PE queue longer than the whole read puts all of it on the DE, and vice versa.
  assert split_read(hit_blocks=4, block_tokens=16, pe_queue_tokens=10_000, de_queue_tokens=0,
                    pe_tokens_per_s=1.0, de_tokens_per_s=1.0) == (0, 4)
  assert split_read(hit_blocks=4, block_tokens=16, pe_queue_tokens=0, de_queue_tokens=10_000,
                    pe_tokens_per_s=1.0, de_tokens_per_s=1.0) == (4, 0)
  with pytest.raises(ValueError, match="block_tokens"):
    split_read(hit_blocks=1, block_tokens=0, pe_queue_tokens=0, de_queue_tokens=0,
               pe_tokens_per_s=1.0, de_tokens_per_s=1.0)
  with pytest.raises(ValueError, match="de_tokens_per_s"):
    split_read(hit_blocks=1, block_tokens=1, pe_queue_tokens=0, de_queue_tokens=0,
               pe_tokens_per_s=1.0, de_tokens_per_s=0.0)


@PROPERTY
@given(hit=st.integers(0, 200), bt=st.integers(1, 64), pe_q=st.integers(0, 20_000),
       de_q=st.integers(0, 20_000), pe_rate=st.floats(0.1, 1e6), de_rate=st.floats(0.1, 1e6))
def test_split_read_balances_drain_times(hit, bt, pe_q, de_q, pe_rate, de_rate):
  pe_blocks, de_blocks = split_read(hit_blocks=hit, block_tokens=bt, pe_queue_tokens=pe_q,
                                    de_queue_tokens=de_q, pe_tokens_per_s=pe_rate,
                                    de_tokens_per_s=de_rate)
  assert pe_blocks + de_blocks == hit and pe_blocks >= 0 and de_blocks >= 0

  def gap(x):
    return abs((pe_q + x * bt) / pe_rate - (de_q + (hit - x) * bt) / de_rate)

  # No other whole-block split drains the two links closer together.
  best = min(gap(x) for x in range(hit + 1))
  assert gap(pe_blocks) <= best * (1 + 1e-9) + 1e-9


# --- round robin --------------------------------------------------------------------------------


def test_round_robin_sequences():
  placer = RoundRobinPlacer(num_prefill_engines=2, num_decode_engines=3)
  assert [placer.place(dual_path=True) for _ in range(6)] == [
      (0, 0, "pe"), (1, 1, "de"), (0, 2, "pe"), (1, 0, "de"), (0, 1, "pe"), (1, 2, "de")]
  basic = RoundRobinPlacer(num_prefill_engines=3, num_decode_engines=2)
  assert [basic.place(dual_path=False) for _ in range(4)] == [
      (0, 0, "pe"), (1, 1, "pe"), (2, 0, "pe"), (0, 1, "pe")]
  with pytest.raises(ValueError, match="num_decode_engines"):
    RoundRobinPlacer(num_prefill_engines=1, num_decode_engines=0)


# --- cost model ---------------------------------------------------------------------------------


def test_attention_work_and_predict():
  assert attention_work(0, 1) == 1
  assert attention_work(10, 4) == 40 + 10
  cost = CostModel(fixed_s=1.0, per_token_s=0.1, per_attention_s=0.01)
  assert cost.predict([]) == 0.0
  assert cost.predict([(10, 4)]) == pytest.approx(1.0 + 0.4 + 0.5)
  assert cost.predict([(10, 4), (0, 2)]) == pytest.approx(1.0 + 0.6 + 0.5 + 0.03)
  assert CostModel.from_dict(cost.to_dict()) == cost
  with pytest.raises(ValueError, match="per_token_s"):
    CostModel.from_dict({"fixed_s": 1.0, "per_attention_s": 0.0})
  with pytest.raises(ValueError, match="fixed_s"):
    CostModel.from_dict({"fixed_s": "x", "per_token_s": 0.0, "per_attention_s": 0.0})
  with pytest.raises(ValueError, match="extra"):
    CostModel.from_dict({**cost.to_dict(), "extra": 1})
  with pytest.raises(ValueError, match="per_attention_s"):
    CostModel(fixed_s=0.0, per_token_s=0.0, per_attention_s=-1.0)


def _random_forwards(rng, n):
  return [[(int(rng.integers(0, 4000)), int(rng.integers(1, 2000)))
           for _ in range(int(rng.integers(1, 6)))] for _ in range(n)]


def test_fit_recovers_known_coefficients():
  rng = np.random.default_rng(0)
  truth = CostModel(fixed_s=2e-3, per_token_s=5e-6, per_attention_s=3e-10)
  samples = [(pairs, truth.predict(pairs)) for pairs in _random_forwards(rng, 60)]
  model, stats = fit_cost_model(samples)
  assert model.fixed_s == pytest.approx(truth.fixed_s, rel=1e-6)
  assert model.per_token_s == pytest.approx(truth.per_token_s, rel=1e-6)
  assert model.per_attention_s == pytest.approx(truth.per_attention_s, rel=1e-6)
  assert stats["samples"] == 60
  assert stats["max_abs_rel_error"] < 1e-6

  # With 2% noise: predictions stay close to the truth, and the errors are reported.
  noisy = [(pairs, t * (1 + 0.02 * rng.standard_normal())) for pairs, t in samples]
  model, stats = fit_cost_model(noisy)
  for pairs, _ in samples:
    assert model.predict(pairs) == pytest.approx(truth.predict(pairs), rel=0.05)
  assert 0 < stats["mean_abs_rel_error"] <= stats["max_abs_rel_error"] < 0.2


def test_fit_relative_and_absolute_residuals():
  # A fixed cost that dominates short forwards plus one outlier among long forwards: the relative
  # fit (default) keeps the short forwards' error small; both recover exact data exactly.
  rng = np.random.default_rng(2)
  truth = CostModel(fixed_s=1e-3, per_token_s=1e-6, per_attention_s=0.0)
  forwards = [[(0, int(n))] for n in rng.integers(1, 100_000, size=30)]
  samples = [(pairs, truth.predict(pairs)) for pairs in forwards]
  for relative in (True, False):
    model, stats = fit_cost_model(samples, relative=relative)
    assert model.fixed_s == pytest.approx(1e-3, rel=1e-6)
    assert stats["max_abs_rel_error"] < 1e-6
  long = max(range(30), key=lambda i: samples[i][1])
  skewed = [(p, t * (1.5 if i == long else 1.0)) for i, (p, t) in enumerate(samples)]
  _, rel_stats = fit_cost_model(skewed, relative=True)
  _, abs_stats = fit_cost_model(skewed, relative=False)
  assert rel_stats["mean_abs_rel_error"] < abs_stats["mean_abs_rel_error"]


def test_fit_keeps_coefficients_non_negative():
  rng = np.random.default_rng(1)
  forwards = _random_forwards(rng, 40)
  # Time falls with attention work: unconstrained least squares would give it a negative
  # coefficient; the fit drops that feature instead.
  samples = [(pairs, 1.0 + 1e-4 * sum(n for _, n in pairs)
              - 1e-9 * sum(attention_work(c, n) for c, n in pairs)) for pairs in forwards]
  samples = [(pairs, max(t, 1e-3)) for pairs, t in samples]
  model, _ = fit_cost_model(samples)
  assert min(model.fixed_s, model.per_token_s, model.per_attention_s) >= 0
  # Only per-token time: the others come out as zero.
  samples = [(pairs, 1e-5 * sum(n for _, n in pairs)) for pairs in forwards]
  model, _ = fit_cost_model(samples)
  assert model.per_token_s == pytest.approx(1e-5, rel=1e-6)
  assert model.fixed_s == pytest.approx(0.0, abs=1e-9)
  assert model.per_attention_s == pytest.approx(0.0, abs=1e-15)
  with pytest.raises(ValueError, match="no samples"):
    fit_cost_model([])
  with pytest.raises(ValueError, match="no pairs"):
    fit_cost_model([([], 1.0)])
  with pytest.raises(ValueError, match="bad time"):
    fit_cost_model([([(0, 1)], 0.0)])


# --- quota batches ------------------------------------------------------------------------------

PER_TOKEN = CostModel(fixed_s=0.0, per_token_s=1.0, per_attention_s=0.0)  # 1 s per new token


def q(request_id, remaining, cached=0):
  return QueuedPrefill(request_id=request_id, cached=cached, remaining=remaining)


def test_quota_batch_packs_and_chunks():
  queue = [q(1, 5), q(2, 5), q(3, 5), q(4, 5)]
  assert select_quota_batch(queue, cost=PER_TOKEN, quota_s=12, max_requests=8) == [
      Chunk(request_id=1, cached=0, new=5), Chunk(request_id=2, cached=0, new=5),
      Chunk(request_id=3, cached=0, new=2)]
  assert select_quota_batch(queue, cost=PER_TOKEN, quota_s=12, max_requests=2) == [
      Chunk(request_id=1, cached=0, new=5), Chunk(request_id=2, cached=0, new=5)]
  assert select_quota_batch([], cost=PER_TOKEN, quota_s=1, max_requests=1) == []


def test_quota_binary_search_with_attention_cost():
  cost = CostModel(fixed_s=0.5, per_token_s=0.0, per_attention_s=1e-3)
  # cached 1000: n new tokens cost 0.5 + 1e-3 * (1000 n + n (n + 1) / 2) <= 3.0 -> n = 2.
  batch = select_quota_batch([q(1, 100, cached=1000)], cost=cost, quota_s=3.0, max_requests=4)
  assert batch == [Chunk(request_id=1, cached=1000, new=2)]
  assert cost.predict([(1000, 2)]) <= 3.0 < cost.predict([(1000, 3)])


def test_quota_min_chunk_rules():
  # Empty batch, nothing fits: one minimal chunk anyway (progress).
  assert select_quota_batch([q(1, 10)], cost=PER_TOKEN, quota_s=0.5, max_requests=4) == [
      Chunk(request_id=1, cached=0, new=1)]
  assert select_quota_batch([q(1, 10)], cost=PER_TOKEN, quota_s=2, max_requests=4,
                            min_chunk_tokens=4) == [Chunk(request_id=1, cached=0, new=4)]
  assert select_quota_batch([q(1, 3)], cost=PER_TOKEN, quota_s=2, max_requests=4,
                            min_chunk_tokens=4) == [Chunk(request_id=1, cached=0, new=3)]
  # Non-empty batch: a chunk below min_chunk_tokens is not taken; the batch ends.
  assert select_quota_batch([q(1, 5), q(2, 10)], cost=PER_TOKEN, quota_s=7, max_requests=4,
                            min_chunk_tokens=4) == [Chunk(request_id=1, cached=0, new=5)]
  assert select_quota_batch([q(1, 5), q(2, 10)], cost=PER_TOKEN, quota_s=9, max_requests=4,
                            min_chunk_tokens=4) == [Chunk(request_id=1, cached=0, new=5),
                                                    Chunk(request_id=2, cached=0, new=4)]
  # The fixed cost alone exceeds the quota: still one minimal chunk.
  heavy = CostModel(fixed_s=10.0, per_token_s=1.0, per_attention_s=0.0)
  assert select_quota_batch([q(1, 10), q(2, 1)], cost=heavy, quota_s=1.0, max_requests=4) == [
      Chunk(request_id=1, cached=0, new=1)]
  with pytest.raises(ValueError, match="min_chunk_tokens"):
    select_quota_batch([q(1, 1)], cost=PER_TOKEN, quota_s=1, max_requests=1, min_chunk_tokens=0)


def test_token_budget_batch():
  queue = [q(1, 5), q(2, 5), q(3, 5)]
  assert select_token_budget_batch(queue, token_budget=12, max_requests=8) == [
      Chunk(request_id=1, cached=0, new=5), Chunk(request_id=2, cached=0, new=5),
      Chunk(request_id=3, cached=0, new=2)]
  assert select_token_budget_batch(queue, token_budget=10, max_requests=8) == [
      Chunk(request_id=1, cached=0, new=5), Chunk(request_id=2, cached=0, new=5)]
  assert select_token_budget_batch(queue, token_budget=3, max_requests=8) == [
      Chunk(request_id=1, cached=0, new=3)]
  assert select_token_budget_batch(queue, token_budget=100, max_requests=1) == [
      Chunk(request_id=1, cached=0, new=5)]


def test_remainder():
  entry = q(1, 10, cached=4)
  assert remainder(entry, Chunk(request_id=1, cached=4, new=3)) == q(1, 7, cached=7)
  assert remainder(entry, Chunk(request_id=1, cached=4, new=10)) is None
  with pytest.raises(ValueError):
    remainder(entry, Chunk(request_id=1, cached=5, new=3))
  with pytest.raises(ValueError):
    remainder(entry, Chunk(request_id=1, cached=4, new=11))
  with pytest.raises(ValueError):
    remainder(entry, Chunk(request_id=2, cached=4, new=1))


costs = st.builds(CostModel, fixed_s=st.sampled_from([0.0, 0.01, 0.2]),
                  per_token_s=st.sampled_from([0.0, 1e-4, 1e-3]),
                  per_attention_s=st.sampled_from([0.0, 1e-8, 1e-6]))
queues = st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 3000)), min_size=1, max_size=12)


def _drain(queue, select):
  """Selects batches and applies them until the queue is empty; the chunks of each request."""
  chunks = {entry.request_id: [] for entry in queue}
  for _ in range(sum(entry.remaining for entry in queue) + 1):
    if not queue:
      return chunks
    batch = select(queue)
    assert batch, "every call makes progress"
    ids = [c.request_id for c in batch]
    assert len(set(ids)) == len(ids), "no request twice in one batch"
    assert ids == [entry.request_id for entry in queue[:len(batch)]], "FIFO"
    left = [remainder(entry, chunk) for entry, chunk in zip(queue, batch)]
    # Only the batch's last entry may be chunked.
    assert all(r is None for r in left[:-1])
    for chunk in batch:
      chunks[chunk.request_id].append(chunk)
    queue = [r for r in left if r is not None] + list(queue[len(batch):])
  raise AssertionError("the queue did not drain")


def _check_conserved(initial, chunks):
  for entry in initial:
    cached = entry.cached
    for chunk in chunks[entry.request_id]:
      assert chunk.cached == cached  # contiguous: each chunk starts where the last one ended
      cached += chunk.new
    assert cached == entry.cached + entry.remaining


@PROPERTY
@given(cost=costs, quota_s=st.sampled_from([0.005, 0.05, 0.3, 2.0]), entries=queues,
       max_requests=st.integers(1, 6), min_chunk=st.integers(1, 64))
def test_quota_batch_properties(cost, quota_s, entries, max_requests, min_chunk):
  queue = [q(i, remaining, cached=cached) for i, (cached, remaining) in enumerate(entries)]
  batch = select_quota_batch(queue, cost=cost, quota_s=quota_s, max_requests=max_requests,
                             min_chunk_tokens=min_chunk)
  assert 1 <= len(batch) <= max_requests
  pairs = [(c.cached, c.new) for c in batch]
  head = queue[0]
  forced = len(batch) == 1 and batch[0].new == min(min_chunk, head.remaining) \
      and cost.predict([(head.cached, batch[0].new)]) > quota_s
  # The quota holds, except for one minimal chunk that an empty batch takes anyway.
  assert cost.predict(pairs) <= quota_s or forced
  last, entry = batch[-1], queue[len(batch) - 1]
  if not forced and last.new < entry.remaining:
    # The chunk is the largest that fits.
    assert cost.predict(pairs[:-1] + [(last.cached, last.new + 1)]) > quota_s
    assert last.new >= min_chunk

  def select(qu):
    return select_quota_batch(qu, cost=cost, quota_s=quota_s, max_requests=max_requests,
                              min_chunk_tokens=min_chunk)

  _check_conserved(queue, _drain(queue, select))


@PROPERTY
@given(entries=queues, budget=st.integers(1, 5000), max_requests=st.integers(1, 6))
def test_token_budget_batch_properties(entries, budget, max_requests):
  queue = [q(i, remaining, cached=cached) for i, (cached, remaining) in enumerate(entries)]
  batch = select_token_budget_batch(queue, token_budget=budget, max_requests=max_requests)
  assert 1 <= len(batch) <= max_requests
  assert sum(c.new for c in batch) <= budget

  def select(qu):
    return select_token_budget_batch(qu, token_budget=budget, max_requests=max_requests)

  _check_conserved(queue, _drain(queue, select))


# --- metrics ------------------------------------------------------------------------------------


def test_snic_balance_hand_built():
  balanced = snic_balance({0: [(0.0, 10.0, 1000)], 1: [(0.0, 10.0, 1000)]}, window_s=2.0)
  assert balanced["mean"] == pytest.approx(1.0) and balanced["max"] == pytest.approx(1.0)
  assert balanced["windows"] == 9 and balanced["links"] == 2 and balanced["window_s"] == 2.0
  idle = snic_balance({0: [(0.0, 10.0, 1000)], 1: []}, window_s=2.0)
  assert idle["mean"] == pytest.approx(2.0) and idle["p50"] == pytest.approx(2.0)
  uneven = snic_balance({0: [(0.0, 10.0, 300)], 1: [(0.0, 10.0, 100)]}, window_s=10.0)
  assert uneven["windows"] == 1 and uneven["mean"] == pytest.approx(1.5)
  # One link after the other: [0, 10) only link 0, [5, 15) both halves, [10, 20] only link 1.
  shifted = snic_balance({0: [(0.0, 10.0, 100)], 1: [(10.0, 20.0, 100)]}, window_s=10.0,
                         step_s=5.0)
  assert shifted["windows"] == 3
  assert shifted["mean"] == pytest.approx(5 / 3) and shifted["max"] == pytest.approx(2.0)
  # Zero-length records put their bytes at their start; the last window includes its end.
  points = snic_balance({0: [(5.0, 5.0, 100)], 1: [(5.0, 5.0, 100)]}, window_s=1.0)
  assert points["windows"] == 1 and points["mean"] == pytest.approx(1.0)
  # Quiet stretches are skipped.
  gaps = snic_balance({0: [(0.0, 1.0, 10), (100.0, 101.0, 10)], 1: [(0.0, 1.0, 10)]},
                      window_s=1.0, step_s=1.0)
  assert gaps["windows"] == 2 and gaps["mean"] == pytest.approx(1.5)
  empty = snic_balance({0: [], 1: []}, window_s=1.0)
  assert empty["mean"] is None and empty["windows"] == 0 and empty["links"] == 2
  with pytest.raises(ValueError, match="window_s"):
    snic_balance({}, window_s=0.0)
  with pytest.raises(ValueError, match="bad record"):
    snic_balance({0: [(2.0, 1.0, 5)]}, window_s=1.0)


def _snic_reference(link_records, window_s, step_s):
  """Window by window, record by record: the definition, without the cumulative sums."""
  records = [r for rs in link_records.values() for r in rs]
  first, last = min(r[0] for r in records), max(r[1] for r in records)
  ratios, start, k = [], first, 0
  while True:
    start = first + k * step_s
    end = start + window_s
    final = end >= last
    per_link = []
    for rs in link_records.values():
      total = 0.0
      for t0, t1, b in rs:
        if t1 > t0:
          total += b * max(0.0, min(t1, end) - max(t0, start)) / (t1 - t0)
        elif start <= t0 < end or (final and t0 == end):
          total += b
      per_link.append(total)
    if sum(per_link) > 0:
      ratios.append(max(per_link) * len(per_link) / sum(per_link))
    if final:
      return ratios
    k += 1


@PROPERTY
@given(
    raw=st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), st.integers(0, 1000)),
                          max_size=5), min_size=1, max_size=4),
    window_s=st.sampled_from([1.0, 2.5, 4.0]),
    step_frac=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_snic_balance_matches_the_definition(raw, window_s, step_frac):
  link_records = {i: [(float(t), float(t + d), b) for t, d, b in rs] for i, rs in enumerate(raw)}
  step_s = window_s * step_frac
  result = snic_balance(link_records, window_s=window_s, step_s=step_s)
  if not any(link_records.values()):
    assert result["windows"] == 0 and result["mean"] is None
    return
  expected = _snic_reference(link_records, window_s, step_s)
  assert result["windows"] == len(expected)
  if expected:
    assert result["mean"] == pytest.approx(float(np.mean(expected)), rel=1e-6)
    assert result["max"] == pytest.approx(max(expected), rel=1e-6)
    assert 1.0 - 1e-9 <= result["mean"] <= len(link_records) + 1e-9


def test_attn_balance():
  forwards = [[(1.0, 1.0), (1.0, 1.0)], [(2.0, 3.0), (1.0, 1.0)], [(1.0, 1.0), None], []]
  result = attn_balance(forwards)
  assert result["forwards"] == 4 and result["forwards_all_busy"] == 2
  assert result["predicted_mean"] == pytest.approx((1.0 + 2 / 1.5) / 2)
  assert result["predicted_max"] == pytest.approx(2 / 1.5)
  assert result["measured_mean"] == pytest.approx((1.0 + 1.5) / 2)
  assert result["measured_max"] == pytest.approx(1.5)
  none = attn_balance([[None, (1.0, 1.0)]])
  assert none["predicted_mean"] is None and none["measured_max"] is None
  assert none["forwards"] == 1 and none["forwards_all_busy"] == 0


# --- purity -------------------------------------------------------------------------------------


def test_policies_do_not_import_jax():
  code = ("import dualpath_jax.scheduler.inter_engine, dualpath_jax.scheduler.quota, "
          "dualpath_jax.scheduler.baselines, dualpath_jax.scheduler.state, "
          "dualpath_jax.runtime.metrics; import sys; "
          "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules)")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("path", PURE_MODULES)
def test_policies_read_no_clock(path):
  source = (REPO / path).read_text()
  assert not re.search(r"^\s*(import|from)\s+(time|datetime|threading)\b", source, re.MULTILINE)
  assert not re.search(r"perf_counter|monotonic|time\.time\(", source)
