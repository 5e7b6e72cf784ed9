# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore a DualPath run
#
# Reads one workdir of `experiments/offline.py`, `experiments/ablation.py` or
# `experiments/online.py` and shows: the summary per mode, JCT and the TTFT breakdown, the
# storage links over time, the per-turn timeline, and, when present, the online sweep and the
# ablation's rows.
#
#     DUALPATH_WORKDIR=/tmp/smoke python experiments/notebooks/explore_run.py   # as a script
#     jupytext --to ipynb experiments/notebooks/explore_run.py                  # as a notebook
#
# `DUALPATH_WORKDIR` names the workdir (default /tmp/dualpath); every figure is also written to
# `DUALPATH_NOTEBOOK_OUT` (default WORKDIR/notebook). Tables are plain text (no pandas).

# %%
import os

from dualpath_jax.analysis import offline_plots as op

WORKDIR = os.environ.get("DUALPATH_WORKDIR", "/tmp/dualpath")
OUT = os.environ.get("DUALPATH_NOTEBOOK_OUT", os.path.join(WORKDIR, "notebook"))
MAX_TURN_ROWS = 24  # per mode in the turn table
os.makedirs(OUT, exist_ok=True)
FIGURES = []  # paths of the figures written, in order

run = op.load_run(WORKDIR)
summary = run["summary"]
offline = op.offline_runs(summary)
turns = op.offline_turns(run)  # the offline runs' turns
online = [r for r in summary.get("runs", []) if r.get("points")]


def display_png(path):
  """Shows a PNG inline under IPython, else prints its path."""
  try:
    from IPython import get_ipython
    from IPython.display import Image, display
  except ImportError:
    get_ipython = None
  if get_ipython is not None and get_ipython() is not None:
    display(Image(filename=path))
  else:
    print(f"figure: {path}")


def show(fig, name):
  """Writes the figure to OUT/name and shows it."""
  path = os.path.join(OUT, name)
  fig.savefig(path, dpi=op.DPI)
  FIGURES.append(path)
  display_png(path)


config = run["config"] or {}
workload = config.get("workload") or {}
print(f"workdir   {run['workdir']}")
print(f"model     {summary.get('model')}  topology {summary.get('topology')}  "
      f"links {summary.get('link_emulation', summary.get('link_bytes_per_s'))}")
if workload:
  print(f"workload  {workload.get('kind')}: {workload.get('agents')} agents x "
        f"{workload.get('turns')} turns, first append {workload.get('first_append_tokens')}, "
        f"append {workload.get('append_tokens')}, gen {workload.get('gen_tokens')} tokens")
print(f"runs      {[r.get('mode') for r in summary.get('runs', [])]}; "
      f"{len(run['turns'])} turn records")

# %% [markdown]
# ## Summary per mode
# JCT, speedup over `basic`, TTFT, decode step, tokens hit and prefilled, which side read each
# turn's KV, storage-link balance (max/avg, 1.0 = even) and predicted attention balance.

# %%
if offline:
  print(op.summary_table(summary))
else:
  print("no offline runs (with a JCT) in this workdir")

# %% [markdown]
# ## JCT per mode

# %%
if offline:
  show(op.jct_figure(run), "jct.png")

# %% [markdown]
# ## TTFT breakdown
# Mean per turn: queueing (ready -> read start, or -> prefill start without a read), KV read,
# waiting for a PE batch after the read, prefill, handoff to the DE and first token.

# %%
if turns:
  breakdown = op.ttft_breakdown(turns)
  print(op.format_table(
      ("mode", "turns") + tuple(op.SEGMENT_LABELS[s] for s in op.TTFT_SEGMENTS) + ("TTFT",),
      [(mode, b["turns"]) + tuple(round(b[s], 4) for s in op.TTFT_SEGMENTS)
       + (round(b["ttft"], 4),) for mode, b in breakdown.items()]))
  show(op.ttft_breakdown_figure(run), "ttft_breakdown.png")

# %% [markdown]
# ## Storage links over time
# Bytes/s per node (reads and writes), the emulated link cap dashed.

# %%
for link_run in (run["links"] or {}).get("runs", []):
  if link_run["mode"] not in {r["mode"] for r in offline}:
    continue
  read = {node: sum(r[2] for r in n["reads"]) for node, n in link_run["nodes"].items()}
  print(f"{link_run['mode']}: bytes read per node {read}")
  show(op.links_figure(run, link_run["mode"]), f"links_{op.file_part(link_run['mode'])}.png")

# %% [markdown]
# ## Per-turn timeline
# One row per agent: each turn's queueing, read, prefill, handoff and decode on the run's clock.

# %%
if turns:
  show(op.timeline_figure(run), "timeline.png")
  by_mode = {}
  for t in turns:
    by_mode.setdefault(t["mode"], []).append(t)
  for mode, turns in by_mode.items():
    turns = sorted(turns, key=lambda t: t["times_s"]["ready"])
    rows = []
    for t in turns[:MAX_TURN_ROWS]:
      times = t["times_s"]
      ttft = (times["first_token"] - times["ready"] if times.get("first_token") is not None
              else None)
      rows.append((t["agent"], t["turn"], t["prefill_engine"], t["decode_engine"],
                   t["read_side"], t["hit_tokens"], t["new_tokens"], t["prefill_chunks"],
                   round(times["ready"], 3), round(times["done"], 3) if "done" in times else None,
                   round(ttft, 4) if ttft is not None else None))
    print(f"\n{mode}: {len(turns)} turns" + (f" (first {MAX_TURN_ROWS})"
                                            if len(turns) > MAX_TURN_ROWS else ""))
    print(op.format_table(("agent", "turn", "PE", "DE", "read", "hit", "new", "chunks",
                           "ready s", "done s", "TTFT s"), rows))

# %% [markdown]
# ## Online run
# Shown when the summary's runs carry `points` (one per arrival rate, experiments/online.py):
# the sweep table, latency against APS and the TTFT breakdown per point
# (dualpath_jax/analysis/online_plots.py).

# %%
if online:
  from dualpath_jax.analysis import online_plots

  online_summary = dict(summary, runs=online)
  print(online_plots.sweep_table(online_summary))
  show(online_plots.latency_figure(online_summary), "online_latency.png")
  show(online_plots.breakdown_figure(online_summary), "online_ttft_breakdown.png")
else:
  print("no online run in this workdir")

# %% [markdown]
# ## Ablation
# Shown when the workdir holds `ablation.json` (experiments/ablation.py): JCT change vs `basic`
# per run next to the paper's (PAPER.md 6.9).

# %%
if run["ablation"]:
  print(op.ablation_table(run["ablation"]["rows"]))
  show(op.ablation_figure(run["ablation"]["rows"]), "ablation.png")
else:
  print("no ablation.json in this workdir")

# %%
print(f"{len(FIGURES)} figures in {OUT}")
