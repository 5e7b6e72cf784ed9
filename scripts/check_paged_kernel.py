"""Checks the Pallas paged decode-attention kernels on this machine's device against a dense
float32 reference (paged_kernel.paged_attention_reference), at the Qwen2.5-7B geometry in bf16.

Rows of lengths 0, 1, a page less one, a page, a page plus one, and up to 8K + 1, pages in random
order, tail table entries on SCRATCH_PAGE (as the DEs pass them): what a decode batch holds. Each
kernel ('dualpath' under several blockings, 'jax' under its default) is compared with the
reference and with the other; the error is the largest absolute difference over the rows that
have tokens (a row of length 0 must give zeros from ours). On a CPU the kernels run in Pallas
interpret mode (slow; use --batch 2 --max_context 512 for a smoke run).

  python scripts/check_paged_kernel.py --out /tmp/paged_kernel_check.json

Exits 1 where an error is above --tolerance (bf16 inputs and output: a few 1e-3 is expected).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dualpath_jax.model import get_preset, paged, paged_kernel

_OUT = flags.DEFINE_string("out", "", "write the results as JSON here ('' = print only)")
_PRESET = flags.DEFINE_string("preset", "qwen2.5-7b", "model preset whose head geometry is used")
_PAGE_TOKENS = flags.DEFINE_integer("page_tokens", 64, "tokens a page")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", 8193, "the longest row's tokens")
_BATCH = flags.DEFINE_integer("batch", 12, "rows (lengths cycle through the list in the doc)")
_BLOCKINGS = flags.DEFINE_string(
    "blockings", "16,128;16,64;32,128;8,256;1,64",
    "'dualpath' blockings to check, 'k_splits,block_tokens;...' (paged.pallas_blocking)")
_TOLERANCE = flags.DEFINE_float("tolerance", 2e-2, "largest allowed absolute error")
_SEED = flags.DEFINE_integer("seed", 0, "random data seed")


def _inputs(config, batch: int, max_context: int, page_tokens: int, seed: int):
  rng = np.random.default_rng(seed)
  page = page_tokens
  lengths = [0, 1, page - 1, page, page + 1, max_context, max_context // 2 + 7, 3 * page + 5]
  lengths = np.array([min(lengths[i % len(lengths)], max_context) for i in range(batch)],
                     np.int32)
  pages_per_row = -(-max_context // page)
  num_pages = 1 + int(sum(-(-int(n) // page) for n in lengths))
  order = rng.permutation(np.arange(1, num_pages))
  tables = np.full((batch, pages_per_row), paged.SCRATCH_PAGE, np.int32)
  used = 0
  for b, n in enumerate(lengths):
    count = -(-int(n) // page)
    tables[b, :count] = order[used:used + count]
    used += count
  shape = (config.num_kv_heads, num_pages, page, config.head_dim)
  dtype = config.jnp_dtype
  k = jnp.asarray(rng.normal(size=shape), dtype)
  v = jnp.asarray(rng.normal(size=shape), dtype)
  q = jnp.asarray(rng.normal(size=(batch, config.num_heads, config.head_dim)), dtype)
  return q, k, v, jnp.asarray(tables), jnp.asarray(lengths)


def _run(config, q, k, v, tables, lengths) -> np.ndarray:
  """paged._pallas_attention under `config` (as decode_step calls it), as float32 numpy."""
  fn = jax.jit(lambda *a: paged._pallas_attention(*a, config))
  return np.asarray(fn(q, k, v, tables, lengths).astype(jnp.float32))


def main(argv) -> None:
  del argv
  try:
    config = get_preset(_PRESET.value, dtype="bfloat16", paged_attention="pallas")
    points = [("jax", 16, 128)]
    for item in filter(None, _BLOCKINGS.value.split(";")):
      try:
        k_splits, block_tokens = (int(x) for x in item.split(","))
      except ValueError:
        raise ValueError(f"--blockings: expected k_splits,block_tokens, got {item!r}") from None
      config.replace(pallas_k_splits=k_splits, pallas_block_tokens=block_tokens)
      points.append(("dualpath", k_splits, block_tokens))
    for flag in (_PAGE_TOKENS, _MAX_CONTEXT, _BATCH):
      if flag.value <= 0:
        raise ValueError(f"--{flag.name} must be positive, got {flag.value}")
  except ValueError as e:
    sys.exit(f"error: {e}")
  q, k, v, tables, lengths = _inputs(config, _BATCH.value, _MAX_CONTEXT.value,
                                     _PAGE_TOKENS.value, _SEED.value)
  has_tokens = np.asarray(lengths) > 0
  want = np.asarray(paged_kernel.paged_attention_reference(q, k, v, tables, lengths))
  rows, outputs, failed = [], {}, False
  for kernel, k_splits, block_tokens in points:
    point = config.replace(pallas_kernel=kernel, pallas_k_splits=k_splits,
                           pallas_block_tokens=block_tokens)
    start = time.perf_counter()
    got = _run(point, q, k, v, tables, lengths)
    seconds = time.perf_counter() - start
    name = f"{kernel} k_splits {k_splits} block_tokens {block_tokens}"
    outputs[name] = got
    error = float(np.abs(got[has_tokens] - want[has_tokens]).max())
    row = dict(kernel=kernel, k_splits=k_splits, block_tokens=block_tokens,
               blocking=paged.pallas_blocking(tables.shape[1], _PAGE_TOKENS.value,
                                              max_k_splits=k_splits, block_tokens=block_tokens),
               max_abs_error_vs_reference=error, finite=bool(np.isfinite(got).all()),
               first_call_s=seconds)
    if kernel == "dualpath":
      row["empty_rows_zero"] = bool(not got[~has_tokens].any())
    ok = error <= _TOLERANCE.value and row["finite"] and row.get("empty_rows_zero", True)
    failed |= not ok
    rows.append(row)
    print(f"{name:40s} max |err| vs reference {error:.2e}  {'ok' if ok else 'FAILED'}")
  jax_out = outputs[next(iter(outputs))]
  for row, (name, got) in zip(rows[1:], list(outputs.items())[1:]):
    row["max_abs_diff_vs_jax_kernel"] = float(np.abs(got[has_tokens] - jax_out[has_tokens]).max())
  result = dict(device=str(jax.devices()[0]), device_kind=jax.devices()[0].device_kind,
                jax=jax.__version__, date=time.strftime("%Y-%m-%d"), preset=_PRESET.value,
                page_tokens=_PAGE_TOKENS.value, lengths=np.asarray(lengths).tolist(),
                tolerance=_TOLERANCE.value, rows=rows, passed=not failed,
                command=" ".join(sys.argv))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
