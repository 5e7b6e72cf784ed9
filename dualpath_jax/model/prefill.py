"""Prefill of new tokens on top of a cached prefix, batched and padded, whole-model or per layer.

A batch row b holds one sequence: `prefix_len[b]` cached tokens (their KV is `prefix_kv`, padded
to Tp) and `new_len[b]` new tokens (padded to Tn). New token i sits at absolute position
prefix_len[b] + i and attends to prefix positions j < prefix_len[b] and to new tokens j <= i with
j < new_len[b]. Padding (prefix slots >= prefix_len, new rows >= new_len) is masked out; padded
rows still produce finite values, which callers ignore.

Layouts (L layers, B batch, H kv heads, D head dim; axis 2 of a KV array: 0 = K, 1 = V):
  one layer's prefix KV     [B, Tp, 2, H, D]      what `prefill_layer` takes
  whole-model prefix KV  [L, B, Tp, 2, H, D]      layer-leading, so prefix_kv[l] is a free slice
  new KV (returned)      [L, B, Tn, 2, H, D]      new_kv[:, b, :new_len[b]] is row b's
                                                  KVLayout-style [L, T, 2, H, D] KV
The layerwise path (the runtime streams layer l+1's prefix KV in while layer l computes) is
`embed_tokens` -> `prefill_layer` for each model.layers[l] -> `final_logits`; `prefill` is that
same loop under one jit.

Shapes decide compiles: pad Tn and Tp with `bucket_tokens` so that random lengths compile a
bounded number of programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model.flat import module_jit
from dualpath_jax.model.transformer import DecoderLayer, Transformer


def bucket_tokens(num_tokens: int, multiple: int = 64) -> int:
  """Smallest multiple of `multiple` >= num_tokens (0 stays 0: an empty prefix is its own shape)."""
  if num_tokens < 0:
    raise ValueError(f"bucket_tokens: num_tokens must be >= 0, got {num_tokens}")
  if multiple <= 0:
    raise ValueError(f"bucket_tokens: multiple must be positive, got {multiple}")
  return -(-num_tokens // multiple) * multiple


def pow2_at_least(n: int, floor: int = 1) -> int:
  """Smallest power of two >= max(n, floor): compile buckets for lengths that vary a lot."""
  n = max(n, floor, 1)
  return 1 << (n - 1).bit_length()


def prefill_mask(prefix_len: jax.Array, new_len: jax.Array, prefix_tokens: int,
                 new_tokens: int) -> jax.Array:
  """[B, Tn, Tp + Tn] bool: which keys (prefix slots, then new tokens) each new token may see."""
  j_prefix = jnp.arange(prefix_tokens, dtype=jnp.int32)
  prefix_ok = j_prefix[None, None, :] < prefix_len[:, None, None]  # [B, 1, Tp]
  i = jnp.arange(new_tokens, dtype=jnp.int32)
  new_ok = (i[None, :] <= i[:, None])[None] & (i[None, None, :] < new_len[:, None, None])
  prefix_ok = jnp.broadcast_to(prefix_ok, (prefix_len.shape[0], new_tokens, prefix_tokens))
  return jnp.concatenate([prefix_ok, new_ok], axis=-1)


def _check_layer_inputs(config, x, prefix_kv, prefix_len, new_len) -> None:
  if x.ndim != 3 or x.shape[2] != config.hidden_size:
    raise ValueError(f"x: expected [B, Tn, hidden={config.hidden_size}], got {list(x.shape)}")
  batch = x.shape[0]
  kv_tail = (2, config.num_kv_heads, config.head_dim)
  if prefix_kv.ndim != 5 or prefix_kv.shape[0] != batch or tuple(prefix_kv.shape[2:]) != kv_tail:
    raise ValueError(f"prefix_kv: expected [B={batch}, Tp, 2, H={config.num_kv_heads}, "
                     f"D={config.head_dim}], got {list(prefix_kv.shape)}")
  if prefix_kv.dtype != config.jnp_dtype:
    raise ValueError(f"prefix_kv: expected dtype {config.dtype}, got {prefix_kv.dtype}")
  for name, lengths in (("prefix_len", prefix_len), ("new_len", new_len)):
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"{name}: expected int [B={batch}], got {lengths.dtype} {list(lengths.shape)}")


def embed_tokens(model: Transformer, tokens: jax.Array) -> jax.Array:
  """tokens [B, Tn] int32 -> x [B, Tn, hidden] in the model dtype."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens: expected int [B, Tn], got {tokens.dtype} {list(tokens.shape)}")
  return model.embed(tokens)


