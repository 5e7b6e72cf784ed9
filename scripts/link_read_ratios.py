"""How long each capped store read took against its wire time (bytes / the link's cap), per run.

A lone read on an emulated NIC should take about its wire time (ratio ~1); reads that share a link
queue (ratio > 1). Reads links.json (or links.json.gz) files that offline jobs write.

  python scripts/link_read_ratios.py docs/perf/raw/record7/*links.json.gz
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys


def ratios(path: str) -> list[tuple[str, int, float, float, float]]:
  """(mode, reads, min, median, max) of read duration / (bytes / cap), per capped run."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    doc = json.load(f)
  out = []
  for run in doc["runs"]:
    cap = run.get("link_bytes_per_s")
    r = [(t1 - t0) / (n / cap) for node in run["nodes"].values()
         for t0, t1, n in node["reads"] if n > 0] if cap else []
    if r:
      out.append((run["mode"], len(r), min(r), statistics.median(r), max(r)))
  return out


def main(paths: list[str]) -> None:
  if not paths:
    sys.exit("usage: python scripts/link_read_ratios.py LINKS.json[.gz] ...")
  for path in paths:
    for mode, n, low, mid, high in ratios(path):
      print(f"{path}  {mode:14s} reads {n:3d}  read time / wire time: min {low:.2f}  "
            f"median {mid:.2f}  max {high:.2f}")


if __name__ == "__main__":
  main(sys.argv[1:])
