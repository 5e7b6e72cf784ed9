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
  think_s: float = 0.0
  """Seconds between the end of the previous turn and this turn's arrival, for online replay (tool
  time or user think time; 0 for offline replay). On a first turn it has no previous turn to follow:
  the trajectory's `arrival_s` places it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentTrajectory:
  """The turns of one agent, in order."""

  agent_id: str
  """Unique agent name; also the KV namespace of its blocks."""
  turns: tuple[Turn, ...]
  """Turns in order; turn k+1 starts after turn k has finished."""
  arrival_s: float | None = None
  """Arrival of the first turn in seconds from the workload's start, for online replay (a trace's
  timestamp); None where the workload does not say and the experiment's arrival process decides.
  Offline replay ignores it."""


def simple_trajectories(*, agents: int, turns: int, first_append_tokens: int, append_tokens: int,
                        gen_tokens: int, vocab_size: int, seed: int = 0,
                        length_jitter: float = 0.0) -> list[AgentTrajectory]:
  """`agents` trajectories of `turns` turns each.

  With length_jitter 0 every append and generation has the given length. With length_jitter j in
  (0, 1), each agent's first append is first_append_tokens times a factor drawn uniformly from
  [1 - j, 1 + j] (agents then differ in context length, hence in read size), and each later append
  is append_tokens times its own such factor; generations keep their fixed length.
  """
  if not 0 <= length_jitter < 1:
    raise ValueError(f"workload.length_jitter must be in [0, 1), got {length_jitter}")
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
      if length_jitter:
        jitter = np.random.default_rng([seed, a, t, 0x6A17]).uniform(-1, 1) * length_jitter
        n = max(1, round(n * (1 + jitter)))
      agent_turns.append(Turn(append_ids=rng.integers(0, vocab_size, n, dtype=np.int32),
                              gen_tokens=gen_tokens))
    trajectories.append(AgentTrajectory(agent_id=f"agent{a:05d}", turns=tuple(agent_turns)))
  return trajectories
