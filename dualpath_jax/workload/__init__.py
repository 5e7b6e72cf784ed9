"""Workloads: multi-turn agent trajectories that the runtime replays.

`synthetic` holds the simple generator used by the demo and the offline runner: per agent, a unique
random first round, then turns that each append A tokens and force G generated tokens.
"""

from dualpath_jax.workload.synthetic import AgentTrajectory, Turn, simple_trajectories

__all__ = ["AgentTrajectory", "Turn", "simple_trajectories"]
