r"""Online serving on the disaggregated runtime (PAPER.md 6.8): an APS sweep per mode.

  python experiments/online.py --workdir=/tmp/online
  python experiments/online.py --config=configs/online.py:smoke --workdir=/tmp/online_smoke

Writes WORKDIR/config.json, WORKDIR/summary.json (one entry of `runs` per mode, each with its
`points` and `max_aps_slo`), WORKDIR/turns.jsonl (one record per turn, mode and APS) and the plots
online_latency.png and online_ttft_breakdown.png. The store lives in WORKDIR/store unless the
config names another. Prints one table per mode at the end.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from dualpath_jax.platform import parse_flags, progress_to_stderr, start_job

_CONFIG = config_flags.DEFINE_config_file("config", "configs/online.py",
                                          "Experiment config (a Python file with get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def main(argv):
  del argv
  job = start_job(_CONFIG.value, _WORKDIR.value, "online")
  from dualpath_jax.analysis import online_plots
  workdir = job.workdir
  job.run(progress=progress_to_stderr)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  slo = summary["slo"]
  print(f"SLO: {slo['stat']} TTFT <= {slo['ttft_s']:g} s and {slo['stat']} TPOT <= "
        f"{slo['tpot_s']:g} s ({slo['scaled']})")
  for run in summary["runs"]:
    print()
    print(online_plots.sweep_table(dict(summary, runs=[run])))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
