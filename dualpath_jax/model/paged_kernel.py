"""The project's own Pallas (Triton) paged decode-attention kernel (ModelConfig.pallas_kernel =
'dualpath'), next to JAX's (jax.experimental.pallas.ops.gpu.paged_attention, 'jax').

Same job, same pool layout ([H, num_pages, page_tokens, D] per layer) and the same blocking
(paged.pallas_blocking: k_splits partitions of a row's pages, pages_per_compute_block pages a
loop iteration) as JAX's kernel, which it follows (Apache-2.0, the JAX authors). What differs:
- a compute block is read as rows of one 2-D [num_pages * page_tokens, D] view (one page: a
  plain [page_tokens, D] tile at a scalar offset) instead of a 3-D gather of its pages reshaped
  to 2-D. This is what pays: on an H200 the kernel alone read 3.3-3.4 TB/s of KV against
  JAX's 1.9-2.0, and ours with JAX's load (`page_gather`, a diagnostic) fell to 1.9-2.1
  (record 10 of docs/perf/gpu_bench.md, scripts/bench_paged_kernel.py);
- a partition's loop has a fixed trip count (masked past the row's length; a partition that
  starts past it is skipped whole) where JAX's runs to the row's last page: no measurable
  difference (JAX's kernel under a compile-time bound ran at the same rate);
- batch rows are a grid axis (JAX's kernel vmaps one row's pallas_call), and a partition's
  partial output stays float32 until the partitions are merged (closer to a float32 reference:
  scripts/check_paged_kernel.py).
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

# Masked scores: finite, so a fully masked block's exp2(m_prev - m_next) stays a number.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
# Triton's dot needs at least 16 rows: a KV head's query heads are padded up to this.
MIN_QUERY_ROWS = 16


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, l_ref, m_ref, *,
            page_tokens: int, pages_per_block: int, blocks: int, page_gather: bool):
  """One (row, KV head, partition): q_ref [G, D] (scaled by log2(e) / sqrt(D)); k_ref, v_ref
  [num_pages * page_tokens, D] ([num_pages, page_tokens, D] under page_gather);
  tables_ref [blocks * pages_per_block]; lengths_ref [1].
  Writes the partition's unnormalised output [G, D], its sum of exp2 [G] and max [G]."""
  rows, head_dim = q_ref.shape
  block_k = pages_per_block * page_tokens
  length = lengths_ref[0]
  start = pl.program_id(2) * blocks * block_k
  offsets = jnp.arange(block_k, dtype=jnp.int32)
  q = q_ref[...]

  def block_rows(i):  # the pool rows of compute block i (a scalar start for one page)
    if pages_per_block == 1:
      return pl.ds(pl.multiple_of(tables_ref[i] * page_tokens, page_tokens), page_tokens)
    pages = tables_ref[pl.ds(i * pages_per_block, pages_per_block)]
    return (pages[:, None] * page_tokens
            + jnp.arange(page_tokens, dtype=jnp.int32)[None, :]).reshape(block_k)

  def load(i):  # compute block i of K and V, [block_k, D] each
    if page_gather:  # JAX's kernel's load: a 3-D gather of the pages, reshaped to 2-D
      pages = tables_ref[pl.ds(i * pages_per_block, pages_per_block)]
      return (k_ref[pages].reshape(block_k, head_dim), v_ref[pages].reshape(block_k, head_dim))
    where = block_rows(i)
    return k_ref[where, :], v_ref[where, :]

  def body(i, carry):
    o, m, l = carry
    k, v = load(i)
    s = plgpu.dot(q, k.T)  # [G, block_k] float32, already in log2 units
    s = jnp.where((start + i * block_k + offsets < length)[None, :], s, _MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp2(s - m_next[:, None])
    correction = jnp.exp2(m - m_next)
    l = correction * l + p.sum(axis=-1)
    o = correction[:, None] * o + plgpu.dot(p.astype(v.dtype), v)
    return o, m_next, l

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  o, m, l = lax.cond(start < length, lambda: lax.fori_loop(0, blocks, body, init),
                     lambda: init)
  o_ref[...] = o
  l_ref[...] = l
  m_ref[...] = m


@functools.partial(jax.jit, static_argnames=("k_splits", "pages_per_compute_block", "num_warps",
                                             "num_stages", "interpret", "page_gather"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *, k_splits: int,
                    pages_per_compute_block: int, num_warps: int = 8, num_stages: int = 2,
                    interpret: bool = False, page_gather: bool = False) -> jax.Array:
  """Attention of one new token per row over its pages: q [B, N, D] -> [B, N, D] (q.dtype).

  k_pages, v_pages [H, num_pages, page_tokens, D]; block_tables [B, P] int32 with P divisible
  by k_splits * pages_per_compute_block (paged.pallas_blocking pads); lengths [B] int32, the
  tokens each row attends to (its first `length` slots). Scores are scaled by D ** -0.5 (JAX's
  kernel leaves that to its caller). A row of length 0 gets zeros. A K/V array must hold under
  2**31 elements (int32 offsets; 65535 pages of 64 tokens at 4 KV heads of 128), as for JAX's.
  page_gather: DIAGNOSTIC, same result: load each compute block as JAX's kernel does (a 3-D
  gather of its pages reshaped to 2-D) instead of as 2-D rows, to measure what that load costs
  (scripts/bench_paged_kernel.py 'dualpath_page_gather'). Decode never sets it.
  """
  batch, num_heads, head_dim = q.shape
  kv_heads, num_pages, page_tokens, _ = k_pages.shape
  if k_pages.shape != v_pages.shape or k_pages.shape[-1] != head_dim or num_heads % kv_heads:
    raise ValueError(f"paged_attention: q {list(q.shape)} does not fit k_pages "
                     f"{list(k_pages.shape)} / v_pages {list(v_pages.shape)}")
  if block_tables.shape[0] != batch or lengths.shape != (batch,):
    raise ValueError(f"paged_attention: block_tables {list(block_tables.shape)} and lengths "
                     f"{list(lengths.shape)} must have q's batch {batch}")
  if k_pages.size >= 2 ** 31:  # Pallas' Triton lowering computes element offsets in int32
    raise ValueError(f"paged_attention: k_pages {list(k_pages.shape)} holds {k_pages.size} "
                     f"elements; the kernel addresses at most 2**31 - 1 (fewer pages a layer)")
  per_split, remainder = divmod(block_tables.shape[1], k_splits)
  if remainder or per_split % pages_per_compute_block:
    raise ValueError(f"paged_attention: {block_tables.shape[1]} pages a row do not split into "
                     f"k_splits={k_splits} partitions of whole compute blocks of "
                     f"{pages_per_compute_block} pages")
  group = num_heads // kv_heads
  rows = max(MIN_QUERY_ROWS, 1 << (group - 1).bit_length())
  scaled = q.astype(jnp.float32) * (head_dim ** -0.5 * _LOG2E)
  scaled = scaled.reshape(batch, kv_heads, group, head_dim).astype(q.dtype)
  scaled = jnp.pad(scaled, [(0, 0), (0, 0), (0, rows - group), (0, 0)])
  tables = block_tables.astype(jnp.int32).reshape(batch, k_splits, per_split)
  if page_gather:  # the pools as they lie, [H, num_pages, page_tokens, D]
    pools = (k_pages, v_pages)
  else:  # [H, num_pages * page_tokens, D]: a bitcast, no copy
    pools = tuple(a.reshape(kv_heads, num_pages * page_tokens, head_dim)
                  for a in (k_pages, v_pages))
  pool_tail = pools[0].shape[1:]
  pool_spec = pl.BlockSpec((None, *pool_tail), lambda b, h, s: (h,) + (0,) * len(pool_tail))
  kernel = functools.partial(_kernel, page_tokens=page_tokens,
                             pages_per_block=pages_per_compute_block,
                             blocks=per_split // pages_per_compute_block, page_gather=page_gather)
  partial_shape = (batch, kv_heads, k_splits, rows)
  o, l, m = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, k_splits),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, s: (b,)),  # lengths
          pl.BlockSpec((None, None, per_split), lambda b, h, s: (b, s, 0)),  # tables
          pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),  # q
          pool_spec, pool_spec],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
      out_shape=[jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"dualpath_paged_attention_{pages_per_compute_block}x{page_tokens}",
  )(lengths.astype(jnp.int32), tables, scaled, *pools)
  # Merge the partitions' partial softmaxes (base 2, as the kernel keeps them).
  o, l, m = o[:, :, :, :group], l[:, :, :, :group], m[:, :, :, :group]
  weight = jnp.exp2(m - m.max(axis=2, keepdims=True))  # [B, H, S, G]
  total = (l * weight).sum(axis=2)
  out = (o * weight[..., None]).sum(axis=2) / jnp.maximum(total, 1e-30)[..., None]
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


@jax.jit
def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, lengths: jax.Array) -> jax.Array:
  """`paged_attention`'s result computed densely in float32 by XLA (each row's pages gathered,
  scores masked past its length, a plain softmax): q [B, N, D] -> [B, N, D] float32."""
  batch, num_heads, head_dim = q.shape
  kv_heads, _, page_tokens, _ = k_pages.shape
  group = num_heads // kv_heads

  def dense(pages):  # [H, num_pages, pt, D] -> [B, H, P * pt, D] float32
    rows = pages[:, block_tables]  # [H, B, P, pt, D]
    return jnp.swapaxes(rows.reshape(kv_heads, batch, -1, head_dim), 0, 1).astype(jnp.float32)

  k, v = dense(k_pages), dense(v_pages)
  q = q.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)
  s = jnp.einsum("bhgd,bhtd->bhgt", q, k) * head_dim ** -0.5
  valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, T]
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  w = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True, initial=-1e30))
  w = jnp.where(valid[:, None, None, :], w, 0.0)
  out = jnp.einsum("bhgt,bhtd->bhgd", w, v) / jnp.maximum(w.sum(-1), 1e-30)[..., None]
  return out.reshape(batch, num_heads, head_dim)
