"""Split prefill attention (model/split_attention.py): the prefix in chunks plus the new tokens,
merged by log-sum-exp, equals the one masked call, on CPU with the einsum implementation.

The cuDNN implementation shares the chunking and the merge; only its kernel call differs, and the
GPU benchmark checks it against the einsum reference (bench/engine.py, 'layerwise_split' rows).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from dualpath_jax import model as M
from dualpath_jax.model import split_attention, transformer, weights
from dualpath_jax.model.prefill import prefill_mask


@jax.jit
def _masked_reference(q, prefix_kv, new_kv, prefix_len, new_len):
  mask = prefill_mask(prefix_len, new_len, prefix_kv.shape[1], q.shape[1])
  return transformer.attention(q, jnp.concatenate([prefix_kv, new_kv], axis=1), mask)


_split = jax.jit(split_attention.prefill_attention,
                 static_argnames=("kv_splits", "implementation"))


# Shapes from small sets (each combination compiles once); lengths vary freely within them.
@settings(max_examples=25, deadline=None)
@given(data=st.data(), prefix_tokens=st.sampled_from([0, 13, 40]),
       new_tokens=st.sampled_from([1, 12]), kv_splits=st.sampled_from([1, 3, 4, 9]))
def test_split_equals_the_masked_call(data, prefix_tokens, new_tokens, kv_splits):
  batch, heads, kv_heads, dim = 3, 4, 2, 8
  prefix_len = np.array(data.draw(st.lists(st.integers(0, prefix_tokens), min_size=batch,
                                           max_size=batch)), np.int32)
  new_len = np.array(data.draw(st.lists(st.integers(1, new_tokens), min_size=batch,
                                        max_size=batch)), np.int32)
  key = jax.random.key(data.draw(st.integers(0, 2**16)))
  q = 2 * jax.random.normal(jax.random.fold_in(key, 0), (batch, new_tokens, heads, dim))
  prefix_kv = jax.random.normal(jax.random.fold_in(key, 1),
                                (batch, prefix_tokens, 2, kv_heads, dim))
  new_kv = jax.random.normal(jax.random.fold_in(key, 2), (batch, new_tokens, 2, kv_heads, dim))
  got = _split(q, prefix_kv, new_kv, jnp.asarray(prefix_len), jnp.asarray(new_len),
                kv_splits=kv_splits, implementation="einsum")
  want = _masked_reference(q, prefix_kv, new_kv, jnp.asarray(prefix_len), jnp.asarray(new_len))
  assert got.shape == want.shape and got.dtype == q.dtype
  assert np.isfinite(np.asarray(got)).all(), "padding rows must stay finite"
  for b in range(batch):
    np.testing.assert_allclose(np.asarray(got[b, :new_len[b]]), np.asarray(want[b, :new_len[b]]),
                               atol=2e-5, rtol=0, err_msg=f"row {b}: prefix {prefix_len[b]}")


def test_merge_drops_empty_parts_and_keeps_rows_with_none_finite():
  outs = jnp.stack([jnp.full((1, 2, 1, 3), 5.0), jnp.full((1, 2, 1, 3), jnp.nan)], axis=1)
  lses = jnp.stack([jnp.array([[[0.0], [-jnp.inf]]]), jnp.full((1, 2, 1), -jnp.inf)], axis=1)
  merged = np.asarray(split_attention.merge(outs, lses))
  np.testing.assert_array_equal(merged[0, 0], 5.0)  # the NaN part is ignored: its lse is -inf
  np.testing.assert_array_equal(merged[0, 1], 0.0)  # nothing visible: zeros, not NaN


@pytest.mark.parametrize("kv_splits", [1, 3])
def test_prefill_with_split_attention_equals_the_masked_prefill(kv_splits):
  config = M.get_preset("tiny", dtype="float32")
  model = M.Transformer(config, rngs=nnx.Rngs(0), init_std=0.1)
  split = weights.with_config(model, config.replace(prefill_kv_splits=kv_splits))
  rng = np.random.default_rng(kv_splits)
  batch, prefix_tokens, new_tokens = 3, 128, 64
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, new_tokens)), jnp.int32)
  prefix_len = jnp.array([128, 0, 70], jnp.int32)
  new_len = jnp.array([64, 37, 1], jnp.int32)
  _, prefix_kv = M.prefill_jit(
      model, jnp.asarray(rng.integers(0, config.vocab_size, (batch, prefix_tokens)), jnp.int32),
      M.empty_prefix_kv(config, batch), jnp.zeros(batch, jnp.int32), prefix_len)
  want, want_kv = M.prefill_jit(model, tokens, prefix_kv, prefix_len, new_len)
  got, got_kv = M.prefill_jit(split, tokens, prefix_kv, prefix_len, new_len)
  for b in range(batch):
    n = int(new_len[b])
    np.testing.assert_allclose(np.asarray(got[b, :n]), np.asarray(want[b, :n]), atol=1e-5,
                               rtol=0, err_msg=f"row {b}")
    np.testing.assert_allclose(np.asarray(got_kv[:, b, :n]), np.asarray(want_kv[:, b, :n]),
                               atol=1e-5, rtol=0)


def test_split_settings_are_checked():
  config = M.get_preset("tiny")
  with pytest.raises(ValueError, match="ModelConfig.prefill_kv_splits"):
    config.replace(prefill_kv_splits=-1)
  with pytest.raises(ValueError, match="ModelConfig.prefill_kv_splits > 0 needs attention"):
    config.replace(attention="xla", prefill_kv_splits=4)
  with pytest.raises(ValueError, match="implementation must be one of"):
    split_attention.attention_with_lse(jnp.zeros((1, 1, 2, 4)), jnp.zeros((1, 1, 1, 4)),
                                       jnp.zeros((1, 1, 1, 4)), jnp.ones(1, jnp.int32),
                                       jnp.ones(1, jnp.int32), causal=False, implementation="xla")
