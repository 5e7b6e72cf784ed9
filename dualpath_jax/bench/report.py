"""What a benchmark run leaves behind: DIR/gpu_bench.json (everything) and DIR/gpu_bench.md.

Both are rewritten after every measurement (write to a temporary file, then rename), so a run
stopped by a time limit still leaves every number it had measured, and `meta.complete` says
whether it got to the end.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Mapping

from dualpath_jax.bench import PALLAS_FIELDS

JSON_NAME = "gpu_bench.json"
MD_NAME = "gpu_bench.md"


def _clean(value):
  """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python numbers."""
  if isinstance(value, Mapping):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    try:
      value = value.item()
    except (TypeError, ValueError):
      return str(value)
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def _write(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class Report:
  """The run's results by section, saved as JSON and markdown on every `save()`."""

  def __init__(self, out_dir: str, meta: dict, elapsed_s: Callable[[], float] | None = None):
    self.out_dir = out_dir
    self.doc: dict = dict(meta=dict(meta, complete=False))
    self._elapsed_s = elapsed_s
    os.makedirs(out_dir, exist_ok=True)

  def set(self, section: str, value: dict) -> None:
    self.doc[section] = value
    self.save()

  def save(self) -> None:
    if self._elapsed_s is not None:
      self.doc["meta"]["elapsed_s"] = self._elapsed_s()
    doc = _clean(self.doc)
    _write(os.path.join(self.out_dir, JSON_NAME), json.dumps(doc, indent=1) + "\n")
    _write(os.path.join(self.out_dir, MD_NAME), markdown(doc))

  @property
  def json_path(self) -> str:
    return os.path.join(self.out_dir, JSON_NAME)


def _status(met) -> str:
  return "—" if met is None else ("met" if met else "MISSED")


def _gb(x) -> str:
  return "—" if x is None else f"{x:.2f} GB/s"


