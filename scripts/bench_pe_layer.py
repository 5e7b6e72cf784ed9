r"""The PE's host work per layer of a layerwise prefill, against the time the layers take.

Record 7's profiled window (1P1D dualpath, 2x H200, docs/perf/gpu_bench.md) had the PE's host
thread spend ~1.1 ms dispatching each layer's program (0.7 ms of it XLA updating the layer's
command buffer, a CUDA graph, to the call's new buffers), ~0.2 ms on each row's pad and ~0.15 ms
on the rows' stack, while the PE's GPU computed 24% of the window. This measures that host work
on one device without the rest of the runtime (no DE, no other Python thread: no GIL
contention), per (rows, prefix tokens), with the GPU end-to-end preset's model and attention:

  layers   the layer programs alone, each layer's prefix padded and stacked on the host and
           placed before the clock (as the engine bench's prefill rows)
  runtime  as PrefillShard._layerwise loads a PE-path prefix: before layer l is dispatched,
           layer l+1's prefix part of each row goes H2D from page-locked host memory (its
           landed read, transfer.host_to_device staging 'direct'); after it, each part is
           padded to tp (prefill_shard's _pad_to) and the rows are stacked (padding rows:
           zeros; one row: _pad_one_row, pad and batch axis in one program); no sends (the
           runtime runs them on another thread) and no bound on layers in flight
  loads_first  the runtime up to 2026-11-29: layer l+1's H2D, pads and stack all before layer
           l is dispatched (on a GPU the pads, queued before layer l, wait for the H2D, and the
           H2D for the work queued before it: loads and layers ran one after the other)

Each run: wall seconds until the last token's logits are ready, and the host seconds inside each
kind of call (a call returns once dispatched, before the device is done). When the host seconds
add up to the wall, the layers wait on the host, not on the GPU. The loading variants' logits
are compared with the 'layers' ones (the same host bytes, padded and stacked on the host), so
a pad or stack that moves the wrong bytes shows.
Run it once per XLA_FLAGS setting to compare, e.g. command buffers off:
XLA_FLAGS=--xla_gpu_enable_command_buffer= (the JSON records XLA_FLAGS).

  python scripts/bench_pe_layer.py --out=/tmp/pe_layer.json                     # GPU defaults
  python scripts/bench_pe_layer.py --preset=tiny --dtype=float32 --attention=einsum \
      --kv_splits=0 --rows=1,2 --prefix_tokens=200 --append=64 --host_memory=numpy \
      --out=/tmp/pe_layer.json                                                   # CPU
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("layers", "runtime", "loads_first")

_PRESET = flags.DEFINE_string("preset", "qwen2.5-7b", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Model and KV dtype.")
_ATTENTION = flags.DEFINE_string("attention", "cudnn", "ModelConfig.attention.")
_KV_SPLITS = flags.DEFINE_integer("kv_splits", 4, "ModelConfig.prefill_kv_splits.")
_ROWS = flags.DEFINE_list("rows", ["1", "4"], "Rows (requests) a forward.")
_PREFIX = flags.DEFINE_list("prefix_tokens", ["18432"],
                            "Each row's prefix tokens (a one-sided read's landed rows; padded "
                            "to the power of 2 tp on the device).")
_APPEND = flags.DEFINE_integer("append", 512, "New tokens a row.")
_BLOCK_TOKENS = flags.DEFINE_integer("block_tokens", 64, "Tokens a KV block (tp's floor).")
_HOST_MEMORY = flags.DEFINE_string("host_memory", "cuda_registered",
                                   "transfer.pinned_memory kind of the landed reads.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs a row.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs before them (compiles).")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and KV seed.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.", required=True)


def _positive_ints(flag, values) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    out = []
  if not out or min(out) <= 0:
    sys.exit(f"error: --{flag}: expected positive integers, got {','.join(values)}")
  return out


def measure(device, config, rows: int, prefix_tokens: int, append: int, block_tokens: int,
            host_memory: str, repeats: int, warmup: int, seed: int, log=print) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dualpath_jax.bench.timing import median_seconds
  from dualpath_jax.engines.topology import single_engine
  from dualpath_jax.model import weights
  from dualpath_jax.model.prefill import (embed_tokens_jit, last_token_logits_jit, pow2_at_least,
                                          prefill_layer_jit)
  from dualpath_jax.runtime.prefill_shard import _pad_one_row, _pad_to
  from dualpath_jax.transfer import host_to_device, pinned_memory

  engine = single_engine(device, role="prefill")
  sharding = engine.replicated_sharding
  place = lambda x: jax.device_put(x, sharding)  # noqa: E731
  model = place(weights.init_random(config, seed=seed))
  layers = config.num_layers
  kv = (2, config.num_kv_heads, config.head_dim)
  dtype = np.dtype(config.jnp_dtype)
  padded_rows = pow2_at_least(rows)
  tp, tn = pow2_at_least(prefix_tokens, block_tokens), pow2_at_least(append, block_tokens)
  rng = np.random.default_rng(seed)
  tokens = place(rng.integers(0, config.vocab_size, (padded_rows, tn), dtype=np.int32))
  prefix_len = place(np.array([prefix_tokens] * rows + [0] * (padded_rows - rows), np.int32))
  new_len = place(np.array([append] * rows + [1] * (padded_rows - rows), np.int32))
  # Each row's landed read: [L, prefix_tokens, 2, H, D] in host memory of `host_memory`, filled
  # from a random tile (outside the clock).
  row_bytes = layers * prefix_tokens * int(np.prod(kv)) * dtype.itemsize
  tile = rng.standard_normal((1 << 20) + 7).astype(dtype).view(np.uint8)  # layers differ
  landed = []
  for _ in range(rows):
    raw = pinned_memory.allocate(row_bytes, host_memory, device)
    raw[:] = np.resize(tile, row_bytes)
    landed.append(raw.view(dtype).reshape(layers, prefix_tokens, *kv))
  empty = place(jnp.zeros((tp, *kv), dtype))
  host_s: dict[str, float] = {}

  def timed(kind, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    host_s[kind] = host_s.get(kind, 0.0) + time.perf_counter() - t0
    return out

  def issue(layer):
    return [timed("h2d", host_to_device, landed[row][layer], engine, copy=False,
                  staging="direct") for row in range(rows)]

  def assemble(parts):
    if padded_rows == 1:  # the runtime's one-row batch: pad and batch axis in one program
      return timed("pad", _pad_one_row, parts[0], tp, 0)
    padded = [timed("pad", _pad_to, part, tp, 0) for part in parts]
    return timed("stack", jnp.stack, padded + [empty] * (padded_rows - rows))

  resident = None

  def forward(variant):
    host_s.clear()
    x = timed("embed", embed_tokens_jit, model, tokens)
    current = resident[0] if variant == "layers" else assemble(issue(0))
    for l, layer in enumerate(model.layers):
      following = issued = None
      if l + 1 < layers:
        if variant == "layers":
          following = resident[l + 1]
        elif variant == "loads_first":
          following = assemble(issue(l + 1))
        else:
          issued = issue(l + 1)
      x, _ = timed("layer", prefill_layer_jit, layer, x, current, prefix_len, new_len)
      current = assemble(issued) if issued is not None else following
    return timed("logits", last_token_logits_jit, model, x, new_len)

  out, logits = [], {}
  for variant in VARIANTS:
    if variant == "layers":  # the same host bytes, padded and stacked on the host (a reference
      # for the runtime-like load) and placed before the clock
      resident = []
      for l in range(layers):
        stacked = np.zeros((padded_rows, tp, *kv), dtype)
        for row in range(rows):
          stacked[row, :prefix_tokens] = landed[row][l]
        resident.append(place(stacked))
      jax.block_until_ready(resident)
    runs: list[dict] = []

    def cleanup(result, runs=runs):
      runs.append(dict(host_s))
      logits.setdefault(variant, np.asarray(result))

    median_s, times = median_seconds(lambda variant=variant: forward(variant), repeats, warmup,
                                     cleanup=cleanup)
    median_run = runs[warmup + times.index(min(times, key=lambda t: abs(t - median_s)))]
    host_total = sum(median_run.values())
    row = dict(variant=variant, rows=rows, padded_rows=padded_rows, prefix_tokens=prefix_tokens,
               tp=tp, tn=tn, append=append, median_s=median_s, times_s=times,
               host_s=median_run, host_total_s=host_total, host_fraction=host_total / median_s,
               layer_dispatch_ms=1e3 * median_run["layer"] / layers)
    if variant != "layers":
      row.update(h2d_dispatch_ms=1e3 * median_run["h2d"] / (layers * rows),
                 pad_dispatch_ms=1e3 * median_run["pad"] / (layers * rows),
                 stack_dispatch_ms=1e3 * median_run.get("stack", 0.0) / layers)
    out.append(row)
    log(f"pe_layer: rows {rows} prefix {prefix_tokens} (tp {tp}) {variant:8s} "
        f"{median_s * 1e3:8.2f} ms, host {host_total * 1e3:8.2f} ms "
        f"(layer dispatch {row['layer_dispatch_ms']:.3f} ms)")
    if variant == "layers":
      for x in resident:
        x.delete()
      resident = None
  for row in out:
    row["logits_equal"] = bool(np.allclose(logits["layers"].astype(np.float32),
                                           logits[row["variant"]].astype(np.float32),
                                           rtol=1e-3, atol=1e-3))
    if not row["logits_equal"]:
      raise RuntimeError(f"rows {rows}: {row['variant']}'s logits differ from the resident "
                         f"prefix's: the pads or the stack moved the wrong bytes")
  return out


def main(argv):
  del argv
  import jax

  from dualpath_jax.bench.hardware import run_meta
  from dualpath_jax.model.config import get_preset
  from dualpath_jax.transfer import pinned_memory
  rows = _positive_ints("rows", _ROWS.value)
  prefixes = _positive_ints("prefix_tokens", _PREFIX.value)
  if _HOST_MEMORY.value not in pinned_memory.HOST_MEMORY_KINDS:
    sys.exit(f"error: --host_memory: expected one of {list(pinned_memory.HOST_MEMORY_KINDS)}, "
             f"got {_HOST_MEMORY.value!r}")
  for name, flag in (("append", _APPEND), ("repeats", _REPEATS), ("block_tokens", _BLOCK_TOKENS)):
    if flag.value <= 0:
      sys.exit(f"error: --{name}: expected a positive integer, got {flag.value}")
  if _WARMUP.value < 0:
    sys.exit(f"error: --warmup: expected a non-negative integer, got {_WARMUP.value}")
  try:
    config = get_preset(_PRESET.value, dtype=_DTYPE.value, attention=_ATTENTION.value,
                        prefill_kv_splits=_KV_SPLITS.value)
  except (TypeError, ValueError) as e:
    sys.exit(f"error: --preset/--dtype/--attention/--kv_splits: {e}")
  device = jax.devices()[0]
  result = dict(
      meta=dict(run_meta(device), preset=config.name, dtype=config.dtype,
                attention=config.attention, prefill_kv_splits=config.prefill_kv_splits,
                host_memory=_HOST_MEMORY.value,
                repeats=_REPEATS.value, warmup=_WARMUP.value,
                note="host_s: seconds inside each kind of call in the median run (dispatch); "
                     "host_fraction = their sum / the run's wall; no GIL contention, no sends"),
      rows=[])
  for n in rows:
    for prefix in prefixes:
      result["rows"] += measure(device, config, n, prefix, _APPEND.value, _BLOCK_TOKENS.value,
                                _HOST_MEMORY.value, _REPEATS.value, _WARMUP.value, _SEED.value)
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
