"""Figures and a table of an online job's summary.json (experiments/online.py, PAPER.md 6.8).

  summary = json.load(open(os.path.join(workdir, "summary.json")))
  print(sweep_table(summary))           # one row per mode and APS point, plain text
  fig = latency_figure(summary)         # TTFT, TTST, TPOT (p50 and p99) and mean JCT against APS
  fig = breakdown_figure(summary)       # per mode, the mean TTFT breakdown per APS, stacked
  paths = write_plots(summary, workdir) # online_latency.png, online_ttft_breakdown.png

Points that break the SLO are drawn with hollow markers (the paper omits them from its TPOT and
TTST plots); the SLO bounds are dashed lines. The TTFT breakdown segments are runtime/online.py's:
queueing, read, read_to_prefill, prefill, handoff; they add up to the mean TTFT.

Figures are matplotlib Figures on the Agg canvas, built without pyplot (like offline_plots.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dualpath_jax.analysis.offline_plots import SEGMENT_COLORS, SEGMENT_LABELS
from dualpath_jax.runtime.metrics import TTFT_SEGMENTS

DPI = 100


def _figure(width: float, height: float, **subplots) -> tuple[Figure, object]:
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(**subplots)


def _title(summary: Mapping, what: str) -> str:
  parts = [summary.get("model"), summary.get("topology"), f"{summary.get('arrivals')} arrivals"]
  slo = summary.get("slo") or {}
  if slo:
    parts.append(f"SLO {slo.get('stat')} TTFT <= {slo['ttft_s']:g} s, TPOT <= "
                 f"{slo['tpot_s'] * 1e3:g} ms (scale {slo.get('scale', 1):g})")
  return f"{what}: " + ", ".join(str(p) for p in parts if p)


def latency_figure(summary: Mapping) -> Figure:
  """TTFT, TTST, TPOT (p50 solid, p99 dotted) and mean trajectory JCT against APS, per mode."""
  fig, axes = _figure(12.0, 7.5, nrows=2, ncols=2)
  panels = (("ttft", "TTFT (s)", "ttft_s"), ("ttst", "TTST (s)", None),
            ("tpot", "TPOT (s)", "tpot_s"), ("jct", "mean trajectory JCT (s)", None))
  slo = summary.get("slo") or {}
  for ax, (metric, label, bound) in zip(axes.flat, panels):
    for i, run in enumerate(summary["runs"]):
      color = f"C{i}"
      points = run["points"]
      aps = [p["aps"] for p in points]
      stats = (("jct_mean_s", "-", "mean"),) if metric == "jct" else (
          (f"{metric}_p50_s", "-", "p50"), (f"{metric}_p99_s", ":", "p99"))
      for key, style, stat in stats:
        values = [np.nan if p.get(key) is None else p[key] for p in points]
        ax.plot(aps, values, style, color=color, label=f"{run['mode']} {stat}")
        for a, v, p in zip(aps, values, points):
          ax.plot([a], [v], "o", color=color, markerfacecolor=color if p["slo_ok"] else "none")
    if bound and slo.get(bound):
      ax.axhline(slo[bound], color="red", linestyle="--", linewidth=1,
                 label=f"SLO (on the {slo.get('stat', 'p90')})")
    rates = [p["aps"] for run in summary["runs"] for p in run["points"]]
    if rates and max(rates) >= 4 * min(rates):  # geometric sweeps
      ax.set_xscale("log")
    ax.set_xlabel("APS (agents/s)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(_title(summary, "latency vs arrival rate (hollow: SLO broken)"), fontsize=9)
  return fig


def breakdown_figure(summary: Mapping) -> Figure:
  """Per mode, the mean TTFT per APS point as stacked segments (module docstring)."""
  runs = summary["runs"]
  fig, axes = _figure(max(6.0, 4.5 * len(runs)), 4.5, ncols=max(1, len(runs)), squeeze=False)
  for ax, run in zip(axes[0], runs):
    points = run["points"]
    labels = [f"{p['aps']:g}" + ("" if p["slo_ok"] else "\n(SLO broken)") for p in points]
    x = np.arange(len(points))
    bottom = np.zeros(len(points))
    for segment in TTFT_SEGMENTS:
      values = np.array([p["ttft_breakdown_s"].get(segment) or 0.0 for p in points])
      ax.bar(x, values, bottom=bottom, color=SEGMENT_COLORS[segment],
             label=SEGMENT_LABELS[segment])
      bottom += values
    ax.plot(x, [np.nan if p["ttft_mean_s"] is None else p["ttft_mean_s"] for p in points], "k_",
            markersize=24, mew=2, label="mean TTFT")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("APS (agents/s)")
    ax.set_ylabel("mean time per turn (s)")
    ax.set_title(f"{run['mode']} (max APS within SLO: {run['max_aps_slo']})", fontsize=9)
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.suptitle(_title(summary, "TTFT breakdown"), fontsize=9)
  return fig


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def sweep_table(summary: Mapping) -> str:
  """One line per mode and APS point: TTFT/TPOT p50 and p99, SLO verdict, stop reason."""
  header = (f"{'mode':10s} {'APS':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s} "
            f"{'TPOT p99':>9s} {'TTST p50':>9s} {'JCT mean':>9s} {'turns':>6s} {'agents':>7s}  "
            f"{'SLO':4s} stop")
  lines = [header]
  for run in summary["runs"]:
    for p in run["points"]:
      lines.append(
          f"{run['mode']:10s} {p['aps']:7.3g} {_cell(p['ttft_p50_s'], '9.3f')} "
          f"{_cell(p['ttft_p99_s'], '9.3f')} {_cell(p['tpot_p50_s'], '9.4f')} "
          f"{_cell(p['tpot_p99_s'], '9.4f')} {_cell(p['ttst_p50_s'], '9.4f')} "
          f"{_cell(p['jct_mean_s'], '9.2f')} {p['turns']:6d} "
          f"{p['agents_finished']:3d}/{p['agents']:<3d}  {'ok' if p['slo_ok'] else 'no':4s} "
          f"{p['stop_reason']}")
    lines.append(f"{run['mode']:10s} max APS within SLO: {run['max_aps_slo']}")
  return "\n".join(lines)


def write_plots(summary: Mapping, workdir: str) -> list[str]:
  """Writes online_latency.png and online_ttft_breakdown.png into workdir; returns their names."""
  names = []
  for name, figure in (("online_latency.png", latency_figure),
                       ("online_ttft_breakdown.png", breakdown_figure)):
    figure(summary).savefig(os.path.join(workdir, name))
    names.append(name)
  return names
