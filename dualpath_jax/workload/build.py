"""One workload spec (a config's `workload` section) -> agent trajectories, for every experiment.

A spec is a flat mapping with `kind` and the fields of every kind (config files declare them all,
so that any kind can be picked from the command line); each kind reads its own fields:

  synthetic  agents, turns, first_append_tokens, append_tokens, gen_tokens, seed, length_jitter
  agentic    preset (mal32k | mal48k | mal64k), agents, seed, scale
  trace      path, format (auto | mooncake | session), sessions, max_sessions, max_requests (0 =
             no limit), seed, trace_scale (lengths divided by it; a 512-token trace block must
             stay a multiple of 64 tokens: 1, 2, 4 or 8)
  recall     agents, turns, first_append_tokens, append_tokens, gen_tokens, seed (long-range
             recall prompts for the trained checkpoints: outputs depend on far-back context)

and every kind: max_turns (keep at most this many turns per trajectory; 0 keeps all).
Trajectories longer than the runtime's `max_context_tokens` are cut like the paper's datasets are
cut at MAL: turns that would not fit are dropped, and trajectories with no turn left are dropped;
`WorkloadReport` says how many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from dualpath_jax.workload.agentic import agentic_trajectories
from dualpath_jax.workload.synthetic import AgentTrajectory, simple_trajectories
from dualpath_jax.workload.traces import read_trace

KINDS = ("synthetic", "agentic", "trace", "recall")
FIELDS = {
    "synthetic": ("agents", "turns", "first_append_tokens", "append_tokens", "gen_tokens", "seed",
                  "length_jitter"),
    "agentic": ("preset", "agents", "seed", "scale"),
    "trace": ("path", "format", "sessions", "max_sessions", "max_requests", "seed",
              "trace_scale"),
    "recall": ("agents", "turns", "first_append_tokens", "append_tokens", "gen_tokens", "seed"),
}
COMMON = ("kind", "max_turns")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadReport:
  """What building a workload kept and cut."""

  kind: str
  """The workload kind."""
  trajectories: int
  """Trajectories kept."""
  turns: int
  """Turns kept, all trajectories."""
  dropped_turns: int
  """Turns cut by max_turns or by the context limit."""
  dropped_trajectories: int
  """Trajectories with no turn left."""
  longest_tokens: int
  """Longest kept trajectory: all its appends and generations."""


def trajectory_tokens(trajectory: AgentTrajectory) -> int:
  return sum(len(t.append_ids) + t.gen_tokens for t in trajectory.turns)


def build_workload(spec: Mapping, *, vocab_size: int, block_tokens: int, max_context_tokens: int
                   ) -> tuple[list[AgentTrajectory], WorkloadReport]:
  """The trajectories of `spec`, cut to max_turns and to max_context_tokens."""
  spec = dict(spec)
  kind = spec.get("kind")
  if kind not in KINDS:
    raise ValueError(f"workload.kind: unknown kind {kind!r}; choose one of {KINDS}")
  known = set(COMMON).union(*FIELDS.values())
  unknown = sorted(set(spec) - known)
  if unknown:
    raise ValueError(f"workload: unknown key(s) {unknown}; expected some of {sorted(known)}")
  args = {k: spec[k] for k in FIELDS[kind] if k in spec and spec[k] is not None}
  if kind == "synthetic":
    trajectories = simple_trajectories(**args, vocab_size=vocab_size)
  elif kind == "agentic":
    if "preset" not in args:
      raise ValueError("workload.preset: the agentic kind needs a preset (mal32k, mal48k, mal64k)")
    trajectories = agentic_trajectories(args.pop("preset"), **args, vocab_size=vocab_size)
  elif kind == "trace":
    for key in ("max_sessions", "max_requests"):  # 0 = no limit
      if args.get(key) == 0:
        args.pop(key)
    if not args.get("path"):
      raise ValueError("workload.path: the trace kind needs the path of a trace file")
    if "trace_scale" in args:
      args["scale"] = args.pop("trace_scale")
    trajectories = read_trace(args.pop("path"), **args, vocab_size=vocab_size,
                              block_tokens=block_tokens)
  else:
    from dualpath_jax.tasks.recall import recall_trajectories  # noqa: PLC0415 (optional task)
    trajectories = recall_trajectories(**args, vocab_size=vocab_size)
  max_turns = spec.get("max_turns") or 0
  if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 0:
    raise ValueError(f"workload.max_turns must be a non-negative int, got {max_turns!r}")
  kept, dropped_turns = [], 0
  for trajectory in trajectories:
    turns, total = [], 0
    for turn in trajectory.turns:
      total += len(turn.append_ids) + turn.gen_tokens
      if total > max_context_tokens or (max_turns and len(turns) == max_turns):
        break
      turns.append(turn)
    dropped_turns += len(trajectory.turns) - len(turns)
    if turns:
      kept.append(dataclasses.replace(trajectory, turns=tuple(turns)))
  if not kept:
    raise ValueError(f"workload: no trajectory has a first turn within runtime.max_context_tokens"
                     f"={max_context_tokens}")
  report = WorkloadReport(kind=kind, trajectories=len(kept),
                          turns=sum(len(t.turns) for t in kept), dropped_turns=dropped_turns,
                          dropped_trajectories=len(trajectories) - len(kept),
                          longest_tokens=max(trajectory_tokens(t) for t in kept))
  return kept, report
