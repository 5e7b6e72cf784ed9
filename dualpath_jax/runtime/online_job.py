"""The online serving experiment as a library: config dict -> typed records -> sweeps -> files.

Notebooks and scripts both call `OnlineJob.from_config(config, workdir).run()`. Per mode (or named
variant) it sweeps the agent arrival rates of `aps_list` in ascending order, each point a fresh
Cluster serving Poisson (or trace) arrivals with its own store namespaces (runtime/online.py), and
stops the sweep after the first point that breaks the SLO. Outputs:
  config.json   the config as run
  summary.json  {"runs": [{mode, max_aps_slo, points: [{aps, ttft_p50_s, ttft_p99_s, tpot_p50_s,
                 tpot_p99_s, ttst_p50_s, ttst_p99_s, jct_mean_s, ttft_breakdown_s{...}, slo_ok,
                 stop_reason, turns, duration_s, agents_arrived, agents_finished, ...}]}],
                 "slo": {...}, "compliance": "...", ...}
  turns.jsonl   one record per turn, mode and APS: arrival, timestamps, TTFT/TTST/TPOT, breakdown
  online_latency.png, online_ttft_breakdown.png   (analysis/online_plots.py)

The model, topology, runtime, workload, store and cost-model sections are the offline job's and
are validated by `OfflineJob.from_config` (runtime/offline_job.py); this module adds the online
fields and reuses that job's cost-model loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import uuid
from collections.abc import Callable

from dualpath_jax.kvstore import KVBlockStore
from dualpath_jax.runtime.offline import run_offline
from dualpath_jax.runtime.metrics import TTFT_SEGMENTS
from dualpath_jax.runtime.offline_job import BYTE_KEYS, OfflineJob
from dualpath_jax.runtime.online import (ARRIVALS, PAPER_TPOT_S, PAPER_TTFT_S, OnlineRun,
                                         Slo, run_online, stat_of, trace_rate)
from dualpath_jax.runtime.storage_link import link_emulation

ONLINE_KEYS = ("aps_list", "arrivals", "seed", "slo", "steady_window_s", "steady_lag_s",
               "steady_tolerance", "max_point_duration_s", "drain_timeout_s")
SLO_KEYS = ("ttft_s", "tpot_s", "scale", "stat")
COMPLIANCE = ("a point is SLO-compliant when it did not stop for an SLO break, every turn in "
              "flight at its stop finished, and slo.stat of its turns' TTFT <= slo.ttft_s and of "
              "their TPOT <= slo.tpot_s")


def _positive(name: str, value, *, none_ok: bool = False) -> float | None:
  if value is None and none_ok:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{name} must be positive{' or None' if none_ok else ''}, got {value!r}")
  return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineJob:
  """Everything one online experiment needs, validated."""

  base: OfflineJob
  """The sections shared with the offline job (model, runtimes per mode, cost model, store,
  workload, warm-up), validated by it."""
  config_dict: dict
  """The config as given (written to config.json)."""
  aps_list: tuple[float, ...]
  """Agent arrival rates (agents/s), ascending."""
  arrivals: str
  """'poisson' or 'trace' (the trajectories' arrival_s, stretched to each point's APS)."""
  seed: int
  """Seed of the Poisson arrival times (the same at every point and mode)."""
  slo: Slo
  """The SLO, already scaled."""
  steady_window_s: float
  """The stopping rule's TTFT window (the paper: 150 s)."""
  steady_lag_s: float
  """How far back the steady-state rule's earlier window lies (the paper: 30 minutes)."""
  steady_tolerance: float
  """Relative TTFT change below which the run is steady (the paper: 5%)."""
  max_point_duration_s: float | None
  """Longest a point takes arrivals (None: no limit)."""
  drain_timeout_s: float
  """Longest the turns in flight at a point's stop may take to finish."""
  @property
  def workdir(self) -> str:
    return self.base.workdir

  @classmethod
  def from_config(cls, config, workdir: str) -> OnlineJob:
    full = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    c = dict(full)
    online = {key: c.pop(key) for key in ONLINE_KEYS if key in c}
    missing = sorted(set(ONLINE_KEYS) - set(online) - {"steady_lag_s", "drain_timeout_s",
                                                        "max_point_duration_s"})
    if missing:
      raise ValueError(f"config: missing online key(s) {missing}")
    aps_list = online["aps_list"]
    if isinstance(aps_list, (int, float)) or not aps_list:
      raise ValueError(f"aps_list: expected a non-empty sequence of positive rates, got "
                       f"{aps_list!r}")
    for aps in aps_list:
      if isinstance(aps, bool) or not isinstance(aps, (int, float)) or not aps > 0:
        raise ValueError(f"aps_list: every arrival rate must be positive (agents/s), got {aps!r}")
    if online["arrivals"] not in ARRIVALS:
      raise ValueError(f"arrivals: unknown arrival process {online['arrivals']!r}; choose one "
                       f"of {ARRIVALS}")
    seed = online["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise ValueError(f"seed must be an int, got {seed!r}")
    slo = dict(online["slo"])
    unknown = sorted(set(slo) - set(SLO_KEYS))
    if unknown:
      raise ValueError(f"slo: unknown key(s) {unknown}; expected some of {list(SLO_KEYS)}")
    slo = Slo.scaled(**slo)
    window = _positive("steady_window_s", online["steady_window_s"])
    lag = _positive("steady_lag_s", online.get("steady_lag_s") or window)
    if lag < window:
      raise ValueError(f"steady_lag_s must be at least steady_window_s ({window}), got {lag}")
    tolerance = _positive("steady_tolerance", online["steady_tolerance"])
    max_duration = _positive("max_point_duration_s", online.get("max_point_duration_s"),
                             none_ok=True)
    drain = _positive("drain_timeout_s", online.get("drain_timeout_s", 120.0))
    c["check_reference"] = False  # online runs are timed, not compared token by token
    base = OfflineJob.from_config(c, workdir)
    if base.primed_turns:
      raise ValueError(f"primed_turns: {base.primed_turns} is for offline jobs; online arrivals "
                       f"start every agent at its first turn (use 0)")
    if online["arrivals"] == "trace":
      missing = [t.agent_id for t in base.trajectories if t.arrival_s is None]
      if missing:
        raise ValueError(f"arrivals: 'trace' needs every trajectory's arrival_s; the "
                         f"{base.workload_report.kind} workload leaves {len(missing)} without "
                         f"(e.g. {missing[0]}); use 'poisson'")
    return cls(base=base, config_dict=full, aps_list=tuple(sorted(set(map(float, aps_list)))),
               arrivals=online["arrivals"], seed=seed, slo=slo, steady_window_s=window,
               steady_lag_s=lag, steady_tolerance=tolerance, max_point_duration_s=max_duration,
               drain_timeout_s=drain)

  def run(self, progress: Callable[[str], None] | None = None) -> dict:
    base = self.base
    model, layout, cost_model = base.start(self.workdir, self.config_dict, progress)
    trajectories = list(base.trajectories)
    own_rate = trace_rate(trajectories) if self.arrivals == "trace" else None
    runs, turn_lines = [], []
    # Fresh namespaces per invocation and point: every point starts with a cold store.
    run_id = uuid.uuid4().hex[:8]
    with KVBlockStore.open(base.store_spec, layout) as store:
      for name, runtime in zip(base.run_names, base.runtimes):
        if base.warmup:
          self._warm_up(name, runtime, model, store, layout, cost_model, run_id, progress)
        points, describe = [], ""
        for i, aps in enumerate(self.aps_list):
          if progress:
            progress(f"[{name}] point {i + 1}/{len(self.aps_list)}: {aps:g} agents/s")
          scale = own_rate / aps if own_rate else 1.0
          run = run_online(
              runtime, model, store, layout, trajectories, cost_model=cost_model, aps=aps,
              seed=self.seed, namespace_prefix=f"{run_id}-{name}-aps{i}-", progress=progress,
              max_duration_s=self.max_point_duration_s, slo=self.slo,
              steady_window_s=self.steady_window_s, steady_tolerance=self.steady_tolerance,
              steady_lag_s=self.steady_lag_s, arrivals=self.arrivals, trace_time_scale=scale,
              drain_timeout_s=self.drain_timeout_s, label=name)
          describe = run.describe
          point = summarize_point(run, self.slo, agents=len(trajectories))
          if self.arrivals == "trace":
            point["trace_time_scale"] = scale
          points.append(point)
          turn_lines += [json.dumps(dict(mode=name, aps=aps, **t)) for t in run.turns]
          if not point["slo_ok"]:
            if progress and i + 1 < len(self.aps_list):
              progress(f"[{name}] {aps:g} agents/s breaks the SLO ("
                       f"{'; '.join(point['slo_breaks'])}); the sweep stops here")
            break
        compliant = [p["aps"] for p in points if p["slo_ok"]]
        runs.append(dict(mode=name, base_mode=runtime.mode, switches=runtime.switches(),
                         max_aps_slo=max(compliant) if compliant else None, points=points,
                         cluster=describe))
    runtime = base.runtimes[0]
    summary = dict(
        runs=runs, run_id=run_id, model=base.model_config.name, topology=runtime.topology.name,
        slo=dict(self.slo.to_dict(), scaled=(
            f"TTFT {self.slo.ttft_s / self.slo.scale:g} s and TPOT "
            f"{self.slo.tpot_s / self.slo.scale:g} s (the paper's: {PAPER_TTFT_S:g} s, "
            f"{PAPER_TPOT_S:g} s) times scale {self.slo.scale:g}, for small models on CPU")),
        compliance=COMPLIANCE,
        stopping_rule=dict(steady_window_s=self.steady_window_s, steady_lag_s=self.steady_lag_s,
                           steady_tolerance=self.steady_tolerance,
                           max_point_duration_s=self.max_point_duration_s,
                           drain_timeout_s=self.drain_timeout_s,
                           paper=dict(steady_window_s=150.0, steady_lag_s=1800.0,
                                      steady_tolerance=0.05)),
        arrivals=self.arrivals, arrival_seed=self.seed, aps_list=list(self.aps_list),
        trace_rate_aps=own_rate,
        tpot_source=("last generated token where the runtime stamps it (times.last_token; with "
                     "gen_tokens == 2 the second token), else the turn's end (times.done, which "
                     "includes persisting its blocks: an over-estimate)"),
        link_bytes_per_s=runtime.link_bytes_per_s,
        link_emulation=link_emulation(runtime.link_bytes_per_s),
        warmup_excluded=base.warmup, workload=dataclasses.asdict(base.workload_report),
        cost_model=cost_model.to_dict(),
        cost_model_path=base.cost_model_path or os.path.join(self.workdir, "cost_model.json"))
    with open(os.path.join(self.workdir, "turns.jsonl"), "w") as f:
      f.write("\n".join(turn_lines) + "\n")
    from dualpath_jax.analysis import online_plots
    summary["plots"] = online_plots.write_plots(summary, self.workdir)
    with open(os.path.join(self.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    return summary

  def _warm_up(self, name, runtime, model, store, layout, cost_model, run_id, progress) -> None:
    """Untimed passes that compile what the points will run (own namespaces, nothing recorded).

    Prefill programs are compiled per batch shape (rows, prefix and new tokens, bucketed), and
    online batches are smaller than offline ones: an offline pass (every agent at once, uncapped
    links: the largest batches) and online passes at the lowest and highest APS (the batches of
    light and heavy load) leave few shapes to compile inside a timed point.
    """
    trajectories = self.base.warmup_trajectories()
    if progress:
      progress(f"[{name}] warm-up: an offline pass and online passes at {self.aps_list[0]:g} and "
               f"{self.aps_list[-1]:g} agents/s (untimed, {len(trajectories)} agents)")
    run_offline(dataclasses.replace(runtime, link_bytes_per_s=None), model, store, layout,
                trajectories, cost_model=cost_model, namespace_prefix=f"{run_id}-warmup-{name}-")
    never = Slo(ttft_s=float("inf"), tpot_s=float("inf"), stat=self.slo.stat)
    rate = trace_rate(trajectories) if self.arrivals == "trace" else None
    for i, aps in enumerate(sorted({self.aps_list[0], self.aps_list[-1]})):
      run_online(runtime, model, store, layout, trajectories, cost_model=cost_model, aps=aps,
                 seed=self.seed, namespace_prefix=f"{run_id}-warmup{i}-{name}-",
                 max_duration_s=self.max_point_duration_s, slo=never,
                 steady_window_s=self.steady_window_s, steady_tolerance=1e-12,
                 steady_lag_s=self.steady_lag_s, arrivals=self.arrivals,
                 trace_time_scale=rate / aps if rate else 1.0,
                 drain_timeout_s=self.drain_timeout_s, label=f"{name} warm-up")


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def summarize_point(run: OnlineRun, slo: Slo, *, agents: int) -> dict:
  """One sweep point: latency percentiles, TTFT breakdown means, JCT, SLO verdict."""
  turns = run.turns
  ttft = [t["ttft_s"] for t in turns]
  ttst = [t["ttst_s"] for t in turns if t["ttst_s"] is not None]
  tpot = [t["tpot_s"] for t in turns if t["tpot_s"] is not None]
  ttft_stat, tpot_stat = slo.of(ttft), slo.of(tpot)
  breaks = []
  if not turns:
    breaks.append("no turn completed")
  if run.stop_reason == "slo_violated":
    breaks.append(f"stopped: {slo.stat} TTFT over the last window above {slo.ttft_s:g} s")
  if run.unfinished_turns:
    breaks.append(f"{run.unfinished_turns} turns still in flight after the drain")
  if ttft_stat is not None and ttft_stat > slo.ttft_s:
    breaks.append(f"{slo.stat} TTFT {ttft_stat:.3g} s > {slo.ttft_s:g} s")
  if tpot_stat is not None and tpot_stat > slo.tpot_s:
    breaks.append(f"{slo.stat} TPOT {tpot_stat:.3g} s > {slo.tpot_s:g} s")
  point = dict(aps=run.aps)
  for metric, values in (("ttft", ttft), ("tpot", tpot), ("ttst", ttst)):
    for stat in ("p50", "p99", "p90", "mean"):
      point[f"{metric}_{stat}_s"] = stat_of(values, stat)
  return dict(
      point, ttft_slo_stat_s=ttft_stat, tpot_slo_stat_s=tpot_stat,
      jct_mean_s=_mean(run.jct_s.values()),
      ttft_breakdown_s={k: _mean(t["ttft_breakdown_s"][k] for t in turns) for k in TTFT_SEGMENTS},
      slo_ok=not breaks, slo_breaks=breaks, stop_reason=run.stop_reason, turns=len(turns),
      turns_after_stop=sum(t["after_stop"] for t in turns), unfinished_turns=run.unfinished_turns,
      duration_s=run.duration_s, drain_s=run.drain_s, agents=agents,
      agents_arrived=run.agents_arrived, agents_finished=run.agents_finished,
      tokens_prefilled=sum(t["new_tokens"] for t in turns),
      tokens_hit=sum(t["hit_tokens"] for t in turns),
      submit_lag_max_s=max((t["submit_lag_s"] for t in turns), default=None),
      tpot_from_done=sum(t["tpot_source"] == "done" for t in turns),
      read_side_counts={side: sum(t["read_side"] == side for t in turns)
                        for side in ("pe", "de", "split", "none")},
      bytes={k: int(run.bytes.get(k, 0)) for k in BYTE_KEYS})
