"""Online serving (PAPER.md section 6.8): agents arrive over time; TTFT, TTST and TPOT per turn.

Agents arrive by a Poisson process of `aps` agents per second (exponential gaps from a seeded
numpy Generator), or at their trajectory's `arrival_s` (a trace's timestamps, times
`trace_time_scale`). Each agent replays its trajectory from round 0 to its last round: turn k+1
arrives `think_s` seconds after turn k ended (its blocks persisted, so it hits them). Prompts and
hit lengths are built like the offline job's (runtime/offline.py).

One loop on the caller's thread is the clients' side: a heap of due times (agent arrivals and next
turns), a queue of ended turns (the cluster's threads only put onto it), and the stopping rule.
A turn is submitted when it falls due; its arrival is that due time, so any lag before submission
counts in its TTFT. Per turn:

  TTFT  first_token - arrival
  TTST  second_token - first_token
  TPOT  (last_token - first_token) / (gen_tokens - 1); the DE stamps last_token when the turn's
        last token is decoded (before its blocks are persisted). Records without it (older runs)
        fall back to `done`, which includes persistence (an over-estimate).
  TTFT breakdown, consecutive segments that sum to TTFT:
        queueing  arrival -> read_start (prefill_start when nothing is read): the client's lag,
                  the global scheduler's wait for room, placement
        read      read_start -> read_done: the storage read, including its wait in the link queue
        read_to_prefill  read_done -> prefill_start: waiting for a PE batch (its queue, the quota)
        prefill   prefill_start -> prefill_done: every chunk of the prefill
        handoff   prefill_done -> first_token: PE -> DE KV transfer and DE admission
        (each boundary is clipped to be no earlier than the one before, so no segment is negative)

Stopping rule (the paper's, with its windows as arguments): a run stops taking arrivals when
  slo_violated  the SLO statistic (Slo.stat) of the TTFT over the last `steady_window_s` exceeds
                the TTFT SLO; the window holds the turns whose first token came in it and, as
                lower bounds, the ages of arrived turns still waiting for theirs (at least
                MIN_WINDOW_TURNS of them);
  steady_state  the mean TTFT of the last window differs by less than `steady_tolerance`
                (relative) from the mean of the window `steady_lag_s` earlier (the paper: 150 s
                windows, 30 minutes apart, 5%);
  all_finished  every agent arrived and ran its last turn;
  max_duration  `max_duration_s` passed.
Turns in flight then finish (up to `drain_timeout_s`) and are recorded; nothing new arrives.
"""

from __future__ import annotations

import dataclasses
import heapq
import queue
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from dualpath_jax.kvstore.block_store import KVBlockStore
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.runtime.cluster import Cluster
from dualpath_jax.runtime.metrics import ttft_segments
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.offline import _record, turn_request
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.workload.synthetic import AgentTrajectory

ARRIVALS = ("poisson", "trace")
SLO_STATS = ("mean", "p50", "p90", "p99")
STOP_REASONS = ("slo_violated", "steady_state", "all_finished", "max_duration")
MIN_WINDOW_TURNS = 5
"""Fewest TTFT samples in a window before the stopping rule judges it."""
TICK_S = 0.05
"""Longest the client loop sleeps between stopping-rule checks."""
PAPER_TTFT_S = 4.0
PAPER_TPOT_S = 0.05


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slo:
  """The serving SLO: a point is compliant if stat(TTFT) <= ttft_s and stat(TPOT) <= tpot_s."""

  ttft_s: float = PAPER_TTFT_S
  """Time-to-first-token bound (seconds), already scaled (the paper: 4 s)."""
  tpot_s: float = PAPER_TPOT_S
  """Time-per-output-token bound (seconds), already scaled (the paper: 50 ms)."""
  stat: str = "p90"
  """The statistic over a point's turns compared with the bounds: mean, p50, p90 or p99 (the paper
  does not say which)."""
  scale: float = 1.0
  """What the paper's bounds were multiplied by (for the record; ttft_s and tpot_s hold it)."""

  def __post_init__(self):
    for name in ("ttft_s", "tpot_s", "scale"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"slo.{name} must be positive, got {value!r}")
    if self.stat not in SLO_STATS:
      raise ValueError(f"slo.stat: unknown statistic {self.stat!r}; choose one of {SLO_STATS}")

  @classmethod
  def scaled(cls, *, ttft_s: float = PAPER_TTFT_S, tpot_s: float = PAPER_TPOT_S,
             scale: float = 1.0, stat: str = "p90") -> Slo:
    """The bounds ttft_s and tpot_s (the paper's by default) times `scale`."""
    for name, value in (("ttft_s", ttft_s), ("tpot_s", tpot_s), ("scale", scale)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"slo.{name} must be positive, got {value!r}")
    return cls(ttft_s=ttft_s * scale, tpot_s=tpot_s * scale, stat=stat, scale=scale)

  def of(self, values: Sequence[float]) -> float | None:
    """This SLO's statistic of `values` (None when empty)."""
    return stat_of(values, self.stat)

  def to_dict(self) -> dict:
    return dict(ttft_s=self.ttft_s, tpot_s=self.tpot_s, stat=self.stat, scale=self.scale,
                paper_ttft_s=PAPER_TTFT_S, paper_tpot_s=PAPER_TPOT_S)


