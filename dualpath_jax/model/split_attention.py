"""Prefill attention in parts merged by their log-sum-exp (flash-decoding's split-KV), no mask.

A prefill row's T new tokens attend to all `prefix_len` tokens of its cached prefix and causally to
each other. The one-call path (transformer.attention over concat(prefix, new)) needs an explicit
[B, T, Tp + T] mask: padding sits between prefix_len and Tp, and the causal part is aligned
bottom-right, which cuDNN's causal mask (top-left) does not express, so cuDNN reads the mask as a
bias tensor. A fused kernel also parallelises over batch x heads x query blocks only: at B = 1,
T = 512 and 28 heads that is 112 blocks of 128 queries for an H100's 132 SMs, each looping over
all 32K prefix keys. Measured (one H100, 32K + 512, docs/perf/gpu_bench.md record 4): the masked
call 33.8% MFU, this path without a split (kv_splits 1) 42.0%, with 4 chunks 44.3%: the bias
cost more than the missing parallelism.

Here the prefix is cut into `kv_splits` chunks that ride the batch axis (each chunk's valid
length is a padding length, no bias), and the new tokens get one causal call of their own (a
square, so top-left causal is right). Each part returns its output and the log-sum-exp of its
scaled scores, and the parts merge exactly:

    out = sum_p exp(lse_p - m) * out_p / sum_p exp(lse_p - m),   m = max_p lse_p

Implementations: 'einsum' (float32 scores; the CPU reference the tests check the merge with) and
'cudnn' (cuDNN flash attention through jax's `jax._src.cudnn.fused_attention_stablehlo`, the one
entry that returns the log-sum-exp in float32; the public jax.nn.dot_product_attention rounds it
to the inputs' dtype: bf16 spaces values near 10 by 0.0625, so a merge weight exp(lse - m)
could be off by up to ~3%; an estimate, not a measurement).
Selected by ModelConfig.prefill_kv_splits > 0 (prefill.prefill_layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualpath_jax.model.config import SPLIT_ATTENTION_IMPLEMENTATIONS


def _einsum_with_lse(q, k, v, q_len, kv_len, causal):
  batch, tokens, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  q = q.reshape(batch, tokens, num_kv_heads, group, head_dim)  # the model's GQA grouping
  scores = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  j = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = j[None, None, :] < kv_len[:, None, None]  # [B, 1, S]
  if causal:
    i = jnp.arange(tokens, dtype=jnp.int32)
    visible = visible & (j[None, None, :] <= i[None, :, None])  # [B, T, S]
  visible = jnp.broadcast_to(visible, (batch, tokens, k.shape[1]))[:, None, None]
  scores = jnp.where(visible, scores, -jnp.inf)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(scores - peak)  # 0 where masked
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bhgts,bshd->bthgd", weights, v.astype(jnp.float32))
  out = out / jnp.moveaxis(jnp.where(total > 0, total, 1.0), -2, 1).reshape(
      batch, tokens, num_kv_heads, group, 1)
  lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  lse = jnp.moveaxis(lse[..., 0], -1, 1).reshape(batch, tokens, num_heads)  # [B, T, N]
  return out.reshape(batch, tokens, num_heads, head_dim), lse


def _cudnn_with_lse(q, k, v, q_len, kv_len, causal):
  try:
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
  except ImportError as e:  # a jax without this module: say which entry point is missing
    raise NotImplementedError(
        "split prefill attention 'cudnn' needs jax._src.cudnn.fused_attention_stablehlo."
        f"dot_product_attention (return_residual=True), missing in jax {jax.__version__}: {e}"
    ) from None
  out, stats = cudnn_attention(
      q, k, v, q_seqlen=q_len, kv_seqlen=kv_len, scale=q.shape[-1] ** -0.5,
      mask_type=MaskType.PADDING_CAUSAL if causal else MaskType.PADDING, qkv_layout="BTNH",
      return_residual=True)
  return out.astype(jnp.float32), jnp.transpose(stats, (0, 2, 1))  # cuDNN's stats are [B, N, T]


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array,
                       kv_len: jax.Array, *, causal: bool, implementation: str
                       ) -> tuple[jax.Array, jax.Array]:
  """Attention of T queries over S keys with its log-sum-exp; padding by lengths only.

  q [B, T, N, D]; k, v [B, S, H, D] (query head n uses kv head n // (N / H)); q_len, kv_len [B]
  int32. Query i of row b sees key j iff j < kv_len[b] (and j <= i if causal); rows i >= q_len[b]
  are padding (their values are unspecified, as are those of rows with no visible key).
  Returns (out [B, T, N, D] float32, lse [B, T, N] float32, natural log of the scaled scores).
  """
  if implementation not in SPLIT_ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"split attention: implementation must be one of "
                     f"{SPLIT_ATTENTION_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  fn = _cudnn_with_lse if implementation == "cudnn" else _einsum_with_lse
  return fn(q, k, v, q_len.astype(jnp.int32), kv_len.astype(jnp.int32), causal)


def merge(outs: jax.Array, lses: jax.Array) -> jax.Array:
  """outs [B, P, T, N, D], lses [B, P, T, N] (-inf = a part with nothing to say) -> [B, T, N, D]
  float32: the attention over all parts' keys. A row whose parts are all -inf gets zeros."""
  peak = jnp.max(lses, axis=1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.where(jnp.isfinite(lses), jnp.exp(lses - peak), 0.0)  # [B, P, T, N]
  total = jnp.sum(weights, axis=1)
  outs = jnp.where(jnp.isfinite(lses)[..., None], outs, 0.0)  # padding parts may hold NaN
  out = jnp.sum(weights[..., None] * outs, axis=1)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def prefill_attention(q: jax.Array, prefix_kv: jax.Array, new_kv: jax.Array,
                      prefix_len: jax.Array, new_len: jax.Array, *, kv_splits: int,
                      implementation: str) -> jax.Array:
  """What prefill.prefill_mask + transformer.attention compute, in 1 + kv_splits parts.

  q [B, T, N, D]; prefix_kv [B, Tp, 2, H, D] (Tp may be 0); new_kv [B, T, 2, H, D]; prefix_len,
  new_len [B] int32. New token i sees prefix slots j < prefix_len and new tokens j <= i with
  j < new_len. Returns [B, T, N, D] in q's dtype; padding rows (i >= new_len) are finite.
  """
  if kv_splits <= 0:
    raise ValueError(f"split attention: kv_splits must be positive, got {kv_splits}")
  batch, tokens = q.shape[:2]
  prefix_len = prefix_len.astype(jnp.int32)
  new_len = new_len.astype(jnp.int32)
  out, lse = attention_with_lse(q, new_kv[:, :, 0], new_kv[:, :, 1], new_len, new_len,
                                causal=True, implementation=implementation)
  lse = jnp.where((jnp.arange(tokens) < new_len[:, None])[..., None], lse, -jnp.inf)
  outs, lses = [out[:, None]], [lse[:, None]]
  prefix_tokens = prefix_kv.shape[1]
  if prefix_tokens:
    splits = min(kv_splits, prefix_tokens)
    chunk = -(-prefix_tokens // splits)
    if splits * chunk != prefix_tokens:
      prefix_kv = jnp.pad(prefix_kv, [(0, 0), (0, splits * chunk - prefix_tokens)]
                          + [(0, 0)] * 3)
    chunks = prefix_kv.astype(new_kv.dtype).reshape(batch * splits, chunk, *prefix_kv.shape[2:])
    starts = jnp.arange(splits, dtype=jnp.int32) * chunk
    lengths = jnp.clip(prefix_len[:, None] - starts[None, :], 0, chunk).reshape(-1)
    # A chunk past the row's prefix is computed over one (ignored) key and dropped by -inf.
    out, lse = attention_with_lse(
        jnp.repeat(q, splits, axis=0), chunks[:, :, 0], chunks[:, :, 1],
        jnp.repeat(new_len, splits), jnp.maximum(lengths, 1), causal=False,
        implementation=implementation)
    lse = jnp.where((lengths > 0)[:, None, None], lse, -jnp.inf)
    outs.append(out.reshape(batch, splits, *out.shape[1:]))
    lses.append(lse.reshape(batch, splits, *lse.shape[1:]))
  return merge(jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)).astype(q.dtype)
