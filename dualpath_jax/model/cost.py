"""Analytic sizes and FLOPs of a ModelConfig, for scheduling (compute quotas) and the simulator.

FLOPs count a multiply-add as 2. Attention counts QK^T and PV (4 * num_heads * head_dim FLOPs per
query-key pair per layer); norms, RoPE, softmax and activations are ignored (well under 1%).
"""

from __future__ import annotations

from dualpath_jax.model.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig) -> int:
  """K and V bytes of one token over all layers: 2 * L * H * D * itemsize."""
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * config.itemsize


def layer_matmul_params(config: ModelConfig) -> int:
  """Weights of one layer's matmuls (q, k, v, o, gate, up, down); no biases or norms."""
  c = config
  attention = c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  return attention + 3 * c.hidden_size * c.intermediate_size


def param_count(config: ModelConfig) -> int:
  """All parameters of transformer.Transformer (embedding and untied lm_head included)."""
  c = config
  qkv_bias = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim if c.qkv_bias else 0
  per_layer = layer_matmul_params(c) + qkv_bias + 2 * c.hidden_size  # + two RMSNorm scales
  return 2 * c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size


def prefill_flops(config: ModelConfig, cached_tokens: int, new_tokens: int, *,
                  last_token_logits_only: bool = False) -> float:
  """FLOPs to prefill `new_tokens` on top of `cached_tokens` cached ones.

  2 * layer matmul params * L * new, plus lm_head 2 * hidden * vocab for every new token (or only
  the last one with last_token_logits_only, as prefill(..., all_logits=False) computes), plus
  causal attention: new token i sees cached + i + 1 keys, cached + (new + 1) / 2 on average.
  """
  if cached_tokens < 0 or new_tokens < 0:
    raise ValueError(f"prefill_flops: token counts must be >= 0, got cached_tokens="
                     f"{cached_tokens}, new_tokens={new_tokens}")
  c = config
  dense = 2.0 * c.num_layers * layer_matmul_params(c) * new_tokens
  logit_tokens = min(new_tokens, 1) if last_token_logits_only else new_tokens
  lm_head = 2.0 * c.hidden_size * c.vocab_size * logit_tokens
  attention = (4.0 * c.num_layers * c.num_heads * c.head_dim * new_tokens
               * (cached_tokens + (new_tokens + 1) / 2))
  return dense + lm_head + attention


def decode_flops(config: ModelConfig, context_tokens: int) -> float:
  """FLOPs of one decode step of one sequence with `context_tokens` already cached."""
  return prefill_flops(config, context_tokens, 1)