def rows(doc: Mapping) -> list[tuple[str, str, str, str, str]]:
  """(section, measurement, value, target, status) for every headline number in `doc`."""
  out = []
  c = doc.get("ceilings") or {}
  if "error" in c:
    out.append(("ceilings", "section", "error", "—", c["error"][:80]))
  for r in c.get("h2d_alone", []):
    out.append(("ceilings", f"H2D gpu{r['gpu']} alone ({c.get('h2d_source')})", _gb(r["gbps"]),
                "info (DESIGN.md H200: 54)", "—"))
  if "h2d_pageable_gpu0" in c:
    out.append(("ceilings", "H2D gpu0 from pageable numpy", _gb(c["h2d_pageable_gpu0"]["gbps"]),
                "info (DESIGN.md H200: 8.4-9.2)", "—"))
  if "h2d_all_at_once" in c:
    r = c["h2d_all_at_once"]
    out.append(("ceilings", f"H2D all {c.get('num_gpus')} GPUs at once, total",
                _gb(r["gbps_total"]), "info (DESIGN.md 4x H200: 162)", "—"))
  if "d2d_summary" in c:
    r = c["d2d_summary"]
    out.append(("ceilings", "GPU-to-GPU per link, min / median / max",
                f"{r['min_gbps']:.1f} / {r['median_gbps']:.1f} / {r['max_gbps']:.1f} GB/s",
                "info (DESIGN.md H200: 320)", "—"))
  for r in c.get("ingest", []):
    speedup = f" ({r['speedup_vs_own_link']:.2f}x own link)" if "speedup_vs_own_link" in r else ""
    out.append(("ceilings", f"ingest into gpu0: own link + {r['k']} forwarding",
                _gb(r["gbps"]) + speedup, "info (DESIGN.md k=3: 121)", "—"))

  h = doc.get("host_memory") or {}
  if "error" in h:
    out.append(("host_memory", "section", "error", "—", h["error"][:80]))
  by_source: dict[str, list[str]] = {}
  for r in h.get("h2d", []):
    if "gbps" in r:
      by_source.setdefault(r["source"], []).append(
          f"{'b2b' if r['bound'] is None else r['bound']}: {r['gbps']:.1f}"
          + ("" if r["bytes_equal"] else " WRONG"))
    else:
      by_source[r["source"]] = [str(r.get("error") or r.get("skipped"))[:80]]
  for source, values in by_source.items():
    out.append(("host_memory", f"H2D of {h.get('num_layers')} layers from {source}, GB/s by "
                "copies in flight", ", ".join(values), "info", "—"))
  for target, r in (h.get("d2h") or {}).items():
    if not isinstance(r, dict):
      continue
    value = _gb(r["gbps"]) if "gbps" in r else r.get("error", "")[:80]
    if r.get("bytes_equal") is False:
      value += " WRONG BYTES"
    out.append(("host_memory", f"D2H into {target}", value, "info", "—"))

  d = doc.get("data_plane") or {}
  if "error" in d:
    out.append(("data_plane", "section", "error", "—", d["error"][:80]))
  for r in d.get("rows", []):
    name = f"k={r['k']} {r['variant']}"
    if "chunk_bytes" in r:  # the 'traffic' variant's TrafficConfig
      name += (f" ({r['chunk_bytes'] / 2**20:g} MiB pieces, KV wait <= "
               f"{r['max_kv_wait_s']:g} s)")
    if "error" in r:
      out.append(("data_plane", name, "error", "—", r["error"][:80]))
      continue
    value = _gb(r["gbps"]) + (f", ratio {r['ratio']:.3f}" if "ratio" in r else "")
    judged = "met" in r  # the runtime's variant (data_plane.RUNTIME_VARIANT)
    out.append(("data_plane", f"{name}: {d.get('prefix_tokens')}-token prefix", value,
                f">= {d.get('target_ratio')} of ceiling" if judged
                else "info (not the runtime's path)", _status(r.get("met"))))
  comp = d.get("components") or {}
  if comp:
    keys = ("gather_gbps", "gather_reused_buffer_gbps", "h2d_gbps", "h2d_direct_gbps",
            "d2d_gbps")
    out.append(("data_plane", "components, one thread: gather fresh / reused buffer / H2D "
                "staged / direct / D2D", " / ".join(_gb(comp.get(k)) for k in keys),
                "info", "—"))

  e = doc.get("engine") or {}
  if "error" in e:
    out.append(("engine", "section", "error", "—", e["error"][:80]))
  targets = e.get("targets") or {}
  pm = e.get("peak_memory") or {}
  if "error" in pm:
    out.append(("engine", "peak memory", "error", "—", pm["error"][:80]))
  elif pm:
    value = ("n/a" if pm.get("peak_bytes") is None else
             f"{pm['peak_bytes'] / 2**30:.2f} GiB" + ("" if pm.get("exact") else " (upper bound)"))
    out.append(("engine", f"PE peak memory, {pm['context']}-token layerwise prefill", value,
                f"<= {pm['bound_bytes'] / 2**30:.2f} GiB (bound)", _status(pm.get("met"))))
  for r in e.get("prefill", []):
    name = f"prefill {r.get('variant', '')} ctx {r['context']} +{r.get('append', '')}"
    if "prefill_kv_splits" in r:
      name += f" k={r['prefill_kv_splits']}"
    if "error" in r or "skipped" in r:
      out.append(("engine", name, "error" if "error" in r else "skipped", "—",
                  (r.get("error") or r.get("skipped"))[:80]))
      continue
    value = f"{r['median_s'] * 1e3:.1f} ms, {r['tflops_per_s']:.0f} TFLOP/s" + (
        f", MFU {r['mfu']:.3f}" if "mfu" in r else "")
    out.append(("engine", name, value, f"MFU >= {targets.get('prefill_mfu')}",
                _status(r.get("met"))))
  for r in e.get("decode", []):
    # Rows from before decode_attentions existed have no paged_attention: they gathered.
    name = f"decode {r.get('paged_attention', 'gather')} batch {r['batch']} ctx {r['context']}"
    if r.get("diagnostic") == "fixed_cost":
      name += " (fixed cost: weights + dispatch)"
    if r.get("sweep") == "pallas_blocking":
      # the kernel fields the row ran with (rows before num_warps/num_stages lack them)
      name += "".join(f" {f.removeprefix('pallas_')} {r[f]}" for f in PALLAS_FIELDS if f in r)
    if "error" in r:
      out.append(("engine", name, "error", "—", r["error"][:80]))
      continue
    value = f"{r['step_s'] * 1e3:.2f} ms/step" + (
        f", {r['roofline_fraction']:.3f} of roofline {r['roofline_s'] * 1e3:.2f} ms"
        if "roofline_fraction" in r else "")
    if "overlapped_step_s" in r:  # the DE's loop, one step in flight (older rows lack it)
      value += f"; overlapped {r['overlapped_step_s'] * 1e3:.2f} ms/step" + (
          f", {r['overlapped_roofline_fraction']:.3f} of roofline"
          if "overlapped_roofline_fraction" in r else "") + (
          f" ({_status(r['overlapped_met'])})" if "overlapped_met" in r else "")
    if r.get("pallas_blocking"):  # what the kernel ran with
      b = r["pallas_blocking"]
      value += (f"; {b['k_splits']} splits of {b['padded_pages'] // b['k_splits']} pages, "
                f"{b['pages_per_compute_block']} a block")
    target = ("diagnostic, no target" if r.get("diagnostic") else
              f"roofline fraction >= {targets.get('decode_roofline_fraction')}")
    out.append(("engine", name, value, target, _status(r.get("met"))))
  profile = e.get("decode_profile") or {}
  if "error" in profile:
    out.append(("engine", "decode profile", "error", "—", profile["error"][:80]))
  for label, run in (profile.get("runs") or {}).items():
    step = run["per_step"]
    value = (f"{step['span_s'] * 1e3:.2f} ms/step traced, device busy "
             f"{step['device_busy_s'] * 1e3:.2f}: " + ", ".join(
                 f"{k} {v * 1e3:.2f}" for k, v in step["by_class_s"].items()))
    out.append(("engine", f"decode profile {label} (batch {run['batch']} ctx {run['context']})",
                value, "diagnostic, no target", "—"))

  di = doc.get("decode_interference") or {}
  if "error" in di:
    out.append(("decode_interference", "section", "error", "—", di["error"][:80]))
  for r in di.get("rows", []):
    shape = f"batch {r['batch']} ctx {r['context']}"
    if "conditions" not in r:
      out.append(("decode_interference", shape, "error" if "error" in r else "skipped", "—",
                  (r.get("error") or r.get("skipped") or "")[:80]))
      continue
    base = r["conditions"][0]  # 'none'
    for c in r["conditions"][1:]:
      value = (f"{c['inflation'] * 100:+.1f}% ({c['median_s'] * 1e3:.2f} vs "
               f"{base['median_s'] * 1e3:.2f} ms; mean {c['mean_inflation'] * 100:+.1f}%)"
               + "".join(f", {d} {c[f'{d}_gbps']:.1f} GB/s" + (
                   f" (alone {c[f'{d}_alone_gbps']:.1f})" if f"{d}_alone_gbps" in c else "")
                   for d in ("h2d", "d2h") if f"{d}_gbps" in c)) + (
                   f"; the {c['admissions']} steps behind an admission "
                   f"{c['admission_step_inflation'] * 100:+.1f}%" if "admissions" in c else "")
      out.append(("decode_interference", f"DE step under {c['condition']}, {shape}", value,
                  f"<= {di.get('target_inflation', 0.05) * 100:.0f}%", _status(c.get("met"))))

  x = doc.get("end_to_end") or {}
  if "error" in x:
    out.append(("end_to_end", "section", "error", "—", x["error"][:80]))
  for r in x.get("jobs", []):
    if "jct_s" not in r:
      out.append(("end_to_end", r["name"], "error" if "error" in r else "skipped", "—",
                  (r.get("error") or r.get("skipped") or "")[:80]))
      continue
    value = ", ".join(_jcts(mode, seconds) for mode, seconds in
                      (r.get("jct_runs_s") or {m: [s] for m, s in r["jct_s"].items()}).items())
    if "dualpath_speedup" in r:
      value += f"; speedup {r['dualpath_speedup']:.2f} / bound {r['bound']:.2f}"
    out.append(("end_to_end", r["name"], value,
                f"speedup >= {x.get('target_dualpath_speedup_over_bound')} x bound",
                _status(r.get("met"))))
    if "dualpath_over_oracle" in r:
      out.append(("end_to_end", f"{r['name']} dualpath / oracle JCT",
                  f"{r['dualpath_over_oracle']:.2f}",
                  f"<= {x.get('target_dualpath_jct_over_oracle')}",
                  _status(r.get("oracle_ratio_met"))))
    if "decode_inflation_max" in r:
      per_mode = ", ".join(f"{m} {v['inflation'] * 100:+.1f}%"
                           for m, v in r["decode_inflation"].items()
                           if v and v.get("inflation") is not None)
      out.append(("end_to_end", f"{r['name']} decode step inflation under KV traffic", per_mode,
                  f"<= {x.get('target_decode_inflation', 0.05) * 100:.0f}%",
                  _status(r.get("inflation_met"))))
  return out


