"""End to end: offline jobs (basic / dualpath / oracle) per topology and link cap, and the bound.

Each job is `runtime.offline_job.OfflineJob.from_config(config, workdir).run()`; from its
summary per mode: JCT, decode step medians and the decode step-time inflation under KV traffic
(runtime/metrics.py decode_inflation), and from its turns.jsonl the TTFT breakdown
(analysis/offline_plots.py ttft_breakdown). Configs are built from a base offline
config (configs/offline.py, whatever fields it has today) with a few parameters replaced, so that
switches added to the offline config later keep their defaults here.

Per job: speedup of dualpath (and oracle) over basic, and the bound on dualpath's speedup,
min((P + D) / P, basic JCT / oracle JCT): dual-path loading can at best add the D decode nodes'
storage links to the P prefill nodes' links, and never beats skipping the I/O altogether.
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence

TOPOLOGY_PATTERN = re.compile(r"^(\d+)P(\d+)D$")
REPEAT_PATTERN = re.compile(r"^(.+)_r\d+$")


def parse_topology(name: str) -> tuple[int, int]:
  """'1P3D' -> (1, 3)."""
  match = TOPOLOGY_PATTERN.match(name)
  if not match or not all(int(g) > 0 for g in match.groups()):
    raise ValueError(f"end_to_end.topologies: expected names like '1P3D', got {name!r}")
  return int(match.group(1)), int(match.group(2))


def _to_dict(config) -> dict:
  return copy.deepcopy(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def offline_config(base, *, preset: str, dtype: str, topology: str, link_bytes_per_s: float,
                   agents: int, turns: int, first_append_tokens: int, append_tokens: int,
                   gen_tokens: int, modes: Sequence[str] = ("basic", "dualpath", "oracle"),
                   warmup: bool = True, warmup_agents: int = 0, warmup_turns: int = 0,
                   primed_turns: int = 0, check_reference: bool = False,
                   engines_per_node: int = 0, runtime: Mapping | None = None,
                   workload: Mapping | None = None, store: Mapping | None = None,
                   cost_model: str = "", model: Mapping | None = None,
                   thread_sample_hz: float = 0.0, device_trace: Mapping | None = None,
                   gc_freeze: bool = False, repeats: int = 1,
                   variants: Mapping | None = None) -> dict:
  """One offline-job config dict: `base` with these parameters replaced.

  link_bytes_per_s: 0 means uncapped. engines_per_node: 0 keeps the base's value where it
  divides both engine counts, else 1. runtime.max_context_tokens grows to the longest context.
  runtime / workload / store: further fields of those sections (e.g. compute_quota_s,
  length_jitter, driver). cost_model: the cost model's JSON ('' keeps the base's).
  thread_sample_hz: > 0 samples the threads' stacks over each timed run (summary.json).
  device_trace: {modes, start_s, seconds}, a jax.profiler window of those runs (configs/offline.py).
  gc_freeze: gc.freeze() when each timed run's clock starts (configs/offline.py).
  variants: named runs (a mode plus RuntimeConfig overrides, configs/offline.py) that `modes`
  may list, added to the base's.
  repeats: timed runs of each mode, interleaved (basic, dualpath, oracle, basic_r2, ...; see
  `repeat_runs`), so that run-to-run noise shows beside the modes' differences.
  """
  p, d = parse_topology(topology)
  c = _to_dict(base)
  for section in ("model", "topology", "runtime", "workload"):
    if not isinstance(c.get(section), dict):
      raise ValueError(f"end_to_end: the base offline config has no {section!r} section")
  c["model"].update(dict(model or {}), preset=preset, dtype=dtype)
  per_node = engines_per_node or c["topology"].get("engines_per_node", 1)
  if p % per_node or d % per_node:
    per_node = 1
  c["topology"].update(num_prefill_engines=p, num_decode_engines=d, engines_per_node=per_node)
  c["runtime"]["link_bytes_per_s"] = float(link_bytes_per_s) if link_bytes_per_s else None
  c["workload"].update(agents=agents, turns=turns, first_append_tokens=first_append_tokens,
                       append_tokens=append_tokens, gen_tokens=gen_tokens)
  longest = first_append_tokens + turns * (append_tokens + gen_tokens)
  if "max_context_tokens" in c["runtime"]:
    c["runtime"]["max_context_tokens"] = max(int(c["runtime"]["max_context_tokens"]),
                                             -(-longest // 64) * 64)
  c["runtime"].update(dict(runtime or {}))
  c["workload"].update(dict(workload or {}))
  if store:
    c["store"] = dict(store)
  if cost_model:
    c["runtime"]["cost_model"] = cost_model
  names, variants = repeat_runs(modes, repeats, dict(c.get("variants") or {}, **(variants or {})))
  c.update(modes=names, variants=variants, warmup=bool(warmup), warmup_agents=int(warmup_agents),
           warmup_turns=int(warmup_turns), primed_turns=int(primed_turns),
           check_reference=bool(check_reference), thread_sample_hz=float(thread_sample_hz))
  if device_trace is not None:
    c["device_trace"] = dict(device_trace)
  c["gc_freeze"] = bool(gc_freeze)
  return c


def repeat_runs(modes: Sequence[str], repeats: int, variants: Mapping
                ) -> tuple[tuple[str, ...], dict]:
  """The run names of `repeats` interleaved rounds of `modes` and the variants they need: round
  r > 1 runs mode m as the variant 'm_r<r>' (the same mode or variant, a run of its own)."""
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"end_to_end.repeats: expected a positive int, got {repeats!r}")
  variants = {name: dict(v) for name, v in dict(variants).items()}
  names = list(modes)
  for r in range(2, repeats + 1):
    for mode in modes:
      name = f"{mode}_r{r}"
      if name in variants:
        raise ValueError(f"end_to_end.repeats: run name {name!r} is already a variant")
      variants[name] = dict(variants[mode]) if mode in variants else dict(mode=mode)
      names.append(name)
  return tuple(names), variants


def repeat_of(name: str, names: Sequence[str]) -> str:
  """The run `name` repeats ('dualpath' for 'dualpath_r2' when 'dualpath' is a run too)."""
  match = REPEAT_PATTERN.match(name)
  return match.group(1) if match and match.group(1) in names else name


def medians_by_mode(jct_s: Mapping[str, float]
                    ) -> tuple[dict[str, list[float]], dict[str, float]]:
  """{mode: [JCT of each of its runs]} and {mode: median JCT}, repeats grouped with their run."""
  runs: dict[str, list[float]] = {}
  for name, seconds in jct_s.items():
    runs.setdefault(repeat_of(name, list(jct_s)), []).append(seconds)
  return runs, {mode: float(statistics.median(values)) for mode, values in runs.items()}


def job_name(topology: str, link_bytes_per_s: float) -> str:
  """'1P3D_cap6.25GBps', '2P2D_uncapped' (letters, digits, '.', '_' only: safe file names)."""
  return f"{topology}_" + (f"cap{link_bytes_per_s / 1e9:g}GBps".replace("e-", "em")
                           if link_bytes_per_s else "uncapped")


def speedups(jct_s: Mapping[str, float], num_prefill: int, num_decode: int,
             target_efficiency: float, target_oracle_ratio: float = 1.15) -> dict:
  """Speedups over basic and the bound min((P + D) / P, basic / oracle), where JCTs allow;
  dualpath JCT / oracle JCT against `target_oracle_ratio`."""
  out = {}
  if jct_s.get("dualpath") and jct_s.get("oracle"):
    out["dualpath_over_oracle"] = jct_s["dualpath"] / jct_s["oracle"]
    out["oracle_ratio_met"] = bool(out["dualpath_over_oracle"] <= target_oracle_ratio)
  basic = jct_s.get("basic")
  if not basic:
    return out
  for mode in ("dualpath", "oracle"):
    if jct_s.get(mode):
      out[f"{mode}_speedup"] = basic / jct_s[mode]
  bound = (num_prefill + num_decode) / num_prefill
  if jct_s.get("oracle"):
    bound = min(bound, basic / jct_s["oracle"])
  out["bound"] = bound
  out["bound_formula"] = "min((P + D) / P, basic JCT / oracle JCT)"
  if "dualpath_speedup" in out:
    out["dualpath_speedup_over_bound"] = out["dualpath_speedup"] / bound
    out["met"] = bool(out["dualpath_speedup_over_bound"] >= target_efficiency)
  return out


def _per_mode(summary: Mapping, job_dir: str) -> dict:
  """Decode step medians, inflation under KV traffic and the TTFT breakdown, per mode."""
  from dualpath_jax.analysis.offline_plots import ttft_breakdown
  out = dict(primed_turns=summary.get("primed_turns", 0),
             decode_step_median_s={r["mode"]: r.get("decode_step_median_s")
                                   for r in summary["runs"]},
             decode_inflation={r["mode"]: r.get("decode_inflation") for r in summary["runs"]},
             engine_time_s={r["mode"]: {role: v["total"] for role, v in
                                        (r.get("engine_time_s") or {}).items()}
                            for r in summary["runs"]},
             bytes={r["mode"]: r.get("bytes") for r in summary["runs"]},
             snic_balance_mean={r["mode"]: (r.get("snic_balance") or {}).get("mean")
                                for r in summary["runs"]},
             gc_pause_s={r["mode"]: (r.get("gc_pauses") or {}).get("seconds")
                         for r in summary["runs"]},
             compiles_in_timed_part={r["mode"]: {k: (r.get("compiles_in_timed_part") or {})
                                                 .get(k) for k in ("compiles", "seconds")}
                                     for r in summary["runs"]})
  turns_path = os.path.join(job_dir, "turns.jsonl")
  if os.path.exists(turns_path):
    with open(turns_path) as f:
      out["ttft_breakdown_s"] = ttft_breakdown([json.loads(line) for line in f if line.strip()])
  return out


def run_end_to_end(jobs: Sequence[tuple[str, dict]], workdir: str, *, target_efficiency: float,
                   num_devices: int, target_oracle_ratio: float = 1.15,
                   target_inflation: float = 0.05, log: Callable[[str], None] = print,
                   out_of_time: Callable[[], bool] = lambda: False,
                   on_update: Callable[[dict], None] | None = None) -> dict:
  """Runs each (name, config dict) offline job in WORKDIR/name; JCTs, speedups and bounds."""
  from dualpath_jax.runtime.offline_job import OfflineJob

  profiled = ""  # a cost model the first job profiled at start-up, reused by the later ones
  result = dict(target_dualpath_speedup_over_bound=target_efficiency,
                target_dualpath_jct_over_oracle=target_oracle_ratio,
                target_decode_inflation=target_inflation, jobs=[])
  for name, config in jobs:
    p = config["topology"]["num_prefill_engines"]
    d = config["topology"]["num_decode_engines"]
    row = dict(name=name, topology=f"{p}P{d}D",
               link_bytes_per_s=config["runtime"].get("link_bytes_per_s"),
               preset=config["model"]["preset"], workload=dict(config["workload"]))
    if p + d > num_devices:
      row["skipped"] = f"{p + d} devices needed, {num_devices} present"
    elif out_of_time():
      row["skipped"] = "time budget"
    else:
      try:
        log(f"end_to_end: {name} ({row['topology']}, preset {row['preset']}, link "
            f"{row['link_bytes_per_s'] or 'uncapped'})")
        if profiled and config["runtime"].get("cost_model", "auto") in ("", "auto"):
          config = dict(config, runtime=dict(config["runtime"], cost_model=profiled))
        job = OfflineJob.from_config(config, os.path.join(workdir, name))
        summary = job.run(progress=lambda line, name=name: log(f"end_to_end[{name}] {line}"))
        if not job.cost_model_path:
          profiled = summary["cost_model_path"]
        row["jct_s"] = {run["mode"]: float(run["jct_s"]) for run in summary["runs"]}
        row["jct_runs_s"], row["jct_median_s"] = medians_by_mode(row["jct_s"])
        # With repeats, speedups and bounds come from each mode's median JCT.
        row.update(speedups(row["jct_median_s"], p, d, target_efficiency, target_oracle_ratio))
        row.update(_per_mode(summary, os.path.join(workdir, name)))
        worst = [v["inflation"] for v in row["decode_inflation"].values()
                 if v and v.get("inflation") is not None]
        if worst:
          row["decode_inflation_max"] = max(worst)
          row["inflation_met"] = bool(max(worst) <= target_inflation)
        log(f"end_to_end: {name} JCT " + ", ".join(f"{m} {s:.2f} s"
                                                   for m, s in row["jct_s"].items())
            + (" (medians " + ", ".join(f"{m} {s:.2f} s" for m, s in row["jct_median_s"].items())
               + ")" if len(row["jct_s"]) > len(row["jct_median_s"]) else "")
            + (f"; dualpath speedup {row['dualpath_speedup']:.2f} of bound {row['bound']:.2f}"
               if "dualpath_speedup" in row else ""))
      except Exception as e:  # noqa: BLE001  (one job failing must not end the section)
        row["error"] = repr(e)
        log(f"end_to_end: {name} FAILED: {e!r}")
    if "skipped" in row:
      log(f"end_to_end: {name} skipped: {row['skipped']}")
    result["jobs"].append(row)
    if on_update:
      on_update(result)
  return result
