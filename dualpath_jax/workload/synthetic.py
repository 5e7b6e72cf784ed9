"""Simple synthetic agent trajectories (the paper's replay protocol, PAPER.md section 6.4).

Turn i of an agent appends `append_tokens` token ids A_i to its context and then generates exactly
`gen_tokens` tokens G_i (forced generation length). The prompt of turn i is
A_1, G_1, ..., A_{i-1}, G_{i-1}, A_i, so everything but A_i was computed by earlier turns and can be
loaded from the store. Each agent's first append is drawn from its own random stream, so agents
never share KV (the paper's unique first round).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class Turn:
  """One turn of an agent."""

  append_ids: np.ndarray
  """[A] int32: tokens appended to the context (tool output or user input)."""
  gen_tokens: int
  """Tokens the turn must generate (forced generation length)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentTrajectory:
  """The turns of one agent, in order."""

  agent_id: str
  """Unique agent name; also the KV namespace of its blocks."""
  turns: tuple[Turn, ...]
  """Turns in order; turn k+1 starts after turn k has finished."""


def simple_trajectories(*, agents: int, turns: int, first_append_tokens: int, append_tokens: int,
                        gen_tokens: int, vocab_size: int, seed: int = 0) -> list[AgentTrajectory]:
  """`agents` trajectories of `turns` turns each, with fixed append and generation lengths."""
  for name, value in (("agents", agents), ("turns", turns), ("append_tokens", append_tokens),
                      ("first_append_tokens", first_append_tokens), ("gen_tokens", gen_tokens),
                      ("vocab_size", vocab_size)):
    if value <= 0:
      raise ValueError(f"workload.{name} must be positive, got {value}")
  trajectories = []
  for a in range(agents):
    rng = np.random.default_rng([seed, a])
    agent_turns = []
    for t in range(turns):
      n = first_append_tokens if t == 0 else append_tokens
      agent_turns.append(Turn(append_ids=rng.integers(0, vocab_size, n, dtype=np.int32),
                              gen_tokens=gen_tokens))
    trajectories.append(AgentTrajectory(agent_id=f"agent{a:05d}", turns=tuple(agent_turns)))
  return trajectories
