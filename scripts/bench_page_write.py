r"""The DE's admission page write and turn-end page read, alone on one device, with variants.

An admission writes a landed prompt's KV [L, T, 2, H, D] into its pages of the decode pool
(paged.write_kv_to_pages: per layer, K and V transposed to [H, n, page_tokens, D] and scattered
into the pool's pages); a finishing turn's new blocks are read back (paged.read_kv_from_pages).
On an H200 the decode steps right behind a 16K-token admission took +45% (docs/perf/gpu_bench.md
record 11). This times, each as the median of --repeats calls with outputs ready:

  scatter          paged.write_kv_to_pages (the runtime's; its scatters are told their page ids
                   are unique, XLA's unique_indices, since 2026-11-29)
  scatter_not_unique  the same scatters without unique_indices: the runtime's up to 2026-11-29
  transpose_only   the per-layer transposes alone, no scatter (A DIAGNOSTIC)
  transpose_then_scatter  the transposes as one program, then 'scatter_not_unique''s scatters of
                   their materialized outputs as another (A DIAGNOSTIC)
  copy             one device copy of the prompt's KV bytes: the HBM floor of any write
  read             paged.read_kv_from_pages of --read_tokens tokens (the persist's read)

and checks that each write put the prompt's KV into its pages. Writes JSON.

  python scripts/bench_page_write.py --out=/tmp/page_write.json
  python scripts/bench_page_write.py --preset=tiny --pool_tokens=4096 --tokens=512 \
      --read_tokens=128 --out=/tmp/page_write.json   # CPU
"""

import json
import os
import sys
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "qwen2.5-7b", "Model preset (KV geometry).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "KV dtype.")
_POOL_TOKENS = flags.DEFINE_integer("pool_tokens", 32 * 8192,
                                    "Tokens the pool holds (its size, as the DE's pool).")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Prompt tokens an admission writes.")
_READ_TOKENS = flags.DEFINE_integer("read_tokens", 1024, "Tokens a turn-end read reads.")
_PAGE_TOKENS = flags.DEFINE_integer("page_tokens", 64, "Tokens a page.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per variant.")
_OUT = flags.DEFINE_string("out", None, "Output JSON.", required=True)

VARIANTS = ("scatter", "scatter_not_unique", "transpose_only", "transpose_then_scatter", "copy",
            "read")


