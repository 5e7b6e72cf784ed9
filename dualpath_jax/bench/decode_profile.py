"""Where a decode step's device time goes: one jax.profiler trace over the DE's loop, per config.

The engine bench times whole decode steps against the HBM roofline (bench/engine.py); this splits
them. Each configuration (a label, a model config, a batch and a context) gets its random pool
(engine.DecodeInputs) and is compiled and warmed up first; then one trace records `steps` steps
of the DE's loop per configuration, each inside a host span named by its label that ends only
after its last step's tokens are on the host. analysis/device_trace.breakdown_by_span attributes
every device event that starts inside a span to it and classes kernels as attention (the Pallas
paged kernel), matmul (cuBLAS, CUTLASS, XLA's GEMMs), scatter (the new tokens' page writes) or
other (XLA's fusions: norms, RoPE, residuals, the kernel's softmax merge). Per step:

  span_s          wall time of the loop under the profiler (tracing adds a little to each launch)
  device_busy_s   the union of the device's events: span_s - device_busy_s is device idle time
  by_class_s      summed durations per class; `top` names the largest kernels

One trace for all configurations, because stopping a trace can break the CUDA context (jax issue
40260; runtime/profile_window.py): the engine section runs this last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import jax

from dualpath_jax.bench import PALLAS_FIELDS


def profile_decode(model, runs: Sequence[tuple[str, object, int, int]], *, page_tokens: int,
                   steps: int, log_dir: str, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
  """runs: (label, ModelConfig, batch, context) per configuration, `model`'s parameters under
  each config (weights.with_config). Returns {trace, steps, runs: {label: {batch, context,
  config fields, per_step: {span_s, device_busy_s, by_class_s, top}}}} or {error} where the
  profiler failed; labels must be distinct."""
  from dualpath_jax.analysis.device_trace import breakdown_by_span
  from dualpath_jax.bench.engine import DecodeInputs
  from dualpath_jax.model import weights
  from dualpath_jax.runtime.profile_window import latest_trace, trace_options

  labels = [label for label, *_ in runs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"profile_decode: labels must be distinct, got {labels}")
  if steps <= 0:
    raise ValueError(f"profile_decode: steps must be positive, got {steps}")
  prepared = []
  for label, config, batch, context in runs:
    run_model = weights.with_config(model, config)
    inputs = DecodeInputs(config, batch, context, page_tokens, seed)
    inputs.de_loop(run_model, 2)  # compile and warm outside the trace
    prepared.append((label, run_model, inputs))
  os.makedirs(log_dir, exist_ok=True)
  result = dict(steps=steps, runs={})
  try:
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True,
                             profiler_options=trace_options())
    try:
      for label, run_model, inputs in prepared:
        t0 = time.perf_counter()
        with jax.profiler.TraceAnnotation(label):
          inputs.de_loop(run_model, steps)
        log(f"decode profile: {label}: {(time.perf_counter() - t0) / steps * 1e3:.3f} ms/step "
            f"traced")
    finally:
      jax.profiler.stop_trace()
  except Exception as e:  # noqa: BLE001  (the profiler's failure is a result, not a crash)
    result["error"] = f"profiler: {e!r}"
    return result
  finally:
    for _, _, inputs in prepared:
      inputs.delete()
  path = latest_trace(log_dir)
  if path is None:
    result["error"] = f"no trace written under {log_dir}"
    return result
  result["trace"] = path
  try:
    spans = breakdown_by_span(path, labels)
  except (OSError, ValueError, KeyError) as e:
    result["error"] = f"breakdown: {e!r}"
    return result
  for label, config, batch, context in runs:
    b = spans[label]
    per_step = dict(span_s=b["span_s"] / steps, device_busy_s=b["device_busy_s"] / steps,
                    by_class_s={k: v / steps for k, v in b["by_class_s"].items()},
                    top=[[name, s / steps, count / steps] for name, s, count in b["top"]])
    result["runs"][label] = dict(
        batch=batch, context=context, paged_attention=config.paged_attention,
        pallas={f.removeprefix("pallas_"): getattr(config, f) for f in PALLAS_FIELDS},
        per_step=per_step)
    classes = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in per_step["by_class_s"].items())
    log(f"decode profile: {label}: span {per_step['span_s'] * 1e3:.3f} ms, device busy "
        f"{per_step['device_busy_s'] * 1e3:.3f} ms per step ({classes})")
  return result
