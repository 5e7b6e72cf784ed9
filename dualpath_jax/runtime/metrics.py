"""Load-balance metrics of a run (PAPER.md 6.8), from records the runtime keeps; numpy only.

  snic_balance   storage-link traffic: max/mean bytes over the links, per sliding window
                 (paper: round robin 1.53, DualPath 1.18)
  attn_balance   attention time of a PE group's data-parallel shards: max/mean per forward,
                 predicted and measured (paper: 1.06 with the compute quota)
  decode_inflation  decode step time of the DEs while KV moves touch their devices, against
                 steps without (the interference the traffic manager exists to prevent)
  ttft_segments  one turn's TTFT split at its timestamps (offline and online runs, their plots)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

TTFT_SEGMENTS = ("queueing", "read", "read_to_prefill", "prefill", "handoff")
"""A turn's TTFT in order: queueing (start -> read_start; without a read, -> prefill_start),
read (read_start -> read_done: the storage link's queue and transfer), read_to_prefill
(read_done -> prefill_start: waiting for a PE batch), prefill (prefill_start -> prefill_done,
every chunk), handoff (prefill_done -> first_token: KV to the DE, decode start)."""


def ttft_segments(times: Mapping[str, float], start: float | None) -> dict[str, float] | None:
  """TTFT_SEGMENTS of one turn from `start` (its arrival, or its 'ready' stamp) to first_token.

  Each boundary is clamped between the one before it and first_token, so the segments are
  non-negative and add up to the TTFT. None for a turn without prefill or first-token stamps.
  """
  if start is None or any(times.get(k) is None
                          for k in ("prefill_start", "prefill_done", "first_token")):
    return None
  first = times["first_token"]
  read = times.get("read_start") is not None and times.get("read_done") is not None
  raw = [start, times["read_start"] if read else times["prefill_start"],
         times["read_done"] if read else times["prefill_start"], times["prefill_start"],
         times["prefill_done"], first]
  bounds: list[float] = []
  for t in raw:
    bounds.append(t if not bounds else min(max(t, bounds[-1]), first))
  return {name: bounds[i + 1] - bounds[i] for i, name in enumerate(TTFT_SEGMENTS)}


def _summary(ratios: list[float]) -> dict:
  if not ratios:
    return {"mean": None, "p50": None, "p90": None, "max": None}
  values = np.asarray(ratios, dtype=np.float64)
  return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
          "p90": float(np.percentile(values, 90)), "max": float(values.max())}


class _CumulativeBytes:
  """Bytes one link moved before time t: each record's bytes spread evenly over its span."""

  def __init__(self, records: Sequence[tuple[float, float, int]]):
    spans = [(float(t0), float(t1), float(b)) for t0, t1, b in records if t1 > t0 and b > 0]
    points = [(float(t0), float(b)) for t0, t1, b in records if t1 <= t0 and b > 0]
    # Piecewise linear part: the rate changes at every start and end of a span.
    if spans:
      times = np.array([t for t0, t1, _ in spans for t in (t0, t1)])
      deltas = np.array([d for t0, t1, b in spans for d in (b / (t1 - t0), -b / (t1 - t0))])
      order = np.argsort(times, kind="stable")
      times, deltas = times[order], deltas[order]
      rate = np.cumsum(deltas)  # rate after each breakpoint
      # Where no span is active the rate is 0 only up to round-off: make it exact, so that idle
      # stretches move exactly 0 bytes (windows with no traffic are skipped).
      active = np.cumsum(np.tile([1, -1], len(spans))[order])  # spans running after each
      rate[active == 0] = 0.0
      cumulative = np.concatenate([[0.0], np.cumsum(rate[:-1] * np.diff(times))])
      self._times, self._cumulative = times, cumulative
    else:
      self._times = self._cumulative = None
    # Zero-length records: steps.
    points.sort()
    self._point_times = np.array([t for t, _ in points])
    self._point_cumulative = np.concatenate([[0.0], np.cumsum([b for _, b in points])])

  def at(self, t: np.ndarray, *, inclusive: np.ndarray) -> np.ndarray:
    """Bytes before t (zero-length records at exactly t counted where `inclusive`)."""
    total = np.zeros_like(t)
    if self._times is not None:
      total += np.interp(t, self._times, self._cumulative)
    if len(self._point_times):
      left = np.searchsorted(self._point_times, t, side="left")
      right = np.searchsorted(self._point_times, t, side="right")
      total += self._point_cumulative[np.where(inclusive, right, left)]
    return total


def snic_balance(link_records: Mapping[int, Sequence[tuple[float, float, int]]], *,
                 window_s: float, step_s: float | None = None) -> dict:
  """Max/mean of the bytes read per storage link, over sliding windows.

  `link_records` maps each link (node) to its completed reads as (t_start, t_end, bytes); a link
  with no records counts as a link that moved 0 bytes. Each record's bytes are spread evenly over
  [t_start, t_end] (a zero-length record puts them all at t_start). Windows of `window_s` start
  every `step_s` (default window_s / 2) from the first start until one covers the last end;
  windows [s, s + window_s) are half-open except the last, and windows with no traffic are
  skipped. Returns {"mean", "p50", "p90", "max"} of the per-window ratios (None with no window),
  with "windows", "window_s" and "links".
  """
  if isinstance(window_s, bool) or not isinstance(window_s, (int, float)) \
      or not math.isfinite(window_s) or window_s <= 0:
    raise ValueError(f"window_s must be a positive finite number, got {window_s!r}")
  if step_s is None:
    step_s = window_s / 2
  if isinstance(step_s, bool) or not isinstance(step_s, (int, float)) \
      or not math.isfinite(step_s) or step_s <= 0:
    raise ValueError(f"step_s must be a positive finite number, got {step_s!r}")
  for link, records in link_records.items():
    for record in records:
      t0, t1, nbytes = record
      if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0 or nbytes < 0:
        raise ValueError(f"snic_balance: link {link} has a bad record {record!r}")
  result = {"windows": 0, "window_s": float(window_s), "links": len(link_records)}
  all_records = [r for records in link_records.values() for r in records]
  if not all_records:
    return {**_summary([]), **result}

  first = min(float(r[0]) for r in all_records)
  last = max(float(r[1]) for r in all_records)
  count = 1 + max(0, math.ceil((last - first - window_s) / step_s))
  starts = first + step_s * np.arange(count, dtype=np.float64)
  ends = starts + window_s
  final = np.arange(count) == count - 1
  never = np.zeros(count, dtype=bool)
  cumulative = [_CumulativeBytes(records) for records in link_records.values()]
  per_link = np.stack([c.at(ends, inclusive=final) - c.at(starts, inclusive=never)
                       for c in cumulative])  # [links, windows]
  per_link = np.maximum(per_link, 0.0)  # float round-off of the cumulative sums
  totals = per_link.sum(axis=0)
  busy = totals > 0
  ratios = per_link.max(axis=0)[busy] * len(link_records) / totals[busy]
  return {**_summary([float(r) for r in ratios]), **result, "windows": int(busy.sum())}


def attn_balance(forwards: Sequence[Sequence[tuple[float, float] | None]]) -> dict:
  """Max/mean over a PE group's data-parallel shards of their attention time, per forward.

  Each forward is a list over the shards of (predicted_s, measured_s), or None for a shard with
  no work; only forwards where every shard had work count. Returns the mean and max of the
  per-forward ratios, predicted and measured (None when no forward counts), with "forwards"
  (all) and "forwards_all_busy" (counted). A forward whose times are all 0 counts as 1.0.
  """
  predicted, measured = [], []
  for forward in forwards:
    if not forward or any(shard is None for shard in forward):
      continue
    for ratios, values in ((predicted, [p for p, _ in forward]),
                           (measured, [m for _, m in forward])):
      mean = sum(values) / len(values)
      ratios.append(max(values) / mean if mean > 0 else 1.0)
  counted = len(predicted)
  return {
      "predicted_mean": sum(predicted) / counted if counted else None,
      "predicted_max": max(predicted) if counted else None,
      "measured_mean": sum(measured) / counted if counted else None,
      "measured_max": max(measured) if counted else None,
      "forwards": len(forwards),
      "forwards_all_busy": counted,
  }


STEP_PARTS = ("dispatch_s", "wait_s", "admit_s")
"""The parts of a DE's step period its records carry after (start, end, active): decode_worker
StepRecord."""


def decode_inflation(decode_steps: Mapping[str, Sequence[tuple]], kv_moves: Sequence[tuple]
                     ) -> dict:
  """Decode step-time inflation from KV traffic on the DEs' devices.

  decode_steps: per DE (engine name), its steps as (t_start, t_end, active sequences), or
  decode_worker.StepRecords, which add the host seconds of the period's parts (STEP_PARTS).
  kv_moves: device-side KV moves as (t_start, t_end, path, source, destination), the ends being
  engine names. A step is "with KV" if a move with the DE at either end overlaps it in time.
  Steps are compared within the same DE and active-sequence count (their work is the same up to
  context lengths): per (DE, count) with both kinds, median with KV / median without - 1;
  `inflation` is their mean weighted by the steps with KV (None where no pair exists).
  `inflation_by_path` repeats it counting only moves of one path (h2d, d2h, d2d).
  `excess_s_by_part` (StepRecords only): the same pairs and weights, the median with KV minus
  the median without, in seconds, of the period and of each part; 'other' is the period less
  its parts (this thread's other work, taking the GIL back between calls). Medians do not add
  up, so the parts only roughly sum to the period's excess. `median_part_s`: each part's median
  over all steps with KV and all without (StepRecords only).
  """
  def overlapping(de: str, paths=None) -> list[bool]:
    moves = sorted((float(m[0]), float(m[1])) for m in kv_moves if de in (m[3], m[4])
                   and (paths is None or m[2] in paths))
    if not moves:
      return [False] * len(decode_steps[de])
    starts = np.array([m0 for m0, _ in moves])
    latest_end = np.maximum.accumulate(np.array([m1 for _, m1 in moves]))
    out = []
    for t0, t1, *_ in decode_steps[de]:  # some move starting before t1 ends after t0
      before = int(np.searchsorted(starts, t1, side="left"))
      out.append(bool(before and latest_end[before - 1] > t0))
    return out

  def pairs(paths=None):
    """(steps with KV, steps without) per DE and active-sequence count, where both exist."""
    for de, steps in decode_steps.items():
      groups: dict[int, tuple[list, list]] = {}
      for step, with_kv in zip(steps, overlapping(de, paths)):
        groups.setdefault(step[2], ([], []))[with_kv].append(step)
      yield from ((loaded, clean) for clean, loaded in groups.values() if clean and loaded)

  def period(step) -> float:
    return step[1] - step[0]

  def inflation(paths=None) -> tuple[float | None, int, int]:
    weighted, weight, clean_steps = 0.0, 0, 0
    for loaded, clean in pairs(paths):
      ratio = np.median([period(s) for s in loaded]) / np.median([period(s) for s in clean])
      weighted += (float(ratio) - 1.0) * len(loaded)
      weight += len(loaded)
      clean_steps += len(clean)
    return (weighted / weight if weight else None), weight, clean_steps

  def excess_by_part() -> dict[str, float] | None:
    parts = {"period": period, "other": lambda s: period(s) - sum(s[3:3 + len(STEP_PARTS)])}
    parts.update({name: (lambda s, i=i: s[3 + i]) for i, name in enumerate(STEP_PARTS)})
    weighted, weight = dict.fromkeys(parts, 0.0), 0
    for loaded, clean in pairs():
      for name, part in parts.items():
        weighted[name] += len(loaded) * float(np.median([part(s) for s in loaded])
                                               - np.median([part(s) for s in clean]))
      weight += len(loaded)
    return {name: w / weight for name, w in weighted.items()} if weight else None

  def median_parts(flags: list[bool]) -> dict:
    records = [s for steps in decode_steps.values() for s in steps]
    out = {}
    for kind, wanted in (("with_kv", True), ("without", False)):
      chosen = [s for s, f in zip(records, flags) if f == wanted]
      out[kind] = {name: float(np.median([s[3 + i] for s in chosen])) if chosen else None
                   for i, name in enumerate(STEP_PARTS)}
    return out

  all_steps = [period(s) for steps in decode_steps.values() for s in steps]
  flags = [f for de in decode_steps for f in overlapping(de)]
  with_kv = [d for d, f in zip(all_steps, flags) if f]
  without = [d for d, f in zip(all_steps, flags) if not f]
  value, compared_kv, compared_clean = inflation()
  has_parts = all(len(s) >= 3 + len(STEP_PARTS) for steps in decode_steps.values()
                  for s in steps)
  return {
      "inflation": value,
      "steps": len(all_steps), "steps_with_kv": len(with_kv),
      "compared_steps_with_kv": compared_kv, "compared_steps_without": compared_clean,
      "median_step_s_with_kv": float(np.median(with_kv)) if with_kv else None,
      "median_step_s_without": float(np.median(without)) if without else None,
      "inflation_by_path": {path: inflation({path})[0] for path in ("h2d", "d2h", "d2d")},
      "excess_s_by_part": excess_by_part() if has_parts and all_steps else None,
      "median_part_s": median_parts(flags) if has_parts and all_steps else None,
      "method": "per DE and active-sequence count: median step with a KV move touching the DE "
                "/ median without - 1, weighted by steps with KV",
  }
