"""The model side of DualPath: a Flax NNX decoder-only transformer and the ways engines run it.

  config.py       ModelConfig and presets (tiny, small, qwen2.5-7b, qwen2.5-32b)
  transformer.py  Transformer / DecoderLayer: each layer takes the KV it attends to and returns its
                  own, so the cache lives wherever the caller keeps it
  prefill.py      prefill engines: new tokens on top of a cached prefix's KV, batched and padded,
                  whole-model (`prefill`) or one layer at a time (`prefill_layer`), the unit of
                  layerwise prefill while the next layer's prefix KV streams in
  paged.py        decode engines: a paged KV pool (PagedPool: per layer, K and V pages as separate
                  [H, pages, page_tokens, D] arrays; a Full Block is one page), its functional
                  host-side PageTable, and batched `decode_step` (attention by a dense gather
                  or by a Pallas paged-attention kernel, ModelConfig.paged_attention)
  paged_kernel.py the project's own Pallas (Triton) paged decode-attention kernel
                  (ModelConfig.pallas_kernel 'dualpath'; 'jax' runs JAX's)
  cost.py         KV bytes per token, parameter counts and FLOPs for schedulers and the simulator

Plain functions trace inside larger jits; the `*_jit` names are their jitted entry points (the
Module goes in as a pytree; decode_step_jit donates the pool). KV layouts follow kvstore/layout.py.
"""

from dualpath_jax.model.config import PALLAS_KERNELS, PRESETS, ModelConfig, get_preset
from dualpath_jax.model.cost import decode_flops, kv_bytes_per_token, param_count, prefill_flops
from dualpath_jax.model.paged import (SCRATCH_PAGE, OutOfPagesError, PagedPool, PageTable,
                                      decode_step, decode_step_jit, init_pool,
                                      read_kv_from_pages, write_full_blocks_to_pages,
                                      write_kv_to_pages)
from dualpath_jax.model.prefill import (bucket_tokens, embed_tokens, embed_tokens_jit,
                                        empty_prefix_kv, final_logits, final_logits_jit,
                                        last_token_logits, last_token_logits_jit,
                                        pad_axis, prefill, prefill_jit,
                                        prefill_layer, prefill_layer_jit)
from dualpath_jax.model.transformer import DecoderLayer, Transformer

__all__ = [
    "PALLAS_KERNELS", "PRESETS", "ModelConfig", "get_preset",
    "Transformer", "DecoderLayer",
    "bucket_tokens", "pad_axis", "empty_prefix_kv", "embed_tokens", "prefill_layer",
    "final_logits", "last_token_logits", "prefill",
    "embed_tokens_jit", "prefill_layer_jit", "final_logits_jit", "last_token_logits_jit",
    "prefill_jit",
    "SCRATCH_PAGE", "OutOfPagesError", "PageTable", "PagedPool", "init_pool",
    "write_kv_to_pages", "write_full_blocks_to_pages", "read_kv_from_pages", "decode_step",
    "decode_step_jit",
    "kv_bytes_per_token", "param_count", "prefill_flops", "decode_flops",
]