def stat_of(values: Sequence[float], stat: str) -> float | None:
  """mean, or pNN (a percentile, numpy's linear interpolation) of `values`; None when empty."""
  if not len(values):
    return None
  if stat == "mean":
    return float(statistics.fmean(values))
  return float(np.percentile(values, float(stat[1:])))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineRun:
  """What one online run (one mode at one arrival rate) did."""

  mode: str
  aps: float
  """Agent arrival rate asked for (agents/s); with trace arrivals, the rate the trace was
  stretched to (or its own)."""
  stop_reason: str
  """One of STOP_REASONS."""
  duration_s: float
  """From the start to the stop (the last arrival's processing); the drain comes after."""
  drain_s: float
  """Time the turns in flight at the stop took to finish (or drain_timeout_s)."""
  turns: list[dict]
  """One record per completed turn: offline.py's fields plus arrival_s, ttft_s, ttst_s, tpot_s,
  ttft_breakdown_s, submit_lag_s, after_stop; times relative to the start."""
  arrivals_s: list[float]
  """Planned arrival time of every agent (relative to the start), in trajectory order."""
  agents_arrived: int
  agents_finished: int
  jct_s: dict[str, float]
  """Per finished agent: its last turn's end - its arrival (seconds)."""
  unfinished_turns: int
  """Turns still in flight when the drain gave up."""
  bytes: dict[str, int]
  """Bytes per path over the run, from the traffic managers."""
  describe: str
  """The cluster as run."""


def arrival_times(trajectories: Sequence[AgentTrajectory], *, aps: float, seed: int,
                  arrivals: str = "poisson", trace_time_scale: float = 1.0) -> list[float]:
  """Each trajectory's arrival (seconds from the start), in trajectory order.

  poisson: cumulative exponential gaps of mean 1/aps from numpy's default_rng(seed), so the first
  agent arrives after one gap and the same seed gives the same times. trace: each trajectory's
  arrival_s times trace_time_scale, shifted so that the earliest is 0.
  """
  if isinstance(aps, bool) or not isinstance(aps, (int, float)) or not aps > 0:
    raise ValueError(f"aps must be positive, got {aps!r}")
  if arrivals == "poisson":
    gaps = np.random.default_rng(seed).exponential(1.0 / aps, len(trajectories))
    return np.cumsum(gaps).tolist()
  if arrivals == "trace":
    missing = [t.agent_id for t in trajectories if t.arrival_s is None]
    if missing:
      raise ValueError(f"arrivals='trace': {len(missing)} trajectories have no arrival_s (e.g. "
                       f"{missing[0]}); use arrivals='poisson'")
    first = min(t.arrival_s for t in trajectories)
    return [(t.arrival_s - first) * trace_time_scale for t in trajectories]
  raise ValueError(f"arrivals: unknown arrival process {arrivals!r}; choose one of {ARRIVALS}")


def trace_rate(trajectories: Sequence[AgentTrajectory]) -> float | None:
  """A trace's own mean arrival rate (agents/s), None if it has no spread of arrival times."""
  times = sorted(t.arrival_s for t in trajectories if t.arrival_s is not None)
  if len(times) < 2 or times[-1] <= times[0]:
    return None
  return (len(times) - 1) / (times[-1] - times[0])