def prefill_layer(layer: DecoderLayer, x: jax.Array, prefix_kv: jax.Array, prefix_len: jax.Array,
                  new_len: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One layer of prefill.

  x [B, Tn, hidden]; prefix_kv [B, Tp, 2, H, D] (Tp may be 0); prefix_len, new_len [B] int32.
  Returns (x_out [B, Tn, hidden], new_kv [B, Tn, 2, H, D]).
  """
  _check_layer_inputs(layer.config, x, prefix_kv, prefix_len, new_len)
  batch, new_tokens, _ = x.shape
  prefix_len = prefix_len.astype(jnp.int32)
  positions = prefix_len[:, None] + jnp.arange(new_tokens, dtype=jnp.int32)[None, :]  # [B, Tn]
  if layer.config.prefill_kv_splits:  # no mask: the prefix in chunks + the new tokens, merged
    return layer.prefill_split(x, positions, prefix_kv, prefix_len, new_len.astype(jnp.int32))
  mask = prefill_mask(prefix_len, new_len.astype(jnp.int32), prefix_kv.shape[1], new_tokens)
  return layer(x, positions, prefix_kv, mask)


def final_logits(model: Transformer, x: jax.Array) -> jax.Array:
  """x [B, Tn, hidden] -> logits [B, Tn, vocab] float32."""
  return model.logits(x)


def last_token_logits(model: Transformer, x: jax.Array, new_len: jax.Array) -> jax.Array:
  """Logits of each row's last new token only: x [B, Tn, hidden] -> [B, vocab] float32.

  What serving needs (the first generated token); it skips the Tn x vocab logits, which for a
  32K-token prompt and a 152K vocab would be 19 GiB of float32.
  """
  last = jnp.clip(new_len.astype(jnp.int32) - 1, 0, x.shape[1] - 1)
  x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, hidden]
  return model.logits(x_last)


def prefill(model: Transformer, tokens: jax.Array, prefix_kv: jax.Array, prefix_len: jax.Array,
            new_len: jax.Array, *, all_logits: bool = True) -> tuple[jax.Array, jax.Array]:
  """Whole-model prefill: a Python loop of `prefill_layer` (identical to the layerwise path).

  tokens [B, Tn] int32; prefix_kv [L, B, Tp, 2, H, D]; prefix_len, new_len [B] int32.
  Returns (logits, new_kv [L, B, Tn, 2, H, D]); logits are [B, Tn, vocab] float32, or
  [B, vocab] at each row's last new token when all_logits=False.
  """
  config = model.config
  if prefix_kv.ndim != 6 or prefix_kv.shape[0] != config.num_layers:
    raise ValueError(f"prefix_kv: expected [L={config.num_layers}, B, Tp, 2, H, D], "
                     f"got {list(prefix_kv.shape)}")
  x = embed_tokens(model, tokens)
  new_kv = []
  for layer_index, layer in enumerate(model.layers):
    x, layer_kv = prefill_layer(layer, x, prefix_kv[layer_index], prefix_len, new_len)
    new_kv.append(layer_kv)
  logits = final_logits(model, x) if all_logits else last_token_logits(model, x, new_len)
  return logits, jnp.stack(new_kv)


def empty_prefix_kv(config, batch: int, prefix_tokens: int = 0) -> jax.Array:
  """Zeros [L, B, Tp, 2, H, D]: the prefix of sequences with nothing cached (prefix_len 0)."""
  return jnp.zeros((config.num_layers, batch, prefix_tokens, 2, config.num_kv_heads,
                    config.head_dim), config.jnp_dtype)


def pad_axis(array, length: int, axis: int):
  """Zero-pads `array` (numpy or jax) along `axis` up to `length` (a bucket size)."""
  size = array.shape[axis]
  if size > length:
    raise ValueError(f"pad_axis: axis {axis} has {size} entries, more than length={length}")
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, length - size)
  pad = np.pad if isinstance(array, np.ndarray) else jnp.pad
  return pad(array, widths)


# Jitted entry points. The module goes in as its parameter arrays, split from it once per module
# object (model/flat.py): flattening an NNX module on every call walked its graph in Python,
# ~3.6 ms a call for the whole model on an H200 host (docs/perf/gpu_bench.md record 14).
embed_tokens_jit = module_jit(embed_tokens)
prefill_layer_jit = module_jit(prefill_layer)
final_logits_jit = module_jit(final_logits)
last_token_logits_jit = module_jit(last_token_logits)
prefill_jit = module_jit(prefill, static_argnames=("all_logits",))
