r"""GPU benchmark: link ceilings, the KV data plane, one engine, decode under KV traffic, end to end
(configs/gpu_bench.py).

  python experiments/gpu_bench.py --config=configs/gpu_bench.py:smoke --out=/tmp/gpu_bench
  python experiments/gpu_bench.py --config=configs/gpu_bench.py:h100x4 --out=$OUT

Writes OUT/gpu_bench.json (every number, the card, jax version, date, config) and OUT/gpu_bench.md
(one table: measurement, target, met or missed), both rewritten after every measurement, so a
run cut short by a time limit keeps what it measured. Progress lines go to stderr; the table is
printed last. The sections are library code in dualpath_jax/bench/.
"""

import datetime
import os
import platform
import sys
import time
import traceback

from absl import app, flags
from ml_collections import config_flags

from dualpath_jax.bench import SECTIONS
from dualpath_jax.config_files import load_config_spec
from dualpath_jax.platform import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpu_bench.py:h100x4",
                                          "Benchmark config (a Python file with get_config).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  config = _CONFIG.value
  unknown = [s for s in config.sections if s not in SECTIONS]
  if unknown:
    sys.exit(f"error: sections: unknown {unknown}; choose from {SECTIONS}")
  from dualpath_jax.platform import start_jax
  jax = start_jax(config.platform, config.num_cpu_devices,
                  compilation_cache_dir=config.compilation_cache_dir)
  import jaxlib  # noqa: E402

  from dualpath_jax.bench import (ceilings, data_plane, decode_interference,  # noqa: E402
                                  end_to_end, engine, hardware, host_memory)
  from dualpath_jax.bench.report import Report, rows  # noqa: E402
  from dualpath_jax.bench.timing import Progress  # noqa: E402
  from dualpath_jax.kvstore.layout import KVLayout  # noqa: E402
  from dualpath_jax.model.config import get_preset  # noqa: E402

  log = Progress(budget_s=config.budget_s or None)
  out_dir = os.path.abspath(_OUT.value)
  devices = jax.devices()
  now = datetime.datetime.now(datetime.timezone.utc)
  report = Report(out_dir, dict(
      date=now.date().isoformat(), time_utc=now.isoformat(timespec="seconds"),
      command="python " + " ".join(sys.argv), variant=config.variant, platform=devices[0].platform,
      device_kind=devices[0].device_kind, num_devices=len(devices),
      devices=[str(d) for d in devices], jax=jax.__version__,
      jaxlib=getattr(jaxlib, "__version__", None), python=platform.python_version(),
      host=platform.node(), cpu_count=os.cpu_count(), sections=list(config.sections),
      budget_s=config.budget_s, config=config.to_dict(),
      env={k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION")}),
      elapsed_s=log.elapsed_s)
  log(f"gpu_bench {config.variant}: {len(devices)} x {devices[0].device_kind} "
      f"({devices[0].platform}), jax {jax.__version__}; writing {report.json_path}")

  def section(name, fn):
    if name not in config.sections:
      return None
    log(f"== {name}")
    t0 = time.perf_counter()
    try:
      value = fn(lambda partial: report.set(name, dict(partial, running=True)))
      value["section_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001  (a failed section is reported; the next one runs)
      value = dict(error=repr(e), traceback=traceback.format_exc(),
                   section_s=time.perf_counter() - t0)
      log(f"{name} FAILED: {e!r}")
    report.set(name, value)
    log(f"== {name} done in {value['section_s']:.1f} s")
    return value

  c = config.ceilings
  ceiling_result = section("ceilings", lambda update: ceilings.measure_ceilings(
      devices, total_bytes=c.total_mib << 20, chunk_bytes=c.chunk_mib << 20,
      d2d_bytes=c.d2d_mib << 20, repeats=c.repeats, warmup=c.warmup,
      issue_modes=tuple(c.issue_modes), pageable=c.pageable, pinned=c.pinned, seed=config.seed,
      log=log, out_of_time=log.out_of_time, on_update=update))
  ceiling_gbps = {r["k"]: r["gbps"] for r in (ceiling_result or {}).get("ingest", [])}

  h = config.host_memory

  def run_host_memory(update):
    layout = KVLayout.for_model(get_preset(h.preset, dtype=h.dtype))
    return host_memory.measure_host_memory(
        devices[0], layer_bytes=layout.layer_block_bytes * layout.num_full_blocks(h.prefix_tokens),
        num_layers=layout.num_layers, bounds=tuple(None if b == 0 else b for b in h.bounds),
        sources=tuple(h.sources), repeats=h.repeats, warmup=h.warmup, seed=config.seed, log=log,
        out_of_time=log.out_of_time)
  section("host_memory", run_host_memory)

  d = config.data_plane
  section("data_plane", lambda update: data_plane.measure_data_plane(
      devices, layout=KVLayout.for_model(get_preset(d.preset, dtype=d.dtype)),
      prefix_tokens=d.prefix_tokens, variants=tuple(d.variants), repeats=d.repeats,
      warmup=d.warmup, ceiling_gbps=ceiling_gbps, target_ratio=d.target_ratio,
      components=d.components, chunk_bytes=d.chunk_bytes, max_kv_wait_s=d.max_kv_wait_s,
      layers_in_flight=d.layers_in_flight, host_memory=d.host_memory,
      h2d_staging=d.h2d_staging,
      seed=config.seed, log=log, out_of_time=log.out_of_time,
      on_update=update))

  e = config.engine
  section("engine", lambda update: engine.measure_engine(
      devices[0], model_config=get_preset(e.preset, dtype=e.dtype),
      prefill_contexts=tuple(e.prefill_contexts), append_tokens=e.append_tokens,
      prefill_variants=tuple(e.prefill_variants),
      sdpa_implementation=e.sdpa_implementation or None,
      decode_batches=tuple(e.decode_batches), decode_context=e.decode_context,
      peak_context=e.peak_context, block_tokens=e.block_tokens, repeats=e.repeats,
      warmup=e.warmup, decode_steps=e.decode_steps, decode_attentions=tuple(e.decode_attentions),
      pallas_blockings=tuple(tuple(pair) for pair in e.pallas_blockings),
      prefill_kv_splits=tuple(e.prefill_kv_splits),
      decode_profile_steps=e.decode_profile_steps,
      profile_dir=os.path.join(out_dir, "decode_profile"),
      card=hardware.detect_card(devices[0], peak_flops=e.peak_flops,
                                hbm_bytes_per_s=e.hbm_bytes_per_s),
      target_prefill_mfu=e.target_prefill_mfu, target_decode_roofline=e.target_decode_roofline,
      seed=config.seed, log=log, out_of_time=log.out_of_time, on_update=update))

  i = config.decode_interference

  def run_decode_interference(update):
    model_config = get_preset(i.preset, dtype=i.dtype).replace(
        paged_attention=i.paged_attention, **({"pallas_kernel": i.pallas_kernel}
                                              if i.pallas_kernel else {}))
    return decode_interference.measure_decode_interference(
        devices[0], model_config=model_config, shapes=tuple(tuple(s) for s in i.shapes),
        page_tokens=i.page_tokens, steps=i.steps, rounds=i.rounds, kinds=tuple(i.kinds),
        gates=tuple(tuple(g) for g in i.gates), h2d_tokens=i.h2d_tokens,
        d2h_tokens=i.d2h_tokens, in_flight=i.in_flight, admit_every=i.admit_every,
        admit_tokens=i.admit_tokens, host_memory=i.host_memory,
        h2d_staging=i.h2d_staging, d2h_staging=i.d2h_staging,
        target_inflation=i.target_inflation, seed=config.seed, log=log,
        out_of_time=log.out_of_time, on_update=update)
  section("decode_interference", run_decode_interference)

  x = config.end_to_end

  def run_end_to_end(update):
    base = load_config_spec(x.base_config, REPO, field="end_to_end.base_config")
    jobs = [(end_to_end.job_name(topology, cap), end_to_end.offline_config(
        base, preset=x.preset, dtype=x.dtype, topology=topology, link_bytes_per_s=cap,
        agents=x.agents, turns=x.turns, first_append_tokens=x.first_append_tokens,
        append_tokens=x.append_tokens, gen_tokens=x.gen_tokens, modes=tuple(x.modes),
        warmup=x.warmup, warmup_agents=x.warmup_agents, warmup_turns=x.warmup_turns,
        primed_turns=x.primed_turns, check_reference=x.check_reference,
        thread_sample_hz=x.thread_sample_hz, device_trace=x.device_trace.to_dict(),
        gc_freeze=x.gc_freeze, repeats=x.repeats, variants=x.variants.to_dict(),
        engines_per_node=x.engines_per_node, runtime=x.runtime.to_dict(),
        workload=x.workload.to_dict(), store=x.store.to_dict(), cost_model=x.cost_model,
        model=x.model.to_dict()))
        for topology in x.topologies for cap in x.link_caps]
    # The offline script applies these before jax starts; only matmul precision can change now.
    precision = base.get("matmul_precision") if hasattr(base, "get") else None
    saved = getattr(jax.config, "jax_default_matmul_precision", None)
    if precision:
      jax.config.update("jax_default_matmul_precision", precision)
    interval = sys.getswitchinterval()
    if x.gil_switch_interval_s:
      sys.setswitchinterval(x.gil_switch_interval_s)
    try:
      result = end_to_end.run_end_to_end(
          jobs, os.path.join(out_dir, "end_to_end"), target_efficiency=x.target_speedup_over_bound,
          target_oracle_ratio=x.target_jct_over_oracle, target_inflation=x.target_decode_inflation,
          num_devices=len(devices), log=log, out_of_time=log.out_of_time, on_update=update)
      result["gil_switch_interval_s"] = sys.getswitchinterval()
      return result
    finally:
      sys.setswitchinterval(interval)
      if precision:
        jax.config.update("jax_default_matmul_precision", saved)

  section("end_to_end", run_end_to_end)

  report.doc["meta"]["complete"] = True
  report.save()
  log(f"done in {log.elapsed_s():.1f} s: {report.json_path}")
  width = max([len(r[1]) for r in rows(report.doc)] + [10])
  for section_name, name, value, target, status in rows(report.doc):
    print(f"{section_name:10s} {name:{width}s}  {value:40s}  {target:28s}  {status}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
