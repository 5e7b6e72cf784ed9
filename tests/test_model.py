"""Invariants of the model subpackage on the tiny preset in float32.

Cached prefill equals a full recompute; layerwise equals whole-model prefill; a batch equals its
rows alone; paged decode equals a full recompute; Full Blocks round-trip through the pool. Every
case of a kind runs as one padded batch, so the file compiles a handful of programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualpath_jax import model as M
from dualpath_jax.kvstore.layout import KVLayout

ATOL = 1e-5
# (prefix_len, new_len): block-aligned (multiples of 64) and not; an empty prefix; a single token.
CASES = [(0, 37), (64, 64), (128, 1), (70, 50), (5, 128), (100, 93), (192, 64), (1, 1)]
PREFIX_BUCKET = M.bucket_tokens(max(p for p, _ in CASES))  # 192
NEW_BUCKET = M.bucket_tokens(max(n for _, n in CASES))  # 128
FULL_BUCKET = PREFIX_BUCKET + NEW_BUCKET  # 320: every row's new tokens slice out whole


def assert_same_greedy(got: np.ndarray, want: np.ndarray, what: str) -> None:
  """Identical argmax wherever the reference's top-2 gap exceeds the logit tolerance.

  Random weights give a few near-ties (gaps of ~1e-6 occur among thousands of positions); their
  argmax is not defined at float32 tolerance, so they are skipped and required to be rare.
  """
  top2 = np.sort(want, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 2 * ATOL
  assert decided.mean() > 0.9, f"{what}: too many near-ties to check greedy tokens"
  np.testing.assert_array_equal(got.argmax(-1)[decided], want.argmax(-1)[decided], err_msg=what)


@pytest.fixture(scope="module")
def config():
  return M.get_preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def model(config):
  # init_std 0.1 rather than 0.02: sharper attention, so a masking or position error shows.
  return M.Transformer(config, rngs=nnx.Rngs(0), init_std=0.1)


@pytest.fixture(scope="module")
def full_forward(model):
  return jax.jit(lambda m, tokens: m(tokens))


@pytest.fixture(scope="module")
def cached_run(config, model, full_forward):
  """The CASES as one batch, plus a last row with nothing at all (prefix 0, new 0)."""
  rng = np.random.default_rng(0)
  cases = CASES + [(0, 0)]
  batch = len(cases)
  tokens = rng.integers(0, config.vocab_size, (batch, FULL_BUCKET), dtype=np.int32)
  prefix_len = np.array([p for p, _ in cases], np.int32)
  new_len = np.array([n for _, n in cases], np.int32)
  prefix_tokens = tokens[:, :PREFIX_BUCKET]
  new_tokens = np.stack([tokens[b, p:p + NEW_BUCKET] for b, (p, _) in enumerate(cases)])
  # The prefix's KV comes from a prefill of the prefix alone, as the store would hold it.
  _, prefix_kv = M.prefill_jit(model, prefix_tokens, M.empty_prefix_kv(config, batch),
                               np.zeros(batch, np.int32), prefix_len)
  logits, new_kv = M.prefill_jit(model, new_tokens, prefix_kv, prefix_len, new_len)
  full_logits = full_forward(model, tokens)
  _, full_kv = M.prefill_jit(model, tokens, M.empty_prefix_kv(config, batch),
                             np.zeros(batch, np.int32), np.full(batch, FULL_BUCKET, np.int32))
  return dict(cases=cases, new_tokens=new_tokens, prefix_kv=prefix_kv, prefix_len=prefix_len,
              new_len=new_len, logits=np.asarray(logits), new_kv=np.asarray(new_kv),
              full_logits=np.asarray(full_logits), full_kv=np.asarray(full_kv))


def test_cached_prefill_equals_full_recompute(cached_run):
  r = cached_run
  assert np.isfinite(r["logits"]).all(), "padding rows must stay finite"
  for b, (p, n) in enumerate(CASES):
    got, want = r["logits"][b, :n], r["full_logits"][b, p:p + n]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"case {(p, n)}")
    assert_same_greedy(got, want, f"case {(p, n)}")
    np.testing.assert_allclose(r["new_kv"][:, b, :n], r["full_kv"][:, b, p:p + n], atol=ATOL,
                               rtol=0, err_msg=f"new KV of case {(p, n)}")


def test_last_token_logits(model, cached_run):
  r = cached_run
  last, _ = M.prefill_jit(model, r["new_tokens"], r["prefix_kv"], r["prefix_len"], r["new_len"],
                          all_logits=False)
  for b, (_, n) in enumerate(CASES):
    np.testing.assert_allclose(np.asarray(last[b]), r["logits"][b, n - 1], atol=1e-6, rtol=0)


def test_layerwise_prefill_equals_whole_model(model, cached_run):
  r = cached_run
  x = M.embed_tokens_jit(model, r["new_tokens"])
  layer_kvs = []
  for layer_index, layer in enumerate(model.layers):
    x, layer_kv = M.prefill_layer_jit(layer, x, r["prefix_kv"][layer_index], r["prefix_len"],
                                      r["new_len"])
    layer_kvs.append(np.asarray(layer_kv))
  np.testing.assert_array_equal(np.asarray(M.final_logits_jit(model, x)), r["logits"])
  np.testing.assert_array_equal(np.stack(layer_kvs), r["new_kv"])


def test_batched_prefill_equals_each_alone(model, cached_run):
  r = cached_run
  for b in (0, 3, 6):
    logits, new_kv = M.prefill_jit(model, r["new_tokens"][b:b + 1], r["prefix_kv"][:, b:b + 1],
                                   r["prefix_len"][b:b + 1], r["new_len"][b:b + 1])
    n = r["new_len"][b]
    np.testing.assert_allclose(np.asarray(logits[0, :n]), r["logits"][b, :n], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(new_kv[:, 0, :n]), r["new_kv"][:, b, :n], atol=1e-6,
                               rtol=0)


def test_paged_decode_equals_full_recompute(config, model, full_forward):
  page_tokens, steps, batch_size, max_pages = 16, 6, 4, 8
  prompt_lens = [30, 64, 47]  # crossings: a page-aligned prompt, one at the first step, one later
  rng = np.random.default_rng(1)
  # Shuffled free list: every sequence gets non-contiguous, out-of-order pages.
  table = M.PageTable(num_pages=40, page_tokens=page_tokens,
                      free_pages=tuple(int(p) for p in rng.permutation(np.arange(1, 40))))
  prompts = rng.integers(0, config.vocab_size, (3, 64), dtype=np.int32)
  prompt_logits, prompt_kv = M.prefill_jit(model, prompts, M.empty_prefix_kv(config, 3),
                                           np.zeros(3, np.int32), np.array(prompt_lens, np.int32))
  pages = M.init_pool(config, table.num_pages, page_tokens)
  for seq, length in enumerate(prompt_lens):
    table = table.allocate(seq, length)
    pages = M.write_kv_to_pages(pages, prompt_kv[:, seq, :length], table.block_tables[seq])
  sequences = [list(prompts[seq, :length]) for seq, length in enumerate(prompt_lens)]
  next_tokens = [int(np.argmax(prompt_logits[seq, length - 1]))
                 for seq, length in enumerate(prompt_lens)]
  step_logits = []  # per step: [3, vocab], the logits after feeding next_tokens at seq_lens
  for _ in range(steps):
    table, block_tables, seq_lens = table.prepare_decode([0, 1, 2], batch_size=batch_size,
                                                         max_pages=max_pages)
    tokens = np.array(next_tokens + [0], np.int32)  # the last row is padding
    logits, pages = M.decode_step_jit(model, pages, tokens, block_tables, seq_lens)
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    step_logits.append(logits[:3])
    for seq in range(3):
      sequences[seq].append(next_tokens[seq])
    next_tokens = [int(np.argmax(logits[seq])) for seq in range(3)]

  full_tokens = np.stack([M.pad_axis(np.array(s, np.int32), 128, 0) for s in sequences])
  full_logits = np.asarray(full_forward(model, full_tokens))
  got = np.stack(step_logits)  # [steps, 3, vocab]
  want = np.stack([[full_logits[seq, length + step] for seq, length in enumerate(prompt_lens)]
                   for step in range(steps)])
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  assert_same_greedy(got, want, "paged decode")
  # The pool now holds every fed token's KV, equal to a full prefill's.
  _, full_kv = M.prefill_jit(model, full_tokens, M.empty_prefix_kv(config, 3),
                             np.zeros(3, np.int32), np.full(3, 128, np.int32))
  for seq, length in enumerate(prompt_lens):
    assert table.seq_lens[seq] == length + steps
    kv = M.read_kv_from_pages(pages, table.block_tables[seq], length + steps)
    np.testing.assert_allclose(np.asarray(kv), np.asarray(full_kv[:, seq, :length + steps]),
                               atol=ATOL, rtol=0)


def test_full_blocks_and_unaligned_kv_round_trip_through_pages(config):
  layout = KVLayout.for_model(config, block_tokens=16)
  rng = np.random.default_rng(2)
  kv = rng.standard_normal((config.num_layers, 48, 2, config.num_kv_heads, config.head_dim),
                           dtype=np.float32)
  typed = layout.full_blocks_as_kv(layout.kv_to_full_blocks(kv))  # [3, L, 16, 2, H, D]
  pages = M.init_pool(config, 12, layout.block_tokens)
  pages = M.write_full_blocks_to_pages(pages, typed, [7, 2, 5])
  np.testing.assert_array_equal(np.asarray(M.read_kv_from_pages(pages, [7, 2, 5], 48)), kv)
  # A prompt that is not page-aligned: 40 tokens over 3 pages, the last one partly used.
  pages = M.write_kv_to_pages(pages, kv[:, :40], [3, 11, 1])
  np.testing.assert_array_equal(np.asarray(M.read_kv_from_pages(pages, [3, 11, 1], 40)),
                                kv[:, :40])
  np.testing.assert_array_equal(np.asarray(M.read_kv_from_pages(pages, [7], 16)), kv[:, :16])


def test_page_table_is_functional_and_reports_exhaustion():
  table = M.PageTable.create(num_pages=5, page_tokens=4)  # pages 1..4 allocatable
  grown = table.allocate("a", 5)
  assert table.seq_lens == {} and grown.block_tables["a"] == (1, 2)
  grown = grown.extend("a", 3)  # 8 tokens: still two pages
  assert grown.block_tables["a"] == (1, 2) and grown.seq_lens["a"] == 8
  grown = grown.extend("a")  # token 8 opens page 3
  assert grown.block_tables["a"] == (1, 2, 3)
  with pytest.raises(M.OutOfPagesError, match="'b' needs 2 more page"):
    grown.allocate("b", 5)
  freed = grown.free("a")
  assert "a" not in freed.seq_lens and sorted(freed.free_pages) == [1, 2, 3, 4]
  with pytest.raises(ValueError, match="already exists"):
    grown.allocate("a", 1)
  _, block_tables, seq_lens = grown.prepare_decode(["a"], batch_size=2, max_pages=4)
  assert block_tables.tolist() == [[1, 2, 3, 0], [M.SCRATCH_PAGE] * 4]
  assert seq_lens.tolist() == [9, 0]


def test_cost_model(config, model):
  assert M.kv_bytes_per_token(M.get_preset("qwen2.5-32b")) == 262_144
  assert M.kv_bytes_per_token(M.get_preset("qwen2.5-7b")) == 57_344
  params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  assert M.param_count(config) == sum(p.size for p in params)
  qwen = M.get_preset("qwen2.5-7b")
  assert 7.5e9 < M.param_count(qwen) < 7.7e9  # Qwen2.5-7B has 7.61B parameters
  flops = M.prefill_flops
  for cached in (0, 1000, 32_000):
    assert flops(qwen, cached, 10) < flops(qwen, cached, 11) < flops(qwen, cached + 1, 11)
  # Small new and nothing cached: ~2 FLOPs per non-embedding parameter per token.
  ratio = flops(qwen, 0, 4) / (2 * (M.param_count(qwen) - qwen.vocab_size * qwen.hidden_size) * 4)
  assert 0.99 < ratio < 1.01
  assert M.decode_flops(qwen, 500) == flops(qwen, 500, 1)
  assert flops(qwen, 0, 100, last_token_logits_only=True) < flops(qwen, 0, 100)


def test_bad_inputs_raise_clear_value_errors(config, model):
  batch = 2
  tokens = np.zeros((batch, 8), np.int32)
  lengths = np.full(batch, 8, np.int32)
  wrong_heads = jnp.zeros((config.num_layers, batch, 4, 2, config.num_kv_heads + 1,
                           config.head_dim))
  with pytest.raises(ValueError, match="prefix_kv"):
    M.prefill(model, tokens, wrong_heads, lengths, lengths)
  with pytest.raises(ValueError, match="prefix_kv: expected dtype"):
    M.prefill(model, tokens, M.empty_prefix_kv(config, batch).astype(jnp.bfloat16), lengths,
              lengths)
  with pytest.raises(ValueError, match="new_len"):
    M.prefill(model, tokens, M.empty_prefix_kv(config, batch), lengths, lengths[:1])
  with pytest.raises(ValueError, match="tokens"):
    M.prefill(model, tokens[0], M.empty_prefix_kv(config, batch), lengths, lengths)
  pages = M.init_pool(config, 4, 16)
  kv = jnp.zeros((config.num_layers, 20, 2, config.num_kv_heads, config.head_dim))
  with pytest.raises(ValueError, match="page_ids"):
    M.write_kv_to_pages(pages, kv, [1])
  with pytest.raises(ValueError, match="decode_step"):
    M.decode_step(model, pages, np.zeros(2, np.int32), np.zeros((3, 1), np.int32),
                  np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="ModelConfig.num_heads"):
    M.get_preset("tiny", num_heads=3)
  with pytest.raises(ValueError, match="model.preset"):
    M.get_preset("nope")
  with pytest.raises(ValueError, match="PageTable.page_tokens"):
    M.PageTable.create(num_pages=4, page_tokens=0)
  with pytest.raises(ValueError, match="bucket_tokens"):
    M.bucket_tokens(-1)


def test_bfloat16_smoke():
  config = M.get_preset("tiny")  # bfloat16
  model = M.Transformer(config, rngs=nnx.Rngs(3))
  tokens = np.arange(2 * 16, dtype=np.int32).reshape(2, 16)
  logits, kv = M.prefill_jit(model, tokens, M.empty_prefix_kv(config, 2), np.zeros(2, np.int32),
                             np.array([16, 9], np.int32))
  assert logits.dtype == jnp.float32 and kv.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits)).all()
  table = M.PageTable.create(num_pages=4, page_tokens=16).allocate(0, 16)
  pages = M.write_kv_to_pages(M.init_pool(config, 4, 16), kv[:, 0], table.block_tables[0])
  table, block_tables, seq_lens = table.prepare_decode([0], batch_size=2, max_pages=2)
  step_logits, pages = M.decode_step_jit(model, pages, np.array([5, 0], np.int32), block_tables,
                                         seq_lens)
  assert step_logits.dtype == jnp.float32 and np.isfinite(np.asarray(step_logits)).all()
  assert pages.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_kv_into_a_reused_buffer_equals_a_fresh_gather(dtype):
  layout = KVLayout.for_model(M.get_preset("tiny", dtype=dtype))
  rng = np.random.default_rng(3)
  blocks = rng.integers(0, 256, (5, *layout.full_block_shape), dtype=np.uint8)
  buffer = np.zeros(7 * layout.layer_block_bytes, np.uint8)  # larger than needed
  for layer in range(layout.num_layers):
    fresh = layout.layer_kv(blocks, layer)
    reused = layout.layer_kv(blocks, layer, out=buffer)
    assert reused.shape == fresh.shape and reused.dtype == fresh.dtype
    np.testing.assert_array_equal(reused.view(np.uint8), fresh.view(np.uint8))
  kv = layout.full_blocks_to_kv(blocks)
  np.testing.assert_array_equal(layout.kv_to_full_blocks(kv), blocks)


def test_dot_product_attention_matches_the_einsum_reference():
  config = M.get_preset("tiny", dtype="float32")
  model = M.Transformer(config, rngs=nnx.Rngs(0))
  xla = M.Transformer(config.replace(attention="xla"), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 96)),
                       jnp.int32)
  prefix = M.empty_prefix_kv(config, 2, 64)
  prefix_len = jnp.array([0, 0], jnp.int32)
  new_len = jnp.array([96, 70], jnp.int32)
  a, kv_a = M.prefill(model, tokens, prefix, prefix_len, new_len)
  b, kv_b = M.prefill(xla, tokens, prefix, prefix_len, new_len)
  np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(np.asarray(a)[1, :70], np.asarray(b)[1, :70], atol=2e-4, rtol=2e-4)
  with pytest.raises(ValueError, match="ModelConfig.attention"):
    config.replace(attention="flash")
