r"""Ablation of the offline job (PAPER.md 6.9): Basic, then +layerwise, +dual_path, +scheduling.

  python experiments/ablation.py --config=configs/ablation.py:smoke --workdir=/tmp/ablation
  python experiments/ablation.py --config=configs/ablation.py:smoke,agents=2,turns=2 \
      --config.modes="('basic', '+layerwise', '+dual_path', '+scheduling')" --workdir=/tmp/abl

Runs configs/ablation.py's runs (named variants of the offline job, each a mode plus explicit
technique switches) through OfflineJob, one after another on one store, like
experiments/offline.py. Writes the job's outputs (config.json, summary.json, turns.jsonl,
links.json and their figures) and:
  ablation.json  {"rows": [{variant, switches, jct_s, reduction_vs_basic (a fraction, negative =
                 faster, like the paper's -17.21%), speedup_vs_basic, snic_balance_mean,
                 attn_balance_predicted_mean, ...}], "paper": {run: the paper's reduction},
                 "config": the config as run, ...}
  ablation.png   JCT change vs basic per run, the paper's values as markers where it has them
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dualpath_jax.platform import parse_flags, progress_to_stderr, start_job

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ablation.py:smoke",
                                          "Ablation config (a Python file with get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  job = start_job(config, _WORKDIR.value, "offline")
  from dualpath_jax.analysis import offline_plots  # noqa: E402
  workdir = job.workdir
  summary = job.run(progress=progress_to_stderr)
  baseline = offline_plots.BASELINE
  rows = offline_plots.ablation_rows(summary, baseline=baseline)
  if not any(r["variant"] == baseline for r in rows):
    print(f"warning: no {baseline!r} run in modes: no reductions vs basic", file=sys.stderr)
  doc = dict(rows=rows, paper=dict(offline_plots.PAPER_ABLATION), baseline=baseline,
             paper_setting=offline_plots.PAPER_ABLATION_SETTING,
             model=summary.get("model"), topology=summary.get("topology"),
             link_bytes_per_s=summary.get("link_bytes_per_s"), config=config.to_dict())
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(doc, f, indent=2)
  print(offline_plots.ablation_table(rows))
  print(f"written: {os.path.join(workdir, 'ablation.json')}")
  try:
    paths = [os.path.join(workdir, "ablation.png")]
    offline_plots.ablation_figure(rows).savefig(paths[0], dpi=offline_plots.DPI)
    paths += offline_plots.write_offline_plots(workdir)
  except ImportError as e:  # e.g. a GPU image without matplotlib: ablation.json stands
    print(f"figures skipped: {e}", file=sys.stderr)
    paths = []
  for path in paths:
    print(f"figure: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
