"""Tables and figures of an offline job's workdir (experiments/offline.py, experiments/ablation.py).

  run = load_run(workdir)                # config, summary, turns (a list), links, ablation
  print(summary_table(run["summary"]))   # one row per mode, plain text (no pandas)
  fig = jct_figure(run)                  # a matplotlib Figure; fig.savefig(path) writes it
  paths = write_offline_plots(workdir)   # jct.png, ttft_breakdown.png, timeline.png,
                                         # links_<mode>.png, each in the workdir

TTFT breakdown of one turn (turns.jsonl times, seconds from the run's start): runtime/metrics.py
TTFT_SEGMENTS from the turn's 'ready' stamp (queueing, read, read_to_prefill, prefill, handoff);
they add up to the TTFT, and the figure marks the mean TTFT as well.

Figures are matplotlib Figures on the Agg canvas, built without pyplot: no global state and
nothing to close, so scripts, tests and notebooks share them.
matplotlib is imported only by the figure functions: loading, rows and tables work without it
(e.g. on a GPU image that lacks it).
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from dualpath_jax.runtime.metrics import TTFT_SEGMENTS, ttft_segments

if TYPE_CHECKING:
  from matplotlib.figure import Figure

BASELINE = "basic"
# PAPER.md 6.9 (Fig. 12 right): JCT change vs Basic, techniques added cumulatively.
PAPER_ABLATION = {"basic": 0.0, "+layerwise": -0.1721, "+dual_path": -0.3819,
                  "+scheduling": -0.4562}
PAPER_ABLATION_SETTING = ("PAPER.md 6.9 (Fig. 12 right): offline, DS 660B, 64K MAL, 1024 and 2048 "
                          "agents, average JCT reduction vs Basic, techniques added cumulatively")
SEGMENT_LABELS = {"queueing": "queueing", "read": "KV read",
                  "read_to_prefill": "read -> prefill wait", "prefill": "prefill",
                  "handoff": "handoff / decode start", "decode": "decode"}
SEGMENT_COLORS = {"queueing": "#bdbdbd", "read": "#1f77b4", "read_to_prefill": "#aec7e8",
                  "prefill": "#2ca02c", "handoff": "#ff7f0e", "decode": "#d9d9d9"}
"""Labels and colours of TTFT_SEGMENTS (and the decode span), shared with online_plots.py."""
DPI = 100


# ---------------------------------------------------------------------------------------- loading


def load_run(workdir: str) -> dict:
  """A workdir's outputs: {workdir, config, summary, turns (list), links, ablation}.

  summary.json is required; the others are None (turns: []) where absent, e.g. in an online
  run's workdir.
  """
  workdir = os.path.abspath(workdir)

  def read_json(name: str, required: bool = False):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      if required:
        raise FileNotFoundError(f"{path}: not found; is {workdir} an experiment's workdir?")
      return None
    with open(path) as f:
      return json.load(f)

  turns = []
  turns_path = os.path.join(workdir, "turns.jsonl")
  if os.path.exists(turns_path):
    with open(turns_path) as f:
      turns = [json.loads(line) for line in f if line.strip()]
  return dict(workdir=workdir, config=read_json("config.json"),
              summary=read_json("summary.json", required=True), turns=turns,
              links=read_json("links.json"), ablation=read_json("ablation.json"))


def offline_runs(summary: Mapping) -> list[dict]:
  """The summary's runs that have a JCT (an offline job's), in order."""
  return [r for r in summary.get("runs", []) if r.get("jct_s") is not None]


def offline_turns(run: Mapping) -> list[dict]:
  """The turn records of the summary's offline runs (an online run's turns, per arrival rate,
  are left out)."""
  names = {r["mode"] for r in offline_runs(run["summary"])}
  return [t for t in run["turns"] if t.get("mode") in names and "aps" not in t]


def file_part(name: str) -> str:
  """A run name as part of a file name: '+layerwise' -> 'plus_layerwise'."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("+", "plus_")).strip("_") or "run"


# ------------------------------------------------------------------------------------ computations


def turn_segments(times: Mapping[str, float]) -> dict[str, float] | None:
  """One turn's TTFT segments from its 'ready' stamp (runtime/metrics.py ttft_segments), or None
  for a turn without a first token."""
  return ttft_segments(times, times.get("ready"))


