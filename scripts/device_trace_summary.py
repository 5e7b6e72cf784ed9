"""Summarizes a jax.profiler trace (perfetto_trace.json.gz): busy time per device stream and host
thread, device work by kind (analysis/device_trace.py).

  python scripts/device_trace_summary.py WORKDIR/device_trace/dualpath/plugins/profile/*/perfetto_trace.json.gz
  python scripts/device_trace_summary.py --json=summary.json TRACE
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualpath_jax.analysis import device_trace  # noqa: E402

_JSON = flags.DEFINE_string("json", "", "also write the summary as JSON here")
_TOP = flags.DEFINE_integer("top", 8, "events per thread, by total time")
_THREADS = flags.DEFINE_integer("threads", 12, "threads per process shown (busiest first)")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give one or more trace files (perfetto_trace.json.gz)")
  summaries = []
  for path in argv[1:]:
    if not os.path.exists(path):
      raise app.UsageError(f"{path}: no such file")
    summary = device_trace.summarize(path, top=_TOP.value)
    summaries.append(summary)
    print(device_trace.format_summary(summary, max_threads=_THREADS.value))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(summaries if len(summaries) > 1 else summaries[0], f, indent=1)


if __name__ == "__main__":
  app.run(main)
