"""A Qwen2-style decoder-only transformer in Flax NNX, with the cache passed in and out.

Each `DecoderLayer` takes the KV it attends to as an argument (`context_kv`) and returns the KV of
its own tokens (`new_kv`), so one code path serves a full forward pass, prefill on top of a cached
prefix (prefill.py) and paged decode (paged.py); where the KV lives is the caller's business. A
caller with its own attention (paged decode by the Pallas kernel) calls the layer's two halves
around it: `project_qkv` (norm, projections, RoPE) and `output_and_mlp`.

Cached K is stored after RoPE (as Hugging Face does), so cached KV is position-bound: token j of a
sequence always sits at absolute position j.

Shapes: B batch, T new tokens, S context tokens, N query heads, H kv heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dualpath_jax.model import split_attention
from dualpath_jax.model.config import ModelConfig


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention: x [B, T, heads, D], positions [B, T] int."""
  head_dim = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  # Rotate in float32: bf16 angles lose the absolute position beyond a few hundred tokens.
  x32 = x.astype(jnp.float32)
  half = head_dim // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention(q: jax.Array, kv: jax.Array, mask: jax.Array, implementation: str = "einsum"
              ) -> jax.Array:
  """GQA attention: the einsum reference, or jax.nn.dot_product_attention ('xla', 'cudnn').

  q [B, T, N, D]; kv [B, S, 2, H, D] (0 = K, 1 = V); mask [B, T, S] bool (True = may attend).
  Returns [B, T, N, D] in q's dtype. Einsum: a row with nothing to attend to gets a uniform
  average instead of NaN (its scores are all the same finite minimum), which keeps padding rows
  finite; prefill never builds such rows (a padding row still sees its first token).
  """
  if implementation != "einsum":
    # Query head n uses kv head n // (N / H): the same grouping as below.
    out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask=mask[:, None],
                                       implementation=implementation)
    return out.astype(q.dtype)
  batch, tokens, num_heads, head_dim = q.shape
  num_kv_heads = kv.shape[3]
  group = num_heads // num_kv_heads
  # Query heads h*group .. h*group+group-1 share kv head h (the Hugging Face GQA order).
  q = q.reshape(batch, tokens, num_kv_heads, group, head_dim)
  keys, values = kv[:, :, 0], kv[:, :, 1]  # [B, S, H, D] each
  scores = jnp.einsum("bthgd,bshd->bhgts", q, keys, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)  # [B, H, G, T, S]
  out = jnp.einsum("bhgts,bshd->bthgd", probs, values, preferred_element_type=jnp.float32)
  return out.reshape(batch, tokens, num_heads, head_dim).astype(q.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, returned in the parameter dtype."""

  def __init__(self, features: int, *, eps: float, dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.scale[...].dtype)


def _linear(in_features: int, out_features: int, *, bias: bool, dtype, std: float, rngs):
  return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    kernel_init=nnx.initializers.normal(std), rngs=rngs)


class DecoderLayer(nnx.Module):
  """RMSNorm -> GQA attention (RoPE) -> residual; RMSNorm -> SwiGLU MLP -> residual."""

  def __init__(self, config: ModelConfig, *, init_std: float, rngs: nnx.Rngs):
    self.config = config
    c, dtype = config, config.jnp_dtype
    kw = dict(dtype=dtype, std=init_std, rngs=rngs)
    self.input_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
    self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, **kw)
    self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, **kw)
    self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, **kw)
    self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, bias=False, **kw)
    self.post_attention_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, bias=False, **kw)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, bias=False, **kw)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, bias=False, **kw)

  def project_qkv(self, x: jax.Array, positions: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention inputs of T new tokens: input norm, q/k/v projections, RoPE on q and k.

    x [B, T, hidden]; positions [B, T] int32 (absolute).
    Returns (q [B, T, N, D], k [B, T, H, D], v [B, T, H, D]) in the model dtype.
    """
    c = self.config
    batch, tokens, _ = x.shape
    h = self.input_norm(x)
    q = self.q_proj(h).reshape(batch, tokens, c.num_heads, c.head_dim)
    k = self.k_proj(h).reshape(batch, tokens, c.num_kv_heads, c.head_dim)
    v = self.v_proj(h).reshape(batch, tokens, c.num_kv_heads, c.head_dim)
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

  def output_and_mlp(self, x: jax.Array, attn: jax.Array) -> jax.Array:
    """The rest of the layer after attention: o_proj + residual, then the MLP block + residual.

    x [B, T, hidden] (the layer's input); attn [B, T, N * D] (attention output, heads flattened).
    Returns x_out [B, T, hidden].
    """
    x = x + self.o_proj(attn)
    h = self.post_attention_norm(x)
    return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))

  def __call__(self, x: jax.Array, positions: jax.Array, context_kv: jax.Array,
               mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer over T new tokens that attend to S context tokens and to each other.

    x [B, T, hidden]; positions [B, T] int32 (absolute); context_kv [B, S, 2, H, D] (S may be 0);
    mask [B, T, S + T] bool over the keys concat(context, new).
    Returns (x_out [B, T, hidden], new_kv [B, T, 2, H, D]).
    """
    c = self.config
    batch, tokens, _ = x.shape
    q, k, v = self.project_qkv(x, positions)
    new_kv = jnp.stack([k, v], axis=2)  # [B, T, 2, H, D]
    keys_values = jnp.concatenate([context_kv.astype(new_kv.dtype), new_kv], axis=1)
    attn = attention(q, keys_values, mask, c.attention).reshape(batch, tokens, c.num_heads * c.head_dim)
    return self.output_and_mlp(x, attn), new_kv

  def prefill_split(self, x: jax.Array, positions: jax.Array, prefix_kv: jax.Array,
                    prefix_len: jax.Array, new_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`__call__` for prefill without a mask: split_attention.prefill_attention in
    config.prefill_kv_splits prefix chunks plus the new tokens. prefix_kv [B, Tp, 2, H, D];
    prefix_len, new_len [B] int32. Returns (x_out [B, T, hidden], new_kv [B, T, 2, H, D])."""
    c = self.config
    batch, tokens, _ = x.shape
    q, k, v = self.project_qkv(x, positions)
    new_kv = jnp.stack([k, v], axis=2)  # [B, T, 2, H, D]
    attn = split_attention.prefill_attention(
        q, prefix_kv, new_kv, prefix_len, new_len, kv_splits=c.prefill_kv_splits,
        implementation=c.attention)
    return self.output_and_mlp(x, attn.reshape(batch, tokens, c.num_heads * c.head_dim)), new_kv


class Transformer(nnx.Module):
  """Token embedding, `num_layers` DecoderLayers, final RMSNorm, untied lm_head.

  Parameters and activations are in `config.dtype`; weights ~ normal(init_std), deterministic in
  the seed of `rngs`. Calling the module runs a plain causal forward pass (the reference that
  cached prefill and paged decode are tested against).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, init_std: float = 0.02):
    if not isinstance(config, ModelConfig):
      raise ValueError(f"Transformer: config must be a ModelConfig, got {type(config).__name__}")
    if not init_std > 0:
      raise ValueError(f"Transformer: init_std must be positive, got {init_std!r}")
    self.config = config
    dtype = config.jnp_dtype
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                           embedding_init=nnx.initializers.normal(init_std), rngs=rngs)
    self.layers = nnx.List(
        [DecoderLayer(config, init_std=init_std, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
    self.lm_head = _linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                           std=init_std, rngs=rngs)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm + lm_head: x [..., hidden] -> logits [..., vocab] float32."""
    h = self.final_norm(x)
    # Accumulate in float32 so that bf16 models give float32 logits without a bf16 rounding step.
    return jnp.einsum("...e,ev->...v", h, self.lm_head.kernel[...],
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Causal forward pass without cache: tokens [B, T] int32 -> logits [B, T, vocab] float32."""
    batch, length = tokens.shape
    c = self.config
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = jnp.broadcast_to(causal, (batch, length, length))
    empty = jnp.zeros((batch, 0, 2, c.num_kv_heads, c.head_dim), c.jnp_dtype)
    x = self.embed(tokens)
    for layer in self.layers:
      x, _ = layer(x, positions, empty, mask)
    return self.logits(x)
