"""Intra-engine scheduling on PEs (PAPER.md 5.5): compute-quota batch selection.

A request in a forward batch is a pair (cached, new): tokens whose KV exists already (storage hit
or earlier chunks) and tokens computed in this forward. A cost model, fit offline on profiled
forwards, predicts a data-parallel shard's forward time from its pairs; every shard fills its
batch FIFO up to the same compute quota (paper: 300 ms), chunking the request that would overflow
it, so that the shards' attention times match and the all-to-all after attention has no bubbles.

  CostModel, attention_work, fit_cost_model   the time model and its non-negative least squares
  QueuedPrefill, Chunk, remainder             a waiting request, one forward's share of it
  select_quota_batch                          the paper's rule
  select_token_budget_batch                   the baseline: a fixed token budget per forward
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np

_COST_KEYS = ("fixed_s", "per_token_s", "per_attention_s")


def attention_work(cached: int, new: int) -> float:
  """Causal attention work of `new` query tokens over `cached` + themselves: query-key pairs."""
  return new * cached + new * (new + 1) / 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostModel:
  """Predicted forward time of one data-parallel shard's batch."""

  fixed_s: float
  """Seconds per forward (launch, weights, synchronisation)."""
  per_token_s: float
  """Seconds per new token (projections, FFN/MoE)."""
  per_attention_s: float
  """Seconds per unit of attention work (one query-key pair, see `attention_work`)."""

  def __post_init__(self):
    for key in _COST_KEYS:
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) \
          or not math.isfinite(value) or value < 0:
        raise ValueError(f"CostModel.{key} must be a non-negative finite number, got {value!r}")

  def predict(self, pairs: Iterable[tuple[int, int]]) -> float:
    """Seconds for a forward over (cached, new) pairs; 0.0 for no pairs (no forward)."""
    total, count = 0.0, 0
    for cached, new in pairs:
      total += self.per_token_s * new + self.per_attention_s * attention_work(cached, new)
      count += 1
    return self.fixed_s + total if count else 0.0

  def to_dict(self) -> dict:
    return {key: float(getattr(self, key)) for key in _COST_KEYS}

  @classmethod
  def from_dict(cls, d) -> CostModel:
    """Inverse of `to_dict`; a missing, unknown or bad key raises ValueError naming it."""
    for key in _COST_KEYS:
      if key not in d:
        raise ValueError(f"CostModel.from_dict: missing key {key!r}")
    unknown = sorted(set(d) - set(_COST_KEYS))
    if unknown:
      raise ValueError(f"CostModel.from_dict: unknown key {unknown[0]!r}")
    values = {}
    for key in _COST_KEYS:
      value = d[key]
      if isinstance(value, bool) or not isinstance(value, (int, float)) \
          or not math.isfinite(value) or value < 0:
        raise ValueError(f"CostModel.from_dict: key {key!r} must be a non-negative finite "
                         f"number, got {value!r}")
      values[key] = float(value)
    return cls(**values)


def _features(pairs: Sequence[tuple[int, int]]) -> list[float]:
  if not pairs:
    return [0.0, 0.0, 0.0]
  return [1.0, float(sum(new for _, new in pairs)),
          float(sum(attention_work(cached, new) for cached, new in pairs))]


