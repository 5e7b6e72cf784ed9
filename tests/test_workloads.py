"""Workload generators: the Table 2 agentic presets (workload/agentic.py), Turn defaults."""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.workload import (
    PRESETS,
    AgentTrajectory,
    Turn,
    agentic_trajectories,
    describe,
    get_preset,
    simple_trajectories,
)

TABLE_KEYS = ("turns", "append_per_turn", "gen_per_turn", "total_tokens", "context_avg")


@pytest.mark.parametrize("preset", ["mal32k", "mal48k", "mal64k"])
def test_presets_match_table2(preset):
  """Must-show: 500 agents at scale 1 reproduce Table 2's means to within 5%."""
  p = get_preset(preset)
  stats = describe(agentic_trajectories(preset, agents=500, vocab_size=32000, seed=0))
  table = p.table()
  assert stats["agents"] == 500
  for key in TABLE_KEYS:
    assert stats[key] == pytest.approx(table[key], rel=0.05), (key, stats[key], table[key])
  assert stats["max_total"] <= p.mal
  assert stats["max_total"] >= 0.99 * p.mal   # the longest trajectories run into MAL


@pytest.mark.parametrize("seed", [1, 2])
def test_presets_other_seeds(seed):
  for preset in PRESETS:
    stats = describe(agentic_trajectories(preset, agents=500, vocab_size=100, seed=seed))
    table = get_preset(preset).table()
    for key in TABLE_KEYS:
      assert stats[key] == pytest.approx(table[key], rel=0.05), (preset, key)


def test_scaled_preset_keeps_shape():
  trajs = agentic_trajectories("mal32k", agents=300, vocab_size=256, scale=32)
  stats = describe(trajs)
  table = get_preset("mal32k").table(scale=32)
  assert table["max_total"] == 1024
  assert stats["max_total"] <= 1024
  assert all(t.agent_id.startswith("mal32k-s32-agent") for t in trajs)
  for key in TABLE_KEYS:   # rounding to whole tokens (at least 1) moves the means a little
    assert stats[key] == pytest.approx(table[key], rel=0.12), (key, stats[key], table[key])


def test_trajectories_deterministic_and_unique():
  a = agentic_trajectories("mal32k", agents=6, vocab_size=50, seed=3, scale=16)
  b = agentic_trajectories("mal32k", agents=3, vocab_size=50, seed=3, scale=16)
  c = agentic_trajectories("mal32k", agents=3, vocab_size=50, seed=4, scale=16)
  for x, y in zip(a, b):   # fewer agents give a prefix
    assert x.agent_id == y.agent_id and len(x.turns) == len(y.turns)
    for s, t in zip(x.turns, y.turns):
      assert s.gen_tokens == t.gen_tokens and s.think_s == 0.0
      np.testing.assert_array_equal(s.append_ids, t.append_ids)
  assert any(len(x.turns[0].append_ids) != len(z.turns[0].append_ids)
             or (x.turns[0].append_ids != z.turns[0].append_ids).any() for x, z in zip(b, c))
  firsts = [t.turns[0].append_ids[:16].tobytes() for t in a]
  assert len(set(firsts)) == len(firsts)   # unique first rounds: no shared KV between agents
  assert len({t.agent_id for t in a}) == len(a)
  for t in a:
    assert t.arrival_s is None
    for turn in t.turns:
      assert turn.append_ids.dtype == np.int32 and turn.append_ids.size >= 1
      assert 0 <= turn.append_ids.min() and turn.append_ids.max() < 50 and turn.gen_tokens >= 1


def test_unique_round():
  (t,) = agentic_trajectories("mal48k", agents=1, vocab_size=99, scale=64, unique_round_tokens=7)
  (u,) = agentic_trajectories("mal48k", agents=1, vocab_size=99, scale=64)
  assert t.turns[0].append_ids.shape == (7,) and t.turns[0].gen_tokens == 1
  assert len(t.turns) == len(u.turns) + 1
  assert [x.gen_tokens for x in t.turns[1:]] == [x.gen_tokens for x in u.turns]


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"unknown agentic preset 'mal16k'.*mal32k, mal48k, mal64k"):
    agentic_trajectories("mal16k", agents=1, vocab_size=10)
  for kw in (dict(agents=0), dict(vocab_size=0), dict(scale=0), dict(unique_round_tokens=-1)):
    with pytest.raises(ValueError):
      agentic_trajectories("mal32k", **{**dict(agents=1, vocab_size=10), **kw})
  with pytest.raises(ValueError):
    describe([])


def test_describe_definitions():
  def traj(appends, gens):
    return AgentTrajectory(agent_id="x", turns=tuple(
        Turn(append_ids=np.zeros(a, np.int32), gen_tokens=g) for a, g in zip(appends, gens)))
  stats = describe([traj([10, 2], [3, 4]), traj([6], [1])])
  # Prompts: [10, 10 + 3 + 2 = 15] and [6]; totals 19 and 7.
  assert stats == dict(agents=2, turns=1.5, append_per_turn=6.0, gen_per_turn=2.25,
                       total_tokens=13.0, context_avg=31 / 3,
                       context_avg_per_trajectory=(12.5 + 6) / 2, max_total=19.0,
                       hit_rate=1 - 18 / 31)


def test_turn_defaults_keep_old_callers():
  (t,) = simple_trajectories(agents=1, turns=2, first_append_tokens=5, append_tokens=2,
                             gen_tokens=3, vocab_size=10)
  assert t.arrival_s is None and all(x.think_s == 0.0 for x in t.turns)
  assert Turn(append_ids=np.zeros(1, np.int32), gen_tokens=1, think_s=2.0).think_s == 2.0
