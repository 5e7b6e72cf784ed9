"""Where a profiled window's time went, per device stream and host thread (jax.profiler traces).

A run with `device_trace` set (configs/offline.py) records a window of its timed part with
jax.profiler (runtime/offline.py) into a Chrome-trace JSON (perfetto_trace.json.gz). This module
reads it back: for every process (a host, or a GPU under CUPTI) and thread (a host thread, or a
device stream) the seconds it was busy (the union of its events, so that nested events count
once), its events by total time, and for device streams the busy seconds per kind of work
(memcpy host-to-device, device-to-host, device-to-device, kernels). Gaps in a stream are where it
waited: for a PE's compute stream under layerwise prefill, waits for its loads or for the host.
`breakdown_by_span` splits the device work by labelled host spans instead and classes kernels by
what they compute (attention, matmuls, scatters, other): the GPU bench's decode profile
(bench/decode_profile.py) labels one span per measured decode configuration.

  python scripts/device_trace_summary.py WORKDIR/device_trace/dualpath/...perfetto_trace.json.gz
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from collections.abc import Iterable

KINDS = (
    ("memcpy_h2d", ("h2d", "htod", "hosttodevice")),
    ("memcpy_d2h", ("d2h", "dtoh", "devicetohost")),
    ("memcpy_d2d", ("d2d", "dtod", "p2p", "ptop", "peer", "devicetodevice")),
)
"""Copies by direction, from the words in their names (CUPTI's 'MemcpyH2D', 'Memcpy HtoD',
'MemcpyP2P', ...; spaces and case ignored); an event without 'memcpy' or 'memset' in its name is
a 'kernel'."""


def load_events(path: str) -> tuple[list[dict], dict[int, str], dict[tuple[int, int], str]]:
  """The complete ('X') events of a Chrome-trace JSON (gzip or not), and the process and thread
  names its metadata gives."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  if not isinstance(events, list):
    raise ValueError(f"{path}: no traceEvents list")
  processes, threads, spans = {}, {}, []
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e.get("args", {}).get("name", str(e["pid"]))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", str(e.get("tid")))
    elif e.get("ph") == "X" and "dur" in e:
      spans.append(e)
  return spans, processes, threads


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
  """Seconds covered by (start_us, end_us) intervals, overlaps counted once."""
  total, end = 0.0, None
  for a, b in sorted(intervals):
    if end is None or a > end:
      total += b - a
      end = b
    elif b > end:
      total += b - end
      end = b
  return total / 1e6


def kind_of(name: str) -> str:
  word = re.sub(r"[^a-z0-9]", "", name.lower())
  if "memset" in word:
    return "memset"
  if "memcpy" not in word:
    return "kernel"
  for kind, words in KINDS:
    if any(w in word for w in words):
      return kind
  return "memcpy_other"


KERNEL_CLASSES = (
    ("attention", ("pagedattention",)),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "matmul")),
    ("scatter", ("scatter", "dynamicupdateslice")),
)
"""Kernels by what they compute, from the words in their names: the Pallas paged-attention
kernel (its pallas_call name), cuBLAS/cuBLASLt/CUTLASS and XLA's Triton GEMMs, scatters and
in-place updates; every other kernel (XLA's loop and reduction fusions: norms, RoPE, residuals,
the softmax merge) is 'other'. Copies and memsets keep their kind_of()."""


def kernel_class(name: str) -> str:
  """KERNEL_CLASSES' class of a device event, or kind_of()'s kind for copies and memsets."""
  kind = kind_of(name)
  if kind != "kernel":
    return kind
  word = re.sub(r"[^a-z0-9]", "", name.lower())
  for cls, words in KERNEL_CLASSES:
    if any(w in word for w in words):
      return cls
  return "other"


