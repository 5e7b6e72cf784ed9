"""Workloads: multi-turn agent trajectories that the runtime replays.

All of them follow the paper's replay protocol (PAPER.md section 6.4): turn i appends `append_ids`
to its agent's context and is forced to generate `gen_tokens` tokens; the next prompt is the
previous prompt + the generated tokens + the next append.

  synthetic  Turn, AgentTrajectory, and the simple generator used by the demo and the offline
             runner: per agent, a unique random first round, then turns that each append A tokens
             and force G generated tokens.
  agentic    synthetic trajectories with the statistics of the paper's Table 2 datasets (presets
             mal32k, mal48k, mal64k, optionally scaled down for CPU) and `describe`, which measures
             those statistics in Table 2's definitions.
  traces     `read_trace`: Mooncake FAST'25 JSONL traces (sessions rebuilt from shared block
             prefixes, or one request per trajectory) and the project's session JSONL, with times
             for online replay (Turn.think_s, AgentTrajectory.arrival_s); TraceFormatError for a
             malformed line.
  build      one workload spec (a config's `workload` section) -> trajectories, for every kind.
"""

from dualpath_jax.workload.agentic import (
    PRESETS,
    AgenticPreset,
    agentic_trajectories,
    describe,
    get_preset,
)
from dualpath_jax.workload.synthetic import AgentTrajectory, Turn, simple_trajectories
from dualpath_jax.workload.traces import TraceFormatError, read_trace

__all__ = ["PRESETS", "AgentTrajectory", "AgenticPreset", "TraceFormatError", "Turn",
           "agentic_trajectories", "describe", "get_preset", "read_trace", "simple_trajectories"]