def turn_metrics(times: dict[str, float], arrival: float, gen_tokens: int) -> dict:
  """TTFT, TTST, TPOT and the TTFT breakdown of one turn (times: perf_counter stamps)."""
  first = times["first_token"]
  ttst = times["second_token"] - first if "second_token" in times else None
  tpot, tpot_source = None, None
  if gen_tokens >= 2:
    if "last_token" in times:
      last, tpot_source = times["last_token"], "last_token"
    elif gen_tokens == 2 and "second_token" in times:
      last, tpot_source = times["second_token"], "last_token"
    else:
      last, tpot_source = times["done"], "done"
    tpot = (last - first) / (gen_tokens - 1)
  return dict(ttft_s=first - arrival, ttst_s=ttst, tpot_s=tpot, tpot_source=tpot_source,
              ttft_breakdown_s=ttft_segments(times, arrival))


def run_online(runtime_config: RuntimeConfig, model, store: KVBlockStore, layout: KVLayout,
               trajectories: Sequence[AgentTrajectory], *, cost_model: CostModel, aps: float,
               seed: int, namespace_prefix: str = "",
               progress: Callable[[str], None] | None = None,
               max_duration_s: float | None = None, slo: Slo, steady_window_s: float,
               steady_tolerance: float, arrivals: str = "poisson",
               steady_lag_s: float | None = None, trace_time_scale: float = 1.0,
               drain_timeout_s: float = 120.0, label: str = "", devices=None) -> OnlineRun:
  """Serves the trajectories as they arrive on a fresh Cluster until the stopping rule says stop.

  steady_lag_s: how far back the steady-state rule's earlier window lies (None: steady_window_s,
  i.e. the window just before the last one).
  """
  offsets = arrival_times(trajectories, aps=aps, seed=seed, arrivals=arrivals,
                          trace_time_scale=trace_time_scale)
  if not steady_window_s > 0:
    raise ValueError(f"steady_window_s must be positive, got {steady_window_s!r}")
  if not steady_tolerance > 0:
    raise ValueError(f"steady_tolerance must be positive, got {steady_tolerance!r}")
  lag = steady_window_s if steady_lag_s is None else steady_lag_s
  if not lag >= steady_window_s:
    raise ValueError(f"steady_lag_s must be at least steady_window_s, got {lag!r}")
  if max_duration_s is not None and not max_duration_s > 0:
    raise ValueError(f"max_duration_s must be positive or None, got {max_duration_s!r}")
  done_queue: queue.Queue = queue.Queue()
  cluster = Cluster(runtime_config, model, store, layout, cost_model=cost_model,
                    on_turn_done=done_queue.put, devices=devices)
  bt = layout.block_tokens
  by_agent = {t.agent_id: t for t in trajectories}
  contexts = {t.agent_id: [] for t in trajectories}
  with_kv = {t.agent_id: 0 for t in trajectories}
  total = sum(len(t.turns) for t in trajectories)
  name = label or runtime_config.mode
  records: list[dict] = []
  in_flight: dict[tuple[str, int], tuple[TurnRequest, float, float]] = {}
  """(agent, turn) -> (request, arrival, submitted), perf_counter times."""
  ttft_at: list[tuple[float, float]] = []
  """(first_token, TTFT) of every completed turn, perf_counter times."""
  arrived, finished, jct = 0, 0, {}
  first_arrival: dict[str, float] = {}
  start = time.perf_counter()
  due: list[tuple[float, int, str, int]] = [(start + off, i, t.agent_id, 0)
                                            for i, (t, off) in enumerate(zip(trajectories,
                                                                             offsets))]
  heapq.heapify(due)
  sequence = len(due)

  def submit(agent_id: str, turn: int, arrival: float) -> None:
    request = turn_request(store, runtime_config.mode, namespace_prefix, by_agent[agent_id],
                           turn, contexts[agent_id], with_kv[agent_id], bt)
    in_flight[(agent_id, turn)] = (request, arrival, time.perf_counter())
    cluster.submit(request)

  def window_ttfts(now: float, end: float) -> list[float]:
    """TTFTs of turns whose first token came in (end - window, end]."""
    return [v for t, v in ttft_at if end - steady_window_s < t <= end]

  def stop_reason(now: float) -> str | None:
    if arrived == len(trajectories) and finished == len(trajectories):
      return "all_finished"
    if max_duration_s is not None and now - start >= max_duration_s:
      return "max_duration"
    waiting = [now - arrival for request, arrival, _ in in_flight.values()
               if "first_token" not in request.times]
    window = window_ttfts(now, now) + waiting
    if len(window) >= MIN_WINDOW_TURNS and slo.of(window) > slo.ttft_s:
      return "slo_violated"
    if now - start >= lag + steady_window_s:
      last, earlier = window_ttfts(now, now), window_ttfts(now, now - lag)
      if min(len(last), len(earlier)) >= MIN_WINDOW_TURNS:
        before = statistics.fmean(earlier)
        if before > 0 and abs(statistics.fmean(last) - before) / before < steady_tolerance:
          return "steady_state"
    return None

  def take(request: TurnRequest, stopped: bool) -> None:
    nonlocal finished, sequence
    if request.error is not None:
      raise RuntimeError(f"{request.agent_id} turn {request.turn} failed: "
                           f"{request.error!r}") from request.error
    agent_id = request.agent_id[len(namespace_prefix):]
    _, arrival, submitted = in_flight.pop((agent_id, request.turn))
    contexts[agent_id] = request.prompt.tolist() + request.generated
    with_kv[agent_id] = len(contexts[agent_id]) - 1
    record = _record(request, agent_id, start, layout)
    metrics = turn_metrics(request.times, arrival, request.gen_tokens)
    record.update(arrival_s=round(arrival - start, 6), submit_lag_s=round(submitted - arrival, 6),
                  after_stop=stopped, **metrics)
    records.append(record)
    ttft_at.append((request.times["first_token"], metrics["ttft_s"]))
    trajectory = by_agent[agent_id]
    if request.turn + 1 < len(trajectory.turns):
      if not stopped:
        sequence += 1
        heapq.heappush(due, (request.times["done"] + trajectory.turns[request.turn + 1].think_s,
                             sequence, agent_id, request.turn + 1))
    else:
      finished += 1
      jct[agent_id] = request.times["done"] - first_arrival[agent_id]

  last_print = 0.0

  def report(now: float, force: bool = False) -> None:
    nonlocal last_print
    if progress is None or (not force and now - last_print < 1.0):
      return
    last_print = now
    elapsed = now - start
    # Estimate: the later of the last planned arrival and the pace of completed turns.
    pace = elapsed / len(records) * (total - len(records)) if records else float("nan")
    eta = max(start + max(offsets, default=0.0) - now, pace)
    progress(f"[{name} aps={aps:g}] turns {len(records)}/{total}  agents {arrived}/"
             f"{len(trajectories)} arrived, {finished} finished  elapsed {elapsed:6.1f}s  "
             f"eta {eta:6.1f}s (unless the stopping rule ends it sooner)")

  reason = None
  try:
    while reason is None:
      now = time.perf_counter()
      while due and due[0][0] <= now:
        when, _, agent_id, turn = heapq.heappop(due)
        if turn == 0:
          arrived += 1
          first_arrival[agent_id] = when
        submit(agent_id, turn, when)
      wait = TICK_S if not due else min(TICK_S, max(0.0, due[0][0] - time.perf_counter()))
      try:
        take(done_queue.get(timeout=wait), stopped=False)
        while True:
          take(done_queue.get_nowait(), stopped=False)
      except queue.Empty:
        pass
      now = time.perf_counter()
      reason = stop_reason(now)
      report(now)
    stop = time.perf_counter()
    deadline = stop + drain_timeout_s
    while in_flight and time.perf_counter() < deadline:
      try:
        take(done_queue.get(timeout=min(TICK_S * 4, max(0.0, deadline - time.perf_counter()))),
             stopped=True)
      except queue.Empty:
        pass
    drained = time.perf_counter()
    report(drained, force=True)
  finally:
    cluster.close()
  return OnlineRun(
      mode=runtime_config.mode, aps=float(aps), stop_reason=reason, duration_s=stop - start,
      drain_s=drained - stop, turns=records, arrivals_s=list(offsets), agents_arrived=arrived,
      agents_finished=finished, jct_s=jct, unfinished_turns=len(in_flight),
      bytes=cluster.bytes_by_path(), describe=cluster.describe())