def main(argv):
  del argv
  for name in ("pool_tokens", "tokens", "read_tokens", "page_tokens", "repeats"):
    if getattr(flags.FLAGS, name) <= 0:
      sys.exit(f"error: --{name}: expected a positive int, got {getattr(flags.FLAGS, name)}")
  if _TOKENS.value + _READ_TOKENS.value > _POOL_TOKENS.value:
    sys.exit("error: --tokens plus --read_tokens must fit --pool_tokens")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dualpath_jax.model import get_preset, paged

  try:
    config = get_preset(_PRESET.value, dtype=_DTYPE.value)
  except ValueError as e:
    sys.exit(f"error: --preset / --dtype: {e}")
  pt = _PAGE_TOKENS.value
  num_pages = 1 + -(-_POOL_TOKENS.value // pt)
  n = -(-_TOKENS.value // pt)
  key = jax.random.key(0)
  shape = (config.num_kv_heads, num_pages, pt, config.head_dim)
  pool = paged.PagedPool(
      k=tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.num_layers)),
      v=tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.num_layers)))
  kv = jax.random.normal(key, (config.num_layers, n * pt, 2, config.num_kv_heads,
                               config.head_dim), jnp.float32).astype(config.jnp_dtype)
  # The admission's pages: a random choice of the pool's (not the scratch page), as a PageTable
  # hands them out after some turns; the read's pages: others.
  rng = np.random.default_rng(0)
  chosen = 1 + rng.permutation(num_pages - 1)
  page_ids = jnp.asarray(chosen[:n], jnp.int32)
  read_ids = jnp.asarray(chosen[n:n + -(-_READ_TOKENS.value // pt)], jnp.int32)

  def scatter_not_unique(pages, kv, ids):
    new_k, new_v = [], []
    for layer in range(pages.num_layers):
      k, v = paged._layer_kv_to_pages(kv[layer], ids.shape[0])  # noqa: SLF001
      new_k.append(pages.k[layer].at[:, ids].set(k))
      new_v.append(pages.v[layer].at[:, ids].set(v))
    return paged.PagedPool(k=tuple(new_k), v=tuple(new_v))

  def transposes(kv, ids):
    return [paged._layer_kv_to_pages(kv[layer], ids.shape[0])  # noqa: SLF001
            for layer in range(kv.shape[0])]

  def scatter_only(pages, transposed, ids):
    return paged.PagedPool(k=tuple(p.at[:, ids].set(k) for p, (k, _) in zip(pages.k, transposed)),
                           v=tuple(p.at[:, ids].set(v) for p, (_, v) in zip(pages.v, transposed)))

  state = {"pool": pool}
  scatter_only_jit = jax.jit(scatter_only, donate_argnums=0)
  not_unique_jit = jax.jit(scatter_not_unique, donate_argnums=0)
  transpose_jit = jax.jit(transposes)
  copy_jit = jax.jit(lambda x: x + jnp.zeros((), x.dtype))

  def run(variant):
    if variant == "scatter":
      state["pool"] = paged.write_kv_to_pages(state["pool"], kv, page_ids)
      return state["pool"]
    if variant == "scatter_not_unique":
      state["pool"] = not_unique_jit(state["pool"], kv, page_ids)
      return state["pool"]
    if variant == "transpose_only":
      return transpose_jit(kv, page_ids)
    if variant == "transpose_then_scatter":
      state["pool"] = scatter_only_jit(state["pool"], transpose_jit(kv, page_ids), page_ids)
      return state["pool"]
    if variant == "copy":
      return copy_jit(kv)
    return paged.read_kv_from_pages(state["pool"], read_ids, _READ_TOKENS.value)

  kv_bytes = kv.nbytes
  read_bytes = config.num_layers * _READ_TOKENS.value * 2 * config.num_kv_heads * \
      config.head_dim * kv.dtype.itemsize
  rows = []
  expected = np.asarray(kv[:, :_TOKENS.value])
  for variant in VARIANTS:
    jax.block_until_ready(run(variant))  # compiles
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(run(variant))
      times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    moved = read_bytes if variant == "read" else kv_bytes
    row = dict(variant=variant, median_s=median, min_s=float(min(times)), bytes=moved,
               gbps=moved / median / 1e9)
    if "scatter" in variant:  # outside the clock: the pages hold the prompt
      got = np.asarray(paged.read_kv_from_pages(state["pool"], page_ids, _TOKENS.value))
      row["pages_hold_kv"] = bool(np.array_equal(got.view(np.uint8), expected.view(np.uint8)))
      state["pool"] = paged.write_kv_to_pages(  # zero them again for the next variant
          state["pool"], jnp.zeros_like(kv), page_ids)
    rows.append(row)
    print(f"{variant:15s} {median * 1e3:8.3f} ms  {row['gbps']:8.1f} GB/s"
          + (f"  pages hold the KV: {row['pages_hold_kv']}" if "pages_hold_kv" in row else ""),
          file=sys.stderr, flush=True)
  device = jax.devices()[0]
  result = dict(device=str(device), device_kind=device.device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv),
                preset=config.name, dtype=config.dtype, pool_tokens=_POOL_TOKENS.value,
                pool_bytes=pool.nbytes, tokens=_TOKENS.value, read_tokens=_READ_TOKENS.value,
                page_tokens=pt, repeats=_REPEATS.value, rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  if not all(r.get("pages_hold_kv", True) for r in rows):
    sys.exit("error: a page write left different bytes in the pages")


if __name__ == "__main__":
  app.run(main)
