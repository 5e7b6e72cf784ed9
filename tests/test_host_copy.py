"""host_copy: split copies give numpy's results exactly, on views too, and report bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax.kvstore import KVLayout, host_copy
from dualpath_jax.model import get_preset


@pytest.fixture(params=["inline", "split"])
def mode(request, monkeypatch):
  if request.param == "split":  # every copy goes through the pool, over 3 parts
    monkeypatch.setattr(host_copy, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setenv("DUALPATH_COPY_THREADS", "3")
  return request.param


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 7), step=st.integers(1, 3))
def test_copy_equals_copyto_on_strided_views(rows, cols, step):
  for threshold in (0, 1 << 30):  # split and inline, whatever the fixture-free default
    host_copy.MIN_PARALLEL_BYTES, saved = threshold, host_copy.MIN_PARALLEL_BYTES
    try:
      src = np.arange(rows * cols * 4, dtype=np.int32).reshape(rows, cols * 4)[:, ::step]
      dst = np.zeros((rows, cols * 4), np.int32)[:, ::step]
      host_copy.copy(dst, src)
      np.testing.assert_array_equal(dst, src)
    finally:
      host_copy.MIN_PARALLEL_BYTES = saved


def test_stack_equals_np_stack(mode):
  arrays = [np.full((3, 5), i, np.uint8) for i in range(7)]
  np.testing.assert_array_equal(host_copy.stack(arrays), np.stack(arrays))


def test_layout_copies_are_unchanged(mode):
  layout = KVLayout.for_model(get_preset("tiny", dtype="float32"))
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 255, (5, *layout.full_block_shape), dtype=np.uint8)
  kv = layout.full_blocks_to_kv(blocks)
  np.testing.assert_array_equal(layout.kv_to_full_blocks(kv), blocks)
  out = np.empty(blocks.shape[0] * layout.layer_block_bytes, np.uint8)
  for layer in range(layout.num_layers):
    np.testing.assert_array_equal(layout.layer_kv(blocks, layer, out=out), kv[layer])
    np.testing.assert_array_equal(layout.layer_kv(blocks, layer), kv[layer])


def test_layout_copies_pad_with_zero_rows_into_dirty_buffers(mode):
  layout = KVLayout.for_model(get_preset("tiny", dtype="float32"))
  rng = np.random.default_rng(1)
  blocks = rng.integers(1, 255, (3, *layout.full_block_shape), dtype=np.uint8)
  have, tokens = 3 * layout.block_tokens, 3 * layout.block_tokens + 5
  kv = layout.full_blocks_to_kv(blocks)
  dirty = np.full(layout.num_layers * tokens * layout.token_layer_bytes, 7, np.uint8)
  padded = layout.full_blocks_to_kv(blocks, out=dirty, tokens=tokens)
  assert padded.shape == (layout.num_layers, tokens, *layout.token_kv_shape)
  np.testing.assert_array_equal(padded[:, :have], kv)
  assert not padded[:, have:].any()
  for layer in range(layout.num_layers):
    dirty[:] = 7
    one = layout.layer_kv(blocks, layer, out=dirty, tokens=tokens)
    np.testing.assert_array_equal(one[:have], kv[layer])
    assert one.shape[0] == tokens and not one[have:].any()
  with pytest.raises(ValueError, match="tokens"):
    layout.layer_kv(blocks, 0, tokens=have - 1)
  with pytest.raises(ValueError, match="out"):
    layout.full_blocks_to_kv(blocks, out=dirty[:10], tokens=tokens)


def test_read_blocks_land_layer_major_as_the_stacked_blocks_would(mode):
  """A read's blocks (a list, as the store returns them) land layer-major, padded, in a dirty
  reused buffer: the same KV as the stacked blocks' transpose, zeros past the blocks."""
  layout = KVLayout.for_model(get_preset("tiny", dtype="float32"))
  rng = np.random.default_rng(2)
  blocks = [rng.integers(1, 255, layout.full_block_shape, dtype=np.uint8) for _ in range(6)]
  have, tokens = 6 * layout.block_tokens, 8 * layout.block_tokens
  dirty = np.full(layout.num_layers * tokens * layout.token_layer_bytes, 7, np.uint8)
  landed = layout.full_blocks_to_kv(blocks, out=dirty, tokens=tokens)
  np.testing.assert_array_equal(landed[:, :have], layout.full_blocks_to_kv(np.stack(blocks)))
  assert not landed[:, have:].any()
  for layer in range(layout.num_layers):  # each layer's prefix is one contiguous array
    assert landed[layer].flags.c_contiguous
    np.testing.assert_array_equal(landed[layer, :have], layout.layer_kv(np.stack(blocks), layer))
  bad = blocks[:2] + [blocks[2][:, :3]]
  with pytest.raises(ValueError, match=r"blocks\[2\]"):
    layout.full_blocks_to_kv(bad)


def test_bad_input_is_reported(mode, monkeypatch):
  with pytest.raises(ValueError, match="differ in shape"):
    host_copy.copy(np.zeros((2, 3)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="array 2 has shape"):
    host_copy.stack([np.zeros(3), np.zeros(3), np.zeros(4)])
  with pytest.raises(ValueError, match="no arrays"):
    host_copy.stack([])
  monkeypatch.setenv("DUALPATH_COPY_THREADS", "many")
  with pytest.raises(ValueError, match="DUALPATH_COPY_THREADS"):
    host_copy.workers()
