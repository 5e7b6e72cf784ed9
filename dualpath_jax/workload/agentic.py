"""Synthetic agentic trajectories with the statistics of the paper's trace datasets (Table 2).

PAPER.md section 1.1, Table 2: three datasets of 500 agent trajectories from production agentic RL
(a sandboxed repository with a known bug, fixed through bash tool calls), cut at a maximum length
MAL of 32K, 48K or 64K tokens:

  preset   MAL     turns  append/turn  gen/turn  total tokens  context (avg)
  mal32k   32768     60       608        148        28,639        17,183
  mal48k   49152    106       474        172        42,607        25,120
  mal64k   65536    157       429        176        55,958        32,721

The trajectories themselves are not public, so `agentic_trajectories` draws lengths from a model
whose means reproduce the table and fills them with random tokens. With 500 agents every mean is
within 1.3% (mal32k), 2.2% (mal48k) and 1.8% (mal64k) of the table at seed 0, and within 3.3% for
each of seeds 0-29 (append/turn varies most; the others stay within 1.3%). The replay protocol is
the paper's (section 6.4): turn i appends A_i and is forced to generate exactly g_i tokens; its
prompt is A_1, G_1, ..., A_{i-1}, G_{i-1}, A_i.

Which definitions the table uses (`describe` uses the same ones):
  turns         mean over trajectories of the number of turns.
  append/turn   mean over trajectories of (the trajectory's appended tokens / its turns).
  gen/turn      mean over trajectories of (the trajectory's generated tokens / its turns).
  total tokens  mean over trajectories of the final context: all appended plus generated tokens.
  context (avg) mean over all turns of all trajectories, pooled, of the turn's prompt length
                (previous context + the turn's append: what the turn's prefill attends to).
Per-trajectory means for append/gen are forced by the table: pooled means would make
total = turns * (append + gen) exactly, e.g. 60 * 756 = 45,360 > MAL for mal32k against 28,639.
So trajectories with few turns must have large appends per turn. The table does not pin down the
context definition as firmly; we read it as the pooled mean prompt because the paper's headline hit
rate, 1 - 429 / 32,721 = 98.7%, divides by it as the prompt length of a typical turn (hit accounting
pools over turns), and because it sits at MAL / 2 in all three datasets (0.52, 0.51, 0.50 of MAL),
as a pooled mean does when most turns belong to trajectories that grow into MAL. Under our model
the per-trajectory mean prompt (`describe`'s context_avg_per_trajectory) is 3-6% lower.

Length model, per trajectory (deterministic per seed and agent index; "lognormal" = median *
exp(sigma * z) with standard normal z):
  * a natural number of turns N0 (lognormal; the agent stops there if it has not reached MAL);
  * a per-trajectory append scale s (lognormal, median 1): some trajectories read big files and
    reach MAL in a few turns, many run long on small tool outputs;
  * a first append (the system prompt and task, lognormal) and later appends (lognormal, median
    append_median * s), generation lengths (lognormal);
  * MAL cuts the trajectory like the paper's datasets: a turn whose prompt leaves no room for one
    generated token is dropped, and the last turn's generation stops at MAL (total <= MAL).
For N0, s and the first append, z is a quantile of a normal truncated to [-1.5, 1.5], taken from a
Kronecker sequence over agent indices: every prefix of agents covers the distribution evenly, which
keeps the means of 500 agents close to the model's (append/turn hangs on the few trajectories with
the largest s). Per-turn z are independent draws clipped to [-3, 3]. The model's parameters were
fitted to the table numerically; they are a fit, not measurements (e.g. the first append's median
is 4.4-5.5K tokens, and the smallest s give appends of a few tokens in mal64k).

Uniqueness: every token is drawn from the agent's own random stream, so the first append is a
unique random round and agents never share KV (the paper prepends a random round with g_1 = 1 to
trajectories it re-samples; `unique_round_tokens` adds that round explicitly when wanted, outside
the Table 2 statistics).

Scaling: `scale` divides every length and MAL by an integer factor (rounding, at least one token)
for CPU runs; turn counts keep their shape. mal32k with scale 32 has MAL 1024. Preset names carry no
scale (the `scale` argument does); agent ids name both, e.g. "mal32k-s32-agent00007".
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

import numpy as np

from dualpath_jax.workload.synthetic import AgentTrajectory, Turn


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgenticPreset:
  """A Table 2 dataset: its published means and the length model that reproduces them."""

  name: str
  """Preset name, e.g. "mal32k"."""
  mal: int
  """Maximum trajectory length (MAL) in tokens: appended plus generated tokens never exceed it."""
  table_turns: float
  """Table 2: mean turns per trajectory."""
  table_append: float
  """Table 2: mean appended tokens per turn (per-trajectory mean, averaged over trajectories)."""
  table_gen: float
  """Table 2: mean generated tokens per turn (per-trajectory mean, averaged over trajectories)."""
  table_total: float
  """Table 2: mean total tokens (final context) per trajectory."""
  table_context: float
  """Table 2: mean prompt length over all turns (pooled)."""
  turns_median: float
  """Model: median of the natural number of turns N0 (per trajectory)."""
  turns_sigma: float
  """Model: log-space sigma of N0."""
  first_median: float
  """Model: median first append (system prompt and task; per trajectory)."""
  first_sigma: float
  """Model: log-space sigma of the first append."""
  scale_sigma: float
  """Model: log-space sigma of the per-trajectory append scale s (median 1)."""
  append_median: float
  """Model: median later append at append scale 1 (per turn; s times this in a trajectory)."""
  append_sigma: float
  """Model: log-space sigma of a later append around its trajectory's median."""
  gen_median: float
  """Model: median generation length (per turn, before the cut at MAL)."""
  gen_sigma: float
  """Model: log-space sigma of a generation length."""

  def table(self, scale: int = 1) -> dict[str, float]:
    """Table 2's means in `describe`'s keys, lengths divided by `scale` (turns are not)."""
    _check_scale(scale)
    return dict(turns=self.table_turns, append_per_turn=self.table_append / scale,
                gen_per_turn=self.table_gen / scale, total_tokens=self.table_total / scale,
                context_avg=self.table_context / scale, max_total=float(self.mal // scale))


# Model parameters fitted (Gauss-Newton on 12 seeds x 500 agents) to Table 2's five means.
PRESETS: dict[str, AgenticPreset] = {
    p.name: p for p in (
        AgenticPreset(name="mal32k", mal=32 * 1024, table_turns=60, table_append=608,
                      table_gen=148, table_total=28_639, table_context=17_183,
                      turns_median=124.4, turns_sigma=1.39, first_median=4370.0, first_sigma=0.5,
                      scale_sigma=1.604, append_median=232.3, append_sigma=0.5, gen_median=123.8,
                      gen_sigma=0.6),
        AgenticPreset(name="mal48k", mal=48 * 1024, table_turns=106, table_append=474,
                      table_gen=172, table_total=42_607, table_context=25_120,
                      turns_median=211.8, turns_sigma=1.383, first_median=5253.0, first_sigma=0.5,
                      scale_sigma=1.989, append_median=134.8, append_sigma=0.5, gen_median=143.9,
                      gen_sigma=0.6),
        AgenticPreset(name="mal64k", mal=64 * 1024, table_turns=157, table_append=429,
                      table_gen=176, table_total=55_958, table_context=32_721,
                      turns_median=337.0, turns_sigma=1.59, first_median=5470.0, first_sigma=0.5,
                      scale_sigma=2.33, append_median=92.5, append_sigma=0.5, gen_median=147.0,
                      gen_sigma=0.6),
    )
}
"""The Table 2 presets by name."""

# Agent k's quantiles of (N0, s, first append) are frac(offset + (k + 1) * step), a Kronecker
# sequence per quantity: every prefix of agents covers [0, 1) evenly (largest gap < 2 / agents). The
# steps are badly approximable irrationals, the golden ratio for s, whose tail the means hang on.
_STEPS = (math.sqrt(2.0) - 1.0, (math.sqrt(5.0) - 1.0) / 2.0, math.sqrt(3.0) - 1.0)
_NORMAL = statistics.NormalDist()
_TRAJ_Z = 1.5   # per-trajectory normals are truncated to [-1.5, 1.5] (quantiles rescaled)
_TURN_Z = 3.0   # per-turn normals are clipped to [-3, 3]


def get_preset(preset: str) -> AgenticPreset:
  """The preset named `preset`; ValueError naming the known ones otherwise."""
  if preset not in PRESETS:
    raise ValueError(f"unknown agentic preset {preset!r}; known presets: {', '.join(PRESETS)}")
  return PRESETS[preset]


def _check_scale(scale: int) -> None:
  if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"scale must be a positive int, got {scale!r}")


def _lognormal(z: np.ndarray | float, median: float, sigma: float) -> np.ndarray:
  """median * exp(sigma * z): lognormal values from standard normal `z`."""
  return median * np.exp(sigma * np.asarray(z, np.float64))


def trajectory_lengths(preset: AgenticPreset, agent: int, *, seed: int = 0, scale: int = 1
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(append lengths, generation lengths), int64 [turns] each, of agent `agent`'s trajectory.

  Deterministic in (preset, agent, seed, scale); the random draws do not depend on `scale`, which
  only divides the lengths (and MAL) before the cut at MAL.
  """
  _check_scale(scale)
  rng = np.random.default_rng([seed, 0x6A67, agent])
  offsets = np.random.default_rng([seed, 0x6A68]).random(3)
  lo = _NORMAL.cdf(-_TRAJ_Z)
  z_turns, z_scale, z_first = (_NORMAL.inv_cdf(lo + (1 - 2 * lo) * ((o + (agent + 1) * r) % 1.0))
                               for o, r in zip(offsets, _STEPS))
  mal = preset.mal // scale
  # Every turn holds >= 2 tokens, so more than mal // 2 turns never fit.
  log_turns = math.log(preset.turns_median) + preset.turns_sigma * z_turns
  turns0 = max(1, min(mal // 2 + 1, math.ceil(math.exp(min(log_turns, 40.0)))))
  s = float(_lognormal(z_scale, 1.0, preset.scale_sigma))
  first = float(_lognormal(z_first, preset.first_median, preset.first_sigma))
  appends, gens = [], []
  context = 0
  chunk = 256
  done = False
  while not done and len(appends) < turns0:
    n = min(chunk, turns0 - len(appends))
    z = np.clip(rng.standard_normal((2, n)), -_TURN_Z, _TURN_Z)
    a = _lognormal(z[0], preset.append_median * s, preset.append_sigma)
    g = _lognormal(z[1], preset.gen_median, preset.gen_sigma)
    if not appends:
      a[0] = first
    a = np.maximum(1, np.rint(a / scale)).astype(np.int64)
    g = np.maximum(1, np.rint(g / scale)).astype(np.int64)
    if not appends:
      a[0] = min(a[0], mal - 1)   # a first turn always fits (never the case at the fitted values)
    for ai, gi in zip(a.tolist(), g.tolist()):
      if context + ai + 1 > mal:
        done = True
        break
      gi = min(gi, mal - context - ai)
      appends.append(ai)
      gens.append(gi)
      context += ai + gi
      if context >= mal:
        done = True
        break
  return np.asarray(appends, np.int64), np.asarray(gens, np.int64)


def agentic_trajectories(preset: str, *, agents: int, vocab_size: int, seed: int = 0,
                         scale: int = 1, unique_round_tokens: int = 0) -> list[AgentTrajectory]:
  """`agents` synthetic trajectories with the statistics of Table 2's dataset `preset`.

  Args:
    preset: "mal32k", "mal48k" or "mal64k" (see PRESETS); anything else raises ValueError.
    agents: number of trajectories.
    vocab_size: token ids are drawn uniformly from [0, vocab_size).
    seed: the same (preset, seed, scale) gives the same trajectories; agent k's trajectory does not
      depend on `agents`, so fewer agents give a prefix.
    scale: divides all lengths and MAL by this integer (e.g. 32 for CPU: MAL 1024 for mal32k).
    unique_round_tokens: if positive, prepend the paper's synthetic round (section 6.4): that many
      random tokens with g_1 = 1. It is a turn like any other for `describe`, so the result no
      longer matches Table 2 exactly (and may exceed MAL by the round's length + 1). Every token is
      already from the agent's own random stream, so agents never share KV without it.

  Returns:
    Trajectories named f"{preset}-s{scale}-agent{k:05d}", offline (think_s 0, arrival_s None).
  """
  p = get_preset(preset)
  _check_scale(scale)
  for name, value in (("agents", agents), ("vocab_size", vocab_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if unique_round_tokens < 0:
    raise ValueError(f"unique_round_tokens must be >= 0, got {unique_round_tokens}")
  out = []
  for k in range(agents):
    appends, gens = trajectory_lengths(p, k, seed=seed, scale=scale)
    rng = np.random.default_rng([seed, 0x746B, k])
    ids = rng.integers(0, vocab_size, int(appends.sum()) + unique_round_tokens, dtype=np.int32)
    turns = []
    if unique_round_tokens:
      turns.append(Turn(append_ids=ids[:unique_round_tokens], gen_tokens=1))
    bounds = np.concatenate([[0], np.cumsum(appends)]) + unique_round_tokens
    for i, g in enumerate(gens.tolist()):
      turns.append(Turn(append_ids=ids[bounds[i]:bounds[i + 1]], gen_tokens=int(g)))
    out.append(AgentTrajectory(agent_id=f"{preset}-s{scale}-agent{k:05d}", turns=tuple(turns)))
  return out


def describe(trajectories: Sequence[AgentTrajectory]) -> dict[str, float]:
  """Table 2's statistics of `trajectories`, in its definitions (see the module docstring).

  Returns a dict with: agents; turns (mean per trajectory); append_per_turn and gen_per_turn (mean
  over trajectories of the trajectory's per-turn mean); total_tokens (mean final context: appended
  plus generated tokens); context_avg (mean prompt length over all turns, pooled: Table 2's
  "context (avg)"); context_avg_per_trajectory (mean over trajectories of their mean prompt, the
  other reading, for comparison); max_total (the longest trajectory's total); hit_rate (pooled
  1 - appended / prompt tokens, the reuse a perfect in-trajectory cache gets). Lengths are in the
  trajectories' own (possibly scaled) tokens.
  """
  if not trajectories:
    raise ValueError("describe needs at least one trajectory")
  turns, append_pt, gen_pt, totals, context_pt = [], [], [], [], []
  prompt_sum = append_sum = n_turns = 0
  for t in trajectories:
    if not t.turns:
      raise ValueError(f"trajectory {t.agent_id} has no turns")
    a = np.array([turn.append_ids.shape[0] for turn in t.turns], np.int64)
    g = np.array([turn.gen_tokens for turn in t.turns], np.int64)
    prompts = np.cumsum(a) + np.concatenate([[0], np.cumsum(g)[:-1]])
    turns.append(a.size)
    append_pt.append(a.sum() / a.size)
    gen_pt.append(g.sum() / g.size)
    totals.append(int(a.sum() + g.sum()))
    context_pt.append(prompts.mean())
    prompt_sum += int(prompts.sum())
    append_sum += int(a.sum())
    n_turns += a.size
  return dict(agents=len(trajectories), turns=float(np.mean(turns)),
              append_per_turn=float(np.mean(append_pt)), gen_per_turn=float(np.mean(gen_pt)),
              total_tokens=float(np.mean(totals)), context_avg=prompt_sum / n_turns,
              context_avg_per_trajectory=float(np.mean(context_pt)), max_total=float(max(totals)),
              hit_rate=1.0 - append_sum / prompt_sum)