def ttft_breakdown(turns: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """Per mode (in first-seen order): the mean of each TTFT segment, `ttft` and `turns`."""
  by_mode: dict[str, list[Mapping]] = {}
  for t in turns:
    by_mode.setdefault(t["mode"], []).append(t)
  out = {}
  for mode, rows in by_mode.items():
    segments = [(turn_segments(t["times_s"]), t["times_s"]) for t in rows]
    segments = [(s, times) for s, times in segments if s is not None]
    if not segments:
      continue
    out[mode] = {k: statistics.fmean(s[k] for s, _ in segments) for k in TTFT_SEGMENTS}
    out[mode]["ttft"] = statistics.fmean(times["first_token"] - times["ready"]
                                         for _, times in segments)
    out[mode]["turns"] = len(segments)
  return out


def _rates(records: Sequence[Sequence[float]], edges: np.ndarray, *,
           serial: bool) -> np.ndarray:
  """Bytes/s per bin: each transfer's bytes spread evenly over its [t0, t1]; with `serial`, over
  [max(t0, the previous transfer's t1), t1] (a capped link's wire, LinkPacer, carries one
  transfer's bytes after another's, so the span of a transfer that started while another was
  on the wire includes that wait)."""
  out = np.zeros(len(edges) - 1)
  width = np.diff(edges)
  previous_end = -np.inf
  for t0, t1, nbytes in sorted(records, key=lambda r: r[1]):
    if serial:
      t0, previous_end = max(t0, min(previous_end, t1)), t1
    if t1 <= t0:
      i = int(np.clip(np.searchsorted(edges, t0, side="right") - 1, 0, len(out) - 1))
      out[i] += nbytes / width[i]
      continue
    overlap = np.clip(np.minimum(edges[1:], t1) - np.maximum(edges[:-1], t0), 0.0, None)
    out += nbytes * overlap / (t1 - t0) / width
  return out


def _last_end(link_run: Mapping) -> float:
  return max((r[1] for n in link_run.get("nodes", {}).values() for key in ("reads", "writes")
              for r in n.get(key, [])), default=0.0)


def link_utilisation(link_run: Mapping, *, bins: int = 120, t_end: float | None = None) -> dict:
  """One run of links.json binned: {t (bin centres, s), bin_s, cap, nodes: {node: {role,
  reads, writes}}} with reads and writes in bytes/s per bin. Under a cap a direction's transfers
  are taken to deliver in turn (see _rates); uncapped ones overlap as recorded."""
  nodes = link_run.get("nodes", {})
  t_end = max(float(_last_end(link_run) if t_end is None else t_end), 1e-6)
  edges = np.linspace(0.0, t_end, bins + 1)
  cap = link_run.get("link_bytes_per_s")
  return dict(t=(edges[:-1] + edges[1:]) / 2, bin_s=t_end / bins, cap=cap,
              nodes={node: dict(role=n.get("role", "?"),
                                reads=_rates(n.get("reads", []), edges, serial=bool(cap)),
                                writes=_rates(n.get("writes", []), edges, serial=bool(cap)))
                     for node, n in sorted(nodes.items(), key=lambda kv: int(kv[0]))})


def ablation_rows(summary: Mapping, *, baseline: str = BASELINE,
                  paper: Mapping[str, float] = PAPER_ABLATION) -> list[dict]:
  """One row per run: JCT, its change vs the baseline run (a fraction, negative = faster, like
  the paper's -17.21%), speedup, balance metrics and the paper's reduction where it has one."""
  runs = offline_runs(summary)
  base = next((r["jct_s"] for r in runs if r["mode"] == baseline), None)
  rows = []
  for r in runs:
    jct = r["jct_s"]
    attn = r.get("attn_balance") or {}
    rows.append(dict(
        variant=r["mode"], base_mode=r.get("base_mode"), switches=r.get("switches"), jct_s=jct,
        reduction_vs_basic=jct / base - 1.0 if base else None,
        speedup_vs_basic=base / jct if base and jct > 0 else None,
        snic_balance_mean=(r.get("snic_balance") or {}).get("mean"),
        attn_balance_predicted_mean=attn.get("predicted_mean"),
        attn_balance_predicted_mean_all_forwards=(attn.get("all_forwards") or {}).get(
            "predicted_mean"),
        ttft_mean_s=r.get("ttft_mean_s"), read_side_counts=r.get("read_side_counts"),
        outputs_match_reference=r.get("outputs_match_reference"),
        paper_reduction_vs_basic=paper.get(r["mode"])))
  return rows


# ----------------------------------------------------------------------------------------- tables


def _cell(value, fmt: str = "") -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return format(value, fmt or ".4g")
  return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """Aligned plain-text table; None prints as '-', text left- and numbers right-aligned."""
  cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  numeric = [all(row[i] is None or isinstance(row[i], (int, float)) or
                 re.fullmatch(r"[+-]?[\d.]+%?", str(row[i])) for row in rows)
             for i in range(len(header))]

  def line(row):
    return "  ".join(c.rjust(w) if num else c.ljust(w)
                     for c, w, num in zip(row, widths, numeric)).rstrip()

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _speedups(runs: Sequence[Mapping], baseline: str = BASELINE) -> dict[str, float | None]:
  base = next((r["jct_s"] for r in runs if r["mode"] == baseline), None)
  return {r["mode"]: (base / r["jct_s"] if base and r["jct_s"] > 0 else None) for r in runs}


def summary_table(summary: Mapping) -> str:
  """One row per offline run of summary.json: JCT, speedup, TTFT, tokens, reads, balance."""
  runs = offline_runs(summary)
  speedup = _speedups(runs)
  header = ("mode", "JCT s", "x basic", "TTFT mean s", "TTFT p99 s", "decode step ms", "hit",
            "prefilled", "reads pe/de/split", "snic mean", "attn pred", "outputs ok")
  rows = []
  for r in runs:
    sides = r.get("read_side_counts") or {}
    step = r.get("decode_step_median_s")
    rows.append((r["mode"], round(r["jct_s"], 3), _round(speedup[r["mode"]], 2),
                 _round(r.get("ttft_mean_s"), 3), _round(r.get("ttft_p99_s"), 3),
                 _round(step * 1e3 if step is not None else None, 2), r.get("tokens_hit"),
                 r.get("tokens_prefilled"),
                 "/".join(str(sides.get(k, 0)) for k in ("pe", "de", "split")),
                 _round((r.get("snic_balance") or {}).get("mean"), 3),
                 _round((r.get("attn_balance") or {}).get("predicted_mean"), 3),
                 r.get("outputs_match_reference")))
  return format_table(header, rows)


def ablation_table(rows: Sequence[Mapping]) -> str:
  """ablation.json's rows: JCT, change vs basic next to the paper's, speedup, balance."""
  header = ("variant", "JCT s", "vs basic", "paper", "x basic", "snic mean", "attn pred",
            "switches")
  out = []
  for r in rows:
    sw = r.get("switches") or {}
    switches = " ".join(k for k in ("layerwise", "dual_path", "split_reads", "skips_kv_io")
                        if sw.get(k))
    switches = " ".join(filter(None, (switches, sw.get("scheduler"), sw.get("batching"))))
    out.append((r["variant"], round(r["jct_s"], 3), _pct(r.get("reduction_vs_basic")),
                _pct(r.get("paper_reduction_vs_basic")), _round(r.get("speedup_vs_basic"), 2),
                _round(r.get("snic_balance_mean"), 3),
                _round(r.get("attn_balance_predicted_mean"), 3), switches))
  return format_table(header, out)


def _round(value, digits: int):
  return None if value is None else round(float(value), digits)


def _pct(fraction) -> str | None:
  return None if fraction is None else f"{fraction * 100:+.2f}%"


# ---------------------------------------------------------------------------------------- figures


def _figure(width: float = 8.0, height: float = 4.5, **subplots) -> tuple[Figure, object]:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(**subplots)


def _title(run: Mapping, what: str) -> str:
  summary, config = run.get("summary") or {}, run.get("config") or {}
  workload = config.get("workload") or {}
  parts = [summary.get("model"), summary.get("topology")]
  if workload.get("agents"):
    parts.append(f"{workload['agents']} agents x {workload.get('turns')} turns")
  if summary.get("link_bytes_per_s"):
    parts.append(f"links {summary['link_bytes_per_s'] / 1e6:g} MB/s")
  return f"{what}: " + ", ".join(str(p) for p in parts if p)


def jct_figure(run: Mapping, *, baseline: str = BASELINE) -> Figure:
  """JCT per mode (bars), each annotated with seconds and its speedup over the baseline."""
  runs = offline_runs(run["summary"])
  speedup = _speedups(runs, baseline)
  fig, ax = _figure(max(5.0, 1.3 * len(runs) + 2))
  names = [r["mode"] for r in runs]
  jcts = [r["jct_s"] for r in runs]
  bars = ax.bar(names, jcts, color=["#7f7f7f" if n == baseline else "#1f77b4" for n in names])
  for bar, r in zip(bars, runs):
    if (r.get("switches") or {}).get("skips_kv_io"):
      bar.set_hatch("//")
      bar.set_facecolor("#c7c7c7")
    label = f"{r['jct_s']:.2f} s"
    if speedup[r["mode"]] is not None:
      label += f"\n{speedup[r['mode']]:.2f}x vs {baseline}"
    ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("JCT (s)")
  ax.set_ylim(0, max(jcts, default=1.0) * 1.25 or 1.0)
  ax.set_title(_title(run, "JCT per mode"), fontsize=10)
  if any((r.get("switches") or {}).get("skips_kv_io") for r in runs):
    ax.text(0.99, 0.98, "hatched: KV I/O skipped (a timing bound)", transform=ax.transAxes,
            ha="right", va="top", fontsize=7)
  ax.tick_params(axis="x", labelsize=8)
  return fig


def ttft_breakdown_figure(run: Mapping) -> Figure:
  """Mean TTFT per mode as stacked segments (module docstring), the mean TTFT as a marker."""
  breakdown = ttft_breakdown(offline_turns(run))
  order = [r["mode"] for r in offline_runs(run["summary"]) if r["mode"] in breakdown]
  order += [m for m in breakdown if m not in order]
  fig, ax = _figure(max(5.0, 1.3 * len(order) + 3))
  bottom = np.zeros(len(order))
  for segment in TTFT_SEGMENTS:
    values = np.array([breakdown[m][segment] for m in order])
    ax.bar(order, values, bottom=bottom, color=SEGMENT_COLORS[segment],
           label=SEGMENT_LABELS[segment])
    bottom += values
  ax.plot(order, [breakdown[m]["ttft"] for m in order], "k_", markersize=28, mew=2,
          label="mean TTFT")
  ax.set_ylabel("mean time per turn (s)")
  ax.set_title(_title(run, "TTFT breakdown"), fontsize=10)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=0.4)
  ax.tick_params(axis="x", labelsize=8)
  return fig