def _jcts(mode: str, seconds: list[float]) -> str:
  """'basic 5.82 s', or with repeated runs 'basic 5.82 s (median of 5.05, 5.82, 6.10)'."""
  if len(seconds) == 1:
    return f"{mode} {seconds[0]:.2f} s"
  runs = ", ".join(f"{s:.2f}" for s in seconds)
  return f"{mode} {statistics.median(seconds):.2f} s (median of {runs})"


def markdown(doc: Mapping) -> str:
  meta = doc.get("meta", {})
  lines = [
      "# GPU benchmark",
      "",
      f"{meta.get('device_kind')} x{meta.get('num_devices')} ({meta.get('platform')}), "
      f"jax {meta.get('jax')}, Python {meta.get('python')}, {meta.get('date')}, config "
      f"`{meta.get('variant')}`; complete: {meta.get('complete')}, "
      f"{meta.get('elapsed_s', 0):.0f} s.",
      "",
      f"    {meta.get('command', '')}",
      "",
      "| section | measurement | value | target | status |",
      "|---|---|---|---|---|",
  ]
  for section, name, value, target, status in rows(doc):
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines.append(f"| {section} | {cell(name)} | {cell(value)} | {cell(target)} | {cell(status)} |")
  lines += ["", "GB = 1e9 bytes; times are medians of wall-clock repeats with outputs ready. "
            "All numbers and notes: gpu_bench.json.", ""]
  return "\n".join(lines)