def breakdown_by_span(path: str, labels: Iterable[str], top: int = 12) -> dict:
  """Device work per labelled host span: for each label (the name of jax.profiler
  TraceAnnotation spans on a host thread, e.g. one per measured configuration, each ended only
  after its device work was waited for) the device events that start inside its spans (all
  devices, all streams): {label: {span_s, device_busy_s, by_class_s: {class: seconds},
  top: [[event name, seconds, count], ...]}}. by_class_s sums event durations (KERNEL_CLASSES);
  device_busy_s is their union, so span_s - device_busy_s is when no device was working."""
  spans, processes, _ = load_events(path)
  labels = list(labels)
  windows = {label: [(e["ts"], e["ts"] + e["dur"]) for e in spans
                     if e["name"] == label and not is_device(processes.get(e["pid"], ""))]
             for label in labels}
  missing = [label for label, w in windows.items() if not w]
  if missing:
    raise ValueError(f"{path}: no host span named {missing}")
  device_events = [e for e in spans if is_device(processes.get(e["pid"], ""))]
  out = {}
  for label, wins in windows.items():
    inside = [e for e in device_events if any(a <= e["ts"] < b for a, b in wins)]
    seconds, counts, classes = collections.Counter(), collections.Counter(), collections.Counter()
    for e in inside:
      seconds[e["name"]] += e["dur"] / 1e6
      counts[e["name"]] += 1
      classes[kernel_class(e["name"])] += e["dur"] / 1e6
    out[label] = dict(
        span_s=union_seconds(wins),
        device_busy_s=union_seconds((e["ts"], e["ts"] + e["dur"]) for e in inside),
        by_class_s=dict(sorted(classes.items())),
        top=[[name, s, counts[name]] for name, s in seconds.most_common(top)])
  return out


def is_device(process_name: str) -> bool:
  return "/device:" in process_name and "CPU" not in process_name.split("/device:")[-1]


def summarize(path: str, top: int = 8) -> dict:
  """{window_s, processes: [{name, device, threads: [{name, events, busy_s, busy_fraction,
  by_kind_s (devices), top: [[event name, seconds, count], ...]}]}]}, busiest threads first."""
  spans, processes, threads = load_events(path)
  if not spans:
    return dict(path=path, window_s=0.0, processes=[])
  t0 = min(e["ts"] for e in spans)
  t1 = max(e["ts"] + e["dur"] for e in spans)
  window_s = (t1 - t0) / 1e6
  by_thread = collections.defaultdict(list)
  for e in spans:
    by_thread[(e["pid"], e.get("tid"))].append(e)
  out = collections.defaultdict(list)
  for (pid, tid), events in by_thread.items():
    process = processes.get(pid, str(pid))
    device = is_device(process)
    seconds, counts = collections.Counter(), collections.Counter()
    for e in events:
      seconds[e["name"]] += e["dur"] / 1e6
      counts[e["name"]] += 1
    row = dict(name=threads.get((pid, tid), str(tid)), events=len(events),
               busy_s=union_seconds((e["ts"], e["ts"] + e["dur"]) for e in events),
               top=[[name, s, counts[name]] for name, s in seconds.most_common(top)])
    row["busy_fraction"] = row["busy_s"] / window_s if window_s else 0.0
    if device:
      kinds = collections.defaultdict(list)
      for e in events:
        kinds[kind_of(e["name"])].append((e["ts"], e["ts"] + e["dur"]))
      row["by_kind_s"] = {kind: union_seconds(iv) for kind, iv in sorted(kinds.items())}
    out[(pid, process, device)].append(row)
  result = []
  for (pid, process, device), rows in sorted(out.items(), key=lambda kv: (not kv[0][2], kv[0][1])):
    rows.sort(key=lambda r: -r["busy_s"])
    result.append(dict(name=process, device=device, threads=rows))
  return dict(path=path, window_s=window_s, processes=result)


def format_summary(summary: dict, max_threads: int = 12) -> str:
  """A plain-text table of summarize()'s result."""
  lines = [f"{summary['path']}: window {summary['window_s']:.3f} s"]
  for process in summary["processes"]:
    lines.append(f"{process['name']}{' (device)' if process['device'] else ''}")
    for row in process["threads"][:max_threads]:
      kinds = ("  " + ", ".join(f"{k} {s:.3f}" for k, s in row["by_kind_s"].items())
               if "by_kind_s" in row else "")
      lines.append(f"  {row['name'][:40]:40s} busy {row['busy_s']:.3f} s "
                   f"({100 * row['busy_fraction']:.0f}%), {row['events']} events{kinds}")
      for name, seconds, count in row["top"][:4]:
        lines.append(f"      {seconds:8.4f} s  x{count:<6d} {name[:90]}")
  return "\n".join(lines)
