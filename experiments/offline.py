r"""Offline agentic job on the disaggregated runtime: basic, dualpath and oracle, JCT each.

  python experiments/offline.py --workdir=/tmp/dualpath
  python experiments/offline.py --config=configs/offline.py:smoke --workdir=/tmp/smoke

Writes WORKDIR/config.json, WORKDIR/summary.json (one entry of `runs` per mode),
WORKDIR/turns.jsonl (one record per turn and mode), WORKDIR/links.json (every storage-link
transfer) and their figures (dualpath_jax/analysis/offline_plots.py): jct.png,
ttft_breakdown.png, timeline.png, links_<mode>.png. The store lives in WORKDIR/store unless the
config names another.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dualpath_jax.platform import parse_flags, progress_to_stderr, start_job

_CONFIG = config_flags.DEFINE_config_file("config", "configs/offline.py",
                                          "Experiment config (a Python file with get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def main(argv):
  del argv
  job = start_job(_CONFIG.value, _WORKDIR.value, "offline")
  workdir = job.workdir
  job.run(progress=progress_to_stderr)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  for run in summary["runs"]:
    print(f"{run['mode']:9s} JCT {run['jct_s']:8.2f} s  turns {run['turns']}  hit "
          f"{run['tokens_hit']}  prefilled {run['tokens_prefilled']}  outputs match reference: "
          f"{run['outputs_match_reference']}")
  from dualpath_jax.analysis import offline_plots  # noqa: E402
  try:
    paths = offline_plots.write_offline_plots(workdir)
  except ImportError as e:  # e.g. a GPU image without matplotlib: the JSON outputs stand
    print(f"figures skipped: {e}", file=sys.stderr)
    paths = []
  for path in paths:
    print(f"figure: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
