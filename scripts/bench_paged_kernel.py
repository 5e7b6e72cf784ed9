"""The paged decode-attention kernels alone: KV read rate per kernel and blocking, and two
diagnostic variants that each change one thing (JAX's loop bound; our block load).

One jitted program calls the kernel `--calls` times (one per layer of a decode step, each with
its own query) on one layer's pool of `--batch` rows of `--context` + 1 tokens in random pages,
so that dispatch does not count; reported per call: median seconds and the KV read rate
(batch * tokens * K and V bytes a token / seconds). Points, as KERNEL:k_splits,block_tokens:

  dualpath        model/paged_kernel.py (ModelConfig.pallas_kernel 'dualpath')
  jax             JAX's kernel as decode runs it (lengths given: its page loop runs to each
                  row's last page, a bound read at run time)
  jax_fixed_trip  DIAGNOSTIC: JAX's kernel with lengths=None, so its loop runs over every page
                  of the partition, a bound known at compile time, and nothing is masked. Every
                  row here fills its pages but the last (context + 1 tokens), so it reads what
                  'jax' reads; its output is not attention over the rows' lengths and is not used.
  dualpath_page_gather  DIAGNOSTIC: ours loading each compute block as JAX's kernel does (a 3-D
                  gather of its pages reshaped to 2-D; paged_kernel.paged_attention page_gather),
                  the same result as 'dualpath'.

  PYTHONPATH=. python3 scripts/bench_paged_kernel.py --out /tmp/paged_kernel_bench.json
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dualpath_jax.bench.timing import median_seconds
from dualpath_jax.model import get_preset, paged

_OUT = flags.DEFINE_string("out", "", "write the results as JSON here ('' = print only)")
_PRESET = flags.DEFINE_string("preset", "qwen2.5-7b", "model preset whose head geometry is used")
_BATCH = flags.DEFINE_integer("batch", 32, "rows")
_CONTEXT = flags.DEFINE_integer("context", 8192, "tokens a row holds before the new one")
_PAGE_TOKENS = flags.DEFINE_integer("page_tokens", 64, "tokens a page")
_CALLS = flags.DEFINE_integer("calls", 28, "kernel calls in one timed program")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed runs (median reported)")
_POINTS = flags.DEFINE_string(
    "points", "jax:16,128;jax_fixed_trip:16,128;dualpath:16,128;jax:16,64;jax_fixed_trip:16,64;"
    "dualpath:16,64", "KERNEL:k_splits,block_tokens;... (see the module doc)")

KERNELS = ("dualpath", "jax", "jax_fixed_trip", "dualpath_page_gather")
DIAGNOSTICS = {
    "jax_fixed_trip": "lengths=None: fixed trip count, nothing masked; output not attention",
    "dualpath_page_gather": "ours with JAX's kernel's block load (3-D page gather, reshaped)"}


def _parse_points(text: str) -> list[tuple[str, int, int]]:
  points = []
  for item in filter(None, text.split(";")):
    try:
      kernel, blocking = item.split(":")
      k_splits, block_tokens = (int(x) for x in blocking.split(","))
    except ValueError:
      raise ValueError(f"--points: expected KERNEL:k_splits,block_tokens, got {item!r}") from None
    if kernel not in KERNELS:
      raise ValueError(f"--points: kernel must be one of {KERNELS}, got {kernel!r} in {item!r}")
    points.append((kernel, k_splits, block_tokens))
  return points


def _program(config, kernel: str):
  """jit(qs, k, v, tables, lengths) -> the kernel over qs [calls, B, N, D], one call each."""
  if kernel in DIAGNOSTICS:
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_kernel

    from dualpath_jax.model import paged_kernel

    def attend(q, k, v, tables, lengths):
      tables, kernel_args = paged.pallas_kernel_args(tables, k.shape[2], config)
      if kernel == "jax_fixed_trip":
        return jax_kernel.paged_attention(q, k, v, tables, None, **kernel_args)
      return paged_kernel.paged_attention(q, k, v, tables, lengths, page_gather=True,
                                          **kernel_args)
  else:
    point = config.replace(pallas_kernel=kernel)

    def attend(q, k, v, tables, lengths):
      return paged._pallas_attention(q, k, v, tables, lengths, point)

  @jax.jit
  def run(qs, k, v, tables, lengths):
    return jnp.stack([attend(qs[i], k, v, tables, lengths) for i in range(qs.shape[0])])
  return run


def main(argv) -> None:
  del argv
  try:
    points = _parse_points(_POINTS.value)
    config = get_preset(_PRESET.value, dtype="bfloat16", paged_attention="pallas")
    for _, k_splits, block_tokens in points:
      config.replace(pallas_k_splits=k_splits, pallas_block_tokens=block_tokens)
  except ValueError as e:
    sys.exit(f"error: {e}")
  batch, context, page = _BATCH.value, _CONTEXT.value, _PAGE_TOKENS.value
  tokens = context + 1
  pages_per_row = -(-tokens // page)
  rng = np.random.default_rng(0)
  tables = jnp.asarray(1 + rng.permutation(batch * pages_per_row).reshape(batch, pages_per_row),
                       jnp.int32)
  lengths = jnp.full((batch,), tokens, jnp.int32)
  shape = (config.num_kv_heads, 1 + batch * pages_per_row, page, config.head_dim)
  keys = jax.random.split(jax.random.key(0), 3)
  k = jax.random.normal(keys[0], shape, config.jnp_dtype)
  v = jax.random.normal(keys[1], shape, config.jnp_dtype)
  qs = jax.random.normal(keys[2], (_CALLS.value, batch, config.num_heads, config.head_dim),
                         config.jnp_dtype)
  kv_bytes = batch * tokens * 2 * config.num_kv_heads * config.head_dim * k.dtype.itemsize
  rows = []
  for kernel, k_splits, block_tokens in points:
    point = config.replace(pallas_k_splits=k_splits, pallas_block_tokens=block_tokens)
    run = _program(point, kernel)
    start = time.perf_counter()
    jax.block_until_ready(run(qs, k, v, tables, lengths))
    compile_s = time.perf_counter() - start
    seconds, times = median_seconds(lambda: run(qs, k, v, tables, lengths), _REPEATS.value, 1)
    per_call = seconds / _CALLS.value
    row = dict(kernel=kernel, k_splits=k_splits, block_tokens=block_tokens,
               blocking=paged.pallas_blocking(pages_per_row, page, max_k_splits=k_splits,
                                              block_tokens=block_tokens),
               per_call_s=per_call, kv_read_gbps=kv_bytes / per_call / 1e9,
               program_s=times, first_call_s=compile_s)
    if kernel in DIAGNOSTICS:
      row["diagnostic"] = DIAGNOSTICS[kernel]
    rows.append(row)
    print(f"{kernel:20s} k_splits {k_splits:3d} block_tokens {block_tokens:4d}: "
          f"{per_call * 1e6:8.1f} us a call, KV read {row['kv_read_gbps']:7.1f} GB/s")
  result = dict(device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), preset=_PRESET.value, batch=batch,
                context=context, page_tokens=page, calls=_CALLS.value, repeats=_REPEATS.value,
                kv_bytes_a_call=kv_bytes, rows=rows, command=" ".join(sys.argv))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
