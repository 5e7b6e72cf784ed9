"""GlobalScheduler's PE placement across PE groups, on a fake cluster (no jax, no threads, no clock
asserts): which group each submitted turn lands on, however many scheduling passes run per event.

The fake cluster has what GlobalScheduler reads: a runtime config (oracle mode, so no reads and no
host buffers), a topology of PE and DE nodes, idle links, a layout and PE groups that only record
the turns handed to them.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from dualpath_jax.runtime.global_scheduler import GlobalScheduler
from dualpath_jax.runtime.request import TurnRequest

BLOCK_TOKENS = 4
PREFILL_TOKENS_PER_S = 2000.0  # beta = 10_000 tokens (5 s)


class FakeCluster:
  """2 PE nodes (pe_per_node PEs each) and 2 DE nodes (one DE each)."""

  def __init__(self, *, pe_per_node: int = 1):
    self.runtime_config = types.SimpleNamespace(
        scheduler="dualpath", dual_path=True, split_reads=False, link_bytes_per_s=1e9,
        skips_kv_io=True)
    pes = [types.SimpleNamespace(role="prefill", index=i, node_id=i // pe_per_node,
                                 name=f"pe{i}") for i in range(2 * pe_per_node)]
    des = [types.SimpleNamespace(role="decode", index=i, node_id=2 + i, name=f"de{i}")
           for i in range(2)]
    self.topology = types.SimpleNamespace(
        prefill_engines=pes, decode_engines=des,
        nodes=[types.SimpleNamespace(node_id=n) for n in range(4)])
    self.layout = types.SimpleNamespace(kv_bytes_per_token=1000, full_block_bytes=4000)
    self.links = {n: types.SimpleNamespace(read_queue_tokens=0, read_records=[])
                  for n in range(4)}
    self.buffers = {n: types.SimpleNamespace(capacity_bytes=10**12) for n in range(4)}
    self.decode_pool_bytes = 10**12
    self.handed: list[TurnRequest] = []
    group = types.SimpleNamespace(submit=self.handed.append)
    self.prefill_group_of = lambda engine: group

  def decode_bytes_for(self, tokens: int) -> int:
    return tokens

  def admit_tokens(self, tokens: int) -> int:
    return tokens


def turn(i: int, prompt_tokens: int = 100) -> TurnRequest:
  return TurnRequest(agent_id=f"a{i}", turn=0, prompt=np.zeros(prompt_tokens, np.int32),
                     gen_tokens=2, hashes=[], hit_blocks=0, block_tokens=BLOCK_TOKENS)


def submit_all(scheduler, turns, *, passes: int, finish: bool):
  """Submits the turns one by one; each submit is followed by passes - 1 more scheduling passes
  (as the events of a real run cause), and (finish) the turn's prefill ends before the next."""
  for request in turns:
    scheduler.submit(request)
    for _ in range(passes - 1):
      scheduler.poke()
    if finish:
      scheduler.prefill_progress(request, request.new_tokens, True)
      scheduler.turn_done(request)


@pytest.mark.parametrize("finish", [False, True], ids=["accumulate", "finish-each"])
@pytest.mark.parametrize("passes", [1, 2, 3, 4])
def test_idle_groups_split_turns_evenly(passes, finish):
  cluster = FakeCluster()
  scheduler = GlobalScheduler(cluster, prefill_tokens_per_s=PREFILL_TOKENS_PER_S)
  turns = [turn(i) for i in range(8)]
  submit_all(scheduler, turns, passes=passes, finish=finish)
  assert [r.prefill_engine for r in turns].count(0) == 4
  assert [r.prefill_engine for r in turns].count(1) == 4
  assert len(cluster.handed) == 8


@pytest.mark.parametrize("passes", [1, 2])
def test_idle_groups_of_two_engines_use_all_four(passes):
  cluster = FakeCluster(pe_per_node=2)
  scheduler = GlobalScheduler(cluster, prefill_tokens_per_s=PREFILL_TOKENS_PER_S)
  turns = [turn(i) for i in range(8)]
  submit_all(scheduler, turns, passes=passes, finish=False)
  assert sorted(r.prefill_engine for r in turns) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_one_batch_of_waiting_turns_is_interleaved():
  """Turns waiting together (one pass sees all of them) alternate between equal groups."""
  cluster = FakeCluster()
  scheduler = GlobalScheduler(cluster, prefill_tokens_per_s=PREFILL_TOKENS_PER_S)
  turns = [turn(i) for i in range(6)]
  scheduler._busy = True  # hold the passes back while the turns arrive
  for request in turns:
    scheduler.submit(request)
  scheduler._busy = False
  scheduler.poke()
  assert [r.prefill_engine for r in turns] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("passes", [1, 2])
def test_group_with_more_tokens_gets_fewer_turns(passes):
  cluster = FakeCluster()
  scheduler = GlobalScheduler(cluster, prefill_tokens_per_s=PREFILL_TOKENS_PER_S)
  big = turn(100, prompt_tokens=2000)  # an unfinished long prefill on one PE
  scheduler.submit(big)
  busy = big.prefill_engine
  turns = [turn(i, prompt_tokens=100) for i in range(12)]
  submit_all(scheduler, turns, passes=passes, finish=False)
  engines = [r.prefill_engine for r in turns]
  # 2000 tokens on the busy PE: the idle one takes turns until it catches up (20 x 100 tokens).
  assert engines.count(busy) == 0
  assert engines.count(1 - busy) == 12
  # Once the loads are equal they alternate again.
  more = [turn(200 + i, prompt_tokens=100) for i in range(20)]
  submit_all(scheduler, more, passes=passes, finish=False)
  assert scheduler.pe_tok[0] == scheduler.pe_tok[1]


def test_overloaded_group_is_never_assigned():
  cluster = FakeCluster()
  scheduler = GlobalScheduler(cluster, prefill_tokens_per_s=PREFILL_TOKENS_PER_S)
  big = turn(100, prompt_tokens=scheduler.beta + 1)  # over beta: C1 from now on
  scheduler.submit(big)
  busy = big.prefill_engine
  turns = [turn(i) for i in range(10)]
  submit_all(scheduler, turns, passes=2, finish=True)
  assert all(r.prefill_engine == 1 - busy for r in turns)