def fit_cost_model(samples: Sequence[tuple[Sequence[tuple[int, int]], float]], *,
                   relative: bool = True) -> tuple[CostModel, dict]:
  """Least squares fit of a CostModel to profiled forwards, all coefficients non-negative.

  `samples` are (pairs of one forward, its measured seconds). With `relative` (the default) the
  residuals are relative to the measured time, so that short forwards (where the fixed cost
  dominates) weigh as much as long ones and the fit minimises the error it reports; without it,
  plain absolute residuals. Every subset of the three features is solved unconstrained and the
  best solution with no negative coefficient is kept (exact non-negative least squares for three
  features). Returns the model and {"samples", "mean_abs_rel_error", "max_abs_rel_error"} over
  the samples.
  """
  if not samples:
    raise ValueError("fit_cost_model: no samples")
  rows, times = [], []
  for i, (pairs, measured_s) in enumerate(samples):
    pairs = list(pairs)
    if not pairs:
      raise ValueError(f"fit_cost_model: sample {i} has no pairs")
    if isinstance(measured_s, bool) or not isinstance(measured_s, (int, float)) \
        or not math.isfinite(measured_s) or measured_s <= 0:
      raise ValueError(f"fit_cost_model: sample {i} has a bad time {measured_s!r}")
    rows.append(_features(pairs))
    times.append(float(measured_s))
  a = np.asarray(rows, dtype=np.float64)
  y = np.asarray(times, dtype=np.float64)
  weights = 1.0 / y if relative else np.ones_like(y)
  a_weighted, y_weighted = a * weights[:, None], y * weights
  # Column scaling: attention work is ~1e8 times the fixed term; lstsq is better conditioned on
  # unit-norm columns.
  scale = np.linalg.norm(a_weighted, axis=0)
  scale[scale == 0] = 1.0
  a_scaled = a_weighted / scale

  best_coef, best_residual = np.zeros(3), float(np.sum(y_weighted ** 2))
  for size in (1, 2, 3):
    for subset in itertools.combinations(range(3), size):
      cols = list(subset)
      solution, *_ = np.linalg.lstsq(a_scaled[:, cols], y_weighted, rcond=None)
      if np.any(solution < 0):
        continue
      coef = np.zeros(3)
      coef[cols] = solution / scale[cols]
      residual = float(np.sum((a_weighted @ coef - y_weighted) ** 2))
      if residual < best_residual:
        best_coef, best_residual = coef, residual
  model = CostModel(fixed_s=float(best_coef[0]), per_token_s=float(best_coef[1]),
                    per_attention_s=float(best_coef[2]))
  rel = np.abs(a @ best_coef - y) / y
  return model, {"samples": len(samples), "mean_abs_rel_error": float(rel.mean()),
                 "max_abs_rel_error": float(rel.max())}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueuedPrefill:
  """A request (or what is left of it after earlier chunks) waiting on a PE."""

  request_id: int
  """The request's id."""
  cached: int
  """Tokens whose KV exists already: the storage hit plus earlier chunks."""
  remaining: int
  """Tokens still to compute (at least 1)."""

  def __post_init__(self):
    if isinstance(self.cached, bool) or not isinstance(self.cached, int) or self.cached < 0:
      raise ValueError(f"QueuedPrefill.cached must be a non-negative int, got {self.cached!r}")
    if isinstance(self.remaining, bool) or not isinstance(self.remaining, int) \
        or self.remaining < 1:
      raise ValueError(f"QueuedPrefill.remaining must be a positive int, got {self.remaining!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chunk:
  """What one forward computes for one request: tokens [cached, cached + new) of its prompt."""

  request_id: int
  """The request's id."""
  cached: int
  """Tokens before this chunk whose KV exists already."""
  new: int
  """Tokens this forward computes (at least 1)."""

  def __post_init__(self):
    if isinstance(self.cached, bool) or not isinstance(self.cached, int) or self.cached < 0:
      raise ValueError(f"Chunk.cached must be a non-negative int, got {self.cached!r}")
    if isinstance(self.new, bool) or not isinstance(self.new, int) or self.new < 1:
      raise ValueError(f"Chunk.new must be a positive int, got {self.new!r}")


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def select_quota_batch(queue: Sequence[QueuedPrefill], *, cost: CostModel, quota_s: float,
                       max_requests: int, min_chunk_tokens: int = 1) -> list[Chunk]:
  """One forward's batch: FIFO while the predicted time stays within `quota_s`.

  Whole entries are taken while cost.predict(batch) <= quota_s. The entry that would overflow is
  chunked to the largest new-token count in [min_chunk_tokens, remaining) that still fits (binary
  search: the prediction grows with new tokens), and the batch ends there. If the batch is empty
  and not even min_chunk_tokens fit, one chunk of min(min_chunk_tokens, remaining) tokens is taken
  anyway, so that every call makes progress: the only case where the quota is exceeded. At most
  `max_requests` entries.
  """
  if isinstance(quota_s, bool) or not isinstance(quota_s, (int, float)) \
      or not math.isfinite(quota_s) or quota_s <= 0:
    raise ValueError(f"quota_s must be a positive finite number, got {quota_s!r}")
  _check_positive_int("max_requests", max_requests)
  _check_positive_int("min_chunk_tokens", min_chunk_tokens)
  batch: list[Chunk] = []
  pairs: list[tuple[int, int]] = []

  def fits(entry: QueuedPrefill, new: int) -> bool:
    return cost.predict(pairs + [(entry.cached, new)]) <= quota_s

  for entry in queue:
    if len(batch) >= max_requests:
      break
    if fits(entry, entry.remaining):
      batch.append(Chunk(request_id=entry.request_id, cached=entry.cached, new=entry.remaining))
      pairs.append((entry.cached, entry.remaining))
      continue
    lo, hi = min_chunk_tokens, entry.remaining - 1
    if lo <= hi and fits(entry, lo):
      while lo < hi:  # invariant: lo fits; the answer is in [lo, hi]
        mid = (lo + hi + 1) // 2
        if fits(entry, mid):
          lo = mid
        else:
          hi = mid - 1
      batch.append(Chunk(request_id=entry.request_id, cached=entry.cached, new=lo))
    elif not batch:
      new = min(min_chunk_tokens, entry.remaining)
      batch.append(Chunk(request_id=entry.request_id, cached=entry.cached, new=new))
    break
  return batch


def select_token_budget_batch(queue: Sequence[QueuedPrefill], *, token_budget: int,
                              max_requests: int) -> list[Chunk]:
  """Baseline without the quota: FIFO while the batch's new tokens stay within `token_budget`.

  The entry that would overflow is chunked to what is left of the budget (at least 1 token, which
  only an empty batch needs since the budget is positive) and the batch ends there.
  """
  _check_positive_int("token_budget", token_budget)
  _check_positive_int("max_requests", max_requests)
  batch: list[Chunk] = []
  left = token_budget
  for entry in queue:
    if len(batch) >= max_requests or left == 0:
      break
    new = min(entry.remaining, left)
    batch.append(Chunk(request_id=entry.request_id, cached=entry.cached, new=new))
    left -= new
    if new < entry.remaining:
      break
  return batch


def remainder(entry: QueuedPrefill, chunk: Chunk) -> QueuedPrefill | None:
  """What is left of `entry` after `chunk` ran: cached grows by chunk.new; None when done."""
  if chunk.request_id != entry.request_id or chunk.cached != entry.cached:
    raise ValueError(f"chunk {chunk} is not the next chunk of {entry}")
  if chunk.new > entry.remaining:
    raise ValueError(f"chunk {chunk} computes more than the {entry.remaining} remaining tokens")
  if chunk.new == entry.remaining:
    return None
  return QueuedPrefill(request_id=entry.request_id, cached=entry.cached + chunk.new,
                       remaining=entry.remaining - chunk.new)