def timeline_figure(run: Mapping, modes: Sequence[str] | None = None) -> Figure:
  """Per mode, one row per agent: each turn's segments from ready to done on the run's clock."""
  by_mode: dict[str, list[Mapping]] = {}
  for t in offline_turns(run):
    by_mode.setdefault(t["mode"], []).append(t)
  modes = [m for m in (modes or by_mode) if m in by_mode]
  agents = sorted({t["agent"] for m in modes for t in by_mode[m]})
  row = {a: i for i, a in enumerate(agents)}
  height = max(2.5, min(14.0, 0.6 + len(modes) * (0.5 + 0.18 * len(agents))))
  fig, axes = _figure(10.0, height, nrows=max(1, len(modes)), sharex=True, squeeze=False)
  for ax, mode in zip(axes[:, 0], modes):
    spans: dict[str, list[tuple[int, float, float]]] = {}
    for t in by_mode[mode]:
      times, seg = t["times_s"], turn_segments(t["times_s"])
      if seg is None:
        continue
      start = times["ready"]
      for name in TTFT_SEGMENTS:
        spans.setdefault(name, []).append((row[t["agent"]], start, seg[name]))
        start += seg[name]
      if times.get("done") is not None:
        spans.setdefault("decode", []).append(
            (row[t["agent"]], times["first_token"], times["done"] - times["first_token"]))
    for name in TTFT_SEGMENTS + ("decode",):
      for r, start, width in spans.get(name, []):
        ax.broken_barh([(start, width)], (r - 0.4, 0.8), facecolors=SEGMENT_COLORS[name],
                       edgecolor="white", linewidth=0.3)
    ax.set_ylim(-0.6, len(agents) - 0.4)
    ax.invert_yaxis()
    step = max(1, len(agents) // 16)
    ax.set_yticks(range(0, len(agents), step))
    ax.set_yticklabels([agents[i] for i in range(0, len(agents), step)], fontsize=6)
    ax.set_title(mode, fontsize=9, loc="left")
  if modes:
    handles = [_patch(SEGMENT_COLORS[n], SEGMENT_LABELS[n]) for n in TTFT_SEGMENTS + ("decode",)]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xlabel("time since the run's start (s)")
  fig.suptitle(_title(run, "turn timeline"), fontsize=10)
  return fig


def _patch(color: str, label: str):
  from matplotlib.patches import Patch
  return Patch(facecolor=color, label=label)


def links_figure(run: Mapping, mode: str, *, bins: int = 120) -> Figure:
  """One run's storage links over time: reads (top) and writes (bottom) in MB/s, one line per
  node labelled with its role; the per-direction link cap dashed where set."""
  link_run = next((r for r in (run.get("links") or {}).get("runs", []) if r["mode"] == mode),
                  None)
  if link_run is None:
    raise ValueError(f"links.json has no run {mode!r}")
  jct = next((r["jct_s"] for r in offline_runs(run["summary"]) if r["mode"] == mode), None)
  u = link_utilisation(link_run, bins=bins, t_end=max(jct or 0.0, _last_end(link_run)))
  fig, (ax_r, ax_w) = _figure(9.0, 5.5, nrows=2, sharex=True)
  for ax, key in ((ax_r, "reads"), (ax_w, "writes")):
    for node, n in u["nodes"].items():
      ax.plot(u["t"], n[key] / 1e6, label=f"node {node} ({n['role']})", linewidth=1.2)
    if u["cap"]:
      ax.axhline(u["cap"] / 1e6, color="k", linestyle="--", linewidth=1,
                 label=f"link cap {u['cap'] / 1e6:g} MB/s")
    ax.set_ylabel(f"{key} (MB/s)")
    ax.set_ylim(bottom=0)
  if not any(n[k].any() for n in u["nodes"].values() for k in ("reads", "writes")):
    ax_r.text(0.5, 0.5, "no storage-link traffic in this run", transform=ax_r.transAxes,
              ha="center", va="center", fontsize=9)
  ax_r.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax_w.set_xlabel(f"time since the run's start (s); bins of {u['bin_s'] * 1e3:.3g} ms")
  fig.suptitle(_title(run, f"storage links, {mode}"), fontsize=10)
  return fig


def ablation_figure(rows: Sequence[Mapping], *,
                    paper: Mapping[str, float] = PAPER_ABLATION) -> Figure:
  """JCT change vs basic per variant (bars, %, the value inside each bar), the paper's values as
  red bars across the variant's bar where it has one."""
  fig, ax = _figure(max(5.0, 1.2 * len(rows) + 2))
  names = [r["variant"] for r in rows]
  values = [100 * (r.get("reduction_vs_basic") or 0.0) for r in rows]
  bars = ax.bar(names, values, width=0.6, label="measured (slower: grey)",
                color=["#7f7f7f" if v > 0 else "#1f77b4" for v in values])
  for bar, value in zip(bars, values):
    inside = abs(value) >= 8
    ax.annotate(f"{value:+.1f}%", (bar.get_x() + bar.get_width() / 2, value / 2 if inside
                                   else value), xytext=(0, 0 if inside else -3 if value < 0
                                                        else 3),
                textcoords="offset points", ha="center", fontsize=8,
                va="center" if inside else "top" if value < 0 else "bottom",
                color="white" if inside else "black", fontweight="bold" if inside else None)
  labelled = False
  for bar, name in zip(bars, names):
    if name not in paper or name == BASELINE:
      continue
    value = 100 * paper[name]
    ax.hlines(value, bar.get_x(), bar.get_x() + bar.get_width(), colors="red", linewidth=2.5,
              label=None if labelled else "paper (PAPER.md 6.9)")
    ax.annotate(f"{value:+.2f}%", (bar.get_x() + bar.get_width(), value), xytext=(2, 0),
                textcoords="offset points", va="center", ha="left", fontsize=7, color="red")
    labelled = True
  ax.axhline(0, color="k", linewidth=0.8)
  ax.set_ylabel("JCT change vs basic (%)")
  ax.set_title("Ablation: techniques added cumulatively (negative = faster)", fontsize=10)
  ax.legend(fontsize=8, loc="lower left")
  ax.tick_params(axis="x", labelsize=8)
  marks = [100 * paper[n] for n in names if n in paper]
  low, high = min(values + marks + [0.0]), max(values + marks + [0.0])
  pad = 0.12 * max(high - low, 10.0)
  ax.set_ylim(low - pad, high + pad)
  return fig


# ----------------------------------------------------------------------------------------- writers


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=DPI)
  return path


def write_offline_plots(workdir: str, run: Mapping | None = None) -> list[str]:
  """Writes jct.png, ttft_breakdown.png, timeline.png and links_<mode>.png (one per offline run
  of links.json) into the workdir; returns their paths. Missing inputs skip their figures."""
  run = run or load_run(workdir)
  out = run["workdir"]
  jobs: list[tuple[str, Callable[[], Figure]]] = []
  if offline_runs(run["summary"]):
    jobs.append(("jct.png", lambda: jct_figure(run)))
  if offline_turns(run):
    jobs.append(("ttft_breakdown.png", lambda: ttft_breakdown_figure(run)))
    jobs.append(("timeline.png", lambda: timeline_figure(run)))
  names = {r["mode"] for r in offline_runs(run["summary"])}
  for link_run in (run.get("links") or {}).get("runs", []):
    if link_run.get("mode") not in names:
      continue
    jobs.append((f"links_{file_part(link_run['mode'])}.png",
                 lambda mode=link_run["mode"]: links_figure(run, mode)))
  return [_save(make(), os.path.join(out, name)) for name, make in jobs]
