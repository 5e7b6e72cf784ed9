"""The paged pool and its two decode attentions on the tiny preset in float32.

Either Pallas paged-attention kernel (JAX's or the project's, interpret mode on CPU) gives the
gather path's logits and pool step after step, for rows of different lengths crossing page boundaries and a padding row; the
pool is 2L separate [H, pages, page_tokens, D] arrays that Full Blocks and KV round-trip through;
`paged_attention` and the kernel's blocking (`pallas_k_splits`, `pallas_block_tokens`) are
choices of computation, not of weights (checkpoints ignore them); another blocking gives the same
logits.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax import model as M
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model import paged, weights

ATOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models():
  """The same weights (same seed, same shapes) under both decode attentions."""
  gather = M.Transformer(M.get_preset("tiny", dtype="float32"), rngs=nnx.Rngs(0))
  pallas = M.Transformer(M.get_preset("tiny", dtype="float32", paged_attention="pallas"),
                         rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(gather, nnx.Param)),
                  jax.tree_util.tree_leaves(nnx.state(pallas, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return gather, pallas


# (page_tokens, max_pages, blocking (pallas_k_splits, pallas_block_tokens), kernel blocking):
# the default blocking gives 8 splits of 1 page; and 11 splits of 2 pages with the table padded
# by one SCRATCH_PAGE column and 2 pages a compute block. k_splits 2, 32-token blocks give 2
# splits of 4 pages, 2 a block; and 2 splits of 16 pages (11 of them padding), 8 a block.
@pytest.mark.parametrize("pallas_kernel", M.PALLAS_KERNELS)
@pytest.mark.parametrize("page_tokens,max_pages,blocking,kernel", [
    (16, 8, (16, 128), (8, 1, 8)), (4, 21, (16, 128), (11, 2, 22)),
    (16, 8, (2, 32), (2, 2, 8)), (4, 21, (2, 32), (2, 8, 32))])
def test_pallas_decode_equals_gather_decode(models, monkeypatch, page_tokens, max_pages,
                                            blocking, kernel, pallas_kernel):
  gather_model, pallas_model = models
  config = gather_model.config
  # Another blocking and kernel: the same weights under another config (no copy), own trace.
  pallas_model = weights.with_config(pallas_model, pallas_model.config.replace(
      pallas_k_splits=blocking[0], pallas_block_tokens=blocking[1], pallas_kernel=pallas_kernel))
  traced = []
  original_blocking = paged.pallas_blocking

  def recording_blocking(*args, **kwargs):
    traced.append((kwargs, original_blocking(*args, **kwargs)))
    return traced[-1][1]
  monkeypatch.setattr(paged, "pallas_blocking", recording_blocking)
  steps, batch_size = 5, 4
  # Crossings: one within the steps, a page-aligned prompt (opens a page at the first step), one
  # at the first step's next token; the fourth row is padding.
  prompt_lens = [30, 32, 47]
  rng = np.random.default_rng(5)
  table = M.PageTable(num_pages=90, page_tokens=page_tokens,
                      free_pages=tuple(int(p) for p in rng.permutation(np.arange(1, 90))))
  prompts = rng.integers(0, config.vocab_size, (3, 64), dtype=np.int32)
  prompt_logits, prompt_kv = M.prefill_jit(gather_model, prompts, M.empty_prefix_kv(config, 3),
                                           np.zeros(3, np.int32), np.array(prompt_lens, np.int32))
  pools = {}
  for name in ("gather", "pallas"):
    pool = M.init_pool(config, table.num_pages, page_tokens)
    for seq, length in enumerate(prompt_lens):
      pages = table.allocate(seq, length).block_tables[seq]
      pool = M.write_kv_to_pages(pool, prompt_kv[:, seq, :length], pages)
    pools[name] = pool
  for seq, length in enumerate(prompt_lens):
    table = table.allocate(seq, length)
  next_tokens = [int(np.argmax(prompt_logits[seq, length - 1]))
                 for seq, length in enumerate(prompt_lens)]
  crossed = set()
  for _ in range(steps):
    table, block_tables, seq_lens = table.prepare_decode([0, 1, 2], batch_size=batch_size,
                                                         max_pages=max_pages)
    crossed |= {seq for seq in range(3) if seq_lens[seq] % page_tokens == 0}
    tokens = np.array(next_tokens + [0], np.int32)
    want, pools["gather"] = M.decode_step_jit(gather_model, pools["gather"], tokens,
                                              block_tables, seq_lens)
    got, pools["pallas"] = M.decode_step_jit(pallas_model, pools["pallas"], tokens, block_tables,
                                             seq_lens)
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()  # the padding row too
    np.testing.assert_allclose(got[:3], want[:3], atol=ATOL, rtol=0)
    next_tokens = [int(np.argmax(want[seq])) for seq in range(3)]  # both paths get the same
  assert crossed == {0, 1, 2}, "every sequence should open a new page during the steps"
  # Traced with the model config's blocking (once per layer).
  assert len(traced) == config.num_layers
  assert all(kwargs == dict(max_k_splits=blocking[0], block_tokens=blocking[1])
             and out == kernel for kwargs, out in traced)
  for seq, length in enumerate(prompt_lens):
    pages = table.block_tables[seq]
    kv = [np.asarray(M.read_kv_from_pages(pools[name], pages, length + steps))
          for name in ("gather", "pallas")]
    np.testing.assert_allclose(kv[1], kv[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("max_k_splits,block_tokens", [
    (paged.PALLAS_MAX_K_SPLITS, paged.PALLAS_COMPUTE_BLOCK_TOKENS), (1, 128), (2, 32), (8, 256),
    (32, 64), (64, 1)])
def test_pallas_blocking_meets_the_kernel_constraints(max_k_splits, block_tokens):
  for pages_per_seq in (1, 2, 3, 7, 8, 16, 17, 21, 129, 1000):
    for page_tokens in (4, 16, 64, 256):
      k_splits, per_block, padded = paged.pallas_blocking(
          pages_per_seq, page_tokens, max_k_splits=max_k_splits, block_tokens=block_tokens)
      assert padded >= pages_per_seq and padded % k_splits == 0
      assert (padded // k_splits) % per_block == 0
      assert per_block & (per_block - 1) == 0  # a power of 2 (Triton loads)
      assert per_block == 1 or per_block * page_tokens <= block_tokens
      assert k_splits <= max_k_splits
      # No split lies wholly in the padding.
      assert (k_splits - 1) * (padded // k_splits) < pages_per_seq


def test_pallas_blocking_values():
  assert paged.pallas_blocking(129, 64) == (13, 2, 130)  # 8K context in 64-token pages
  assert paged.pallas_blocking(129, 64, max_k_splits=16, block_tokens=128) == (13, 2, 130)
  assert paged.pallas_blocking(129, 64, max_k_splits=8, block_tokens=256) == (7, 4, 140)
  assert paged.pallas_blocking(129, 64, max_k_splits=16, block_tokens=64) == (15, 1, 135)
  with pytest.raises(ValueError, match="max_k_splits"):
    paged.pallas_blocking(129, 64, max_k_splits=0)


def test_pool_is_separate_per_layer_arrays_and_round_trips():
  config = M.get_preset("tiny", dtype="float32")
  layout = KVLayout.for_model(config, block_tokens=16)
  pool = M.init_pool(config, 12, layout.block_tokens)
  assert isinstance(pool, M.PagedPool) and len(pool.k) == len(pool.v) == config.num_layers
  shape = (config.num_kv_heads, 12, 16, config.head_dim)
  assert all(a.shape == shape and a.dtype == np.float32 for a in pool.k + pool.v)
  assert pool.nbytes == 2 * config.num_layers * np.prod(shape) * 4
  assert len({id(a) for a in pool.k + pool.v}) == 2 * config.num_layers
  # A pytree: device_put with one sharding places every array and keeps the record.
  pool = jax.device_put(pool, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert isinstance(pool, M.PagedPool)

  rng = np.random.default_rng(2)
  kv = rng.standard_normal((config.num_layers, 48, 2, config.num_kv_heads, config.head_dim),
                           dtype=np.float32)
  typed = layout.full_blocks_as_kv(layout.kv_to_full_blocks(kv))  # [3, L, 16, 2, H, D]
  pool = M.write_full_blocks_to_pages(pool, typed, [7, 2, 5])
  np.testing.assert_array_equal(np.asarray(M.read_kv_from_pages(pool, [7, 2, 5], 48)), kv)
  # Where a token lives: token 20 is block 1 (page 2), slot 4; K of layer 1 head-first.
  np.testing.assert_array_equal(np.asarray(pool.k[1][:, 2, 4]), kv[1, 20, 0])
  np.testing.assert_array_equal(np.asarray(pool.v[0][:, 7, 15]), kv[0, 15, 1])
  np.testing.assert_array_equal(np.asarray(pool.k[0][:, paged.SCRATCH_PAGE]), 0)
  # Padding ids name the scratch page: not written; the real pages are. A page named twice is
  # refused (the scatters are told their ids are unique).
  pool = M.write_kv_to_pages(pool, jnp.asarray(kv[:, :32] + 1), [4, paged.SCRATCH_PAGE])
  pool = M.write_kv_to_pages(pool, jnp.asarray(kv[:, :16] + 2), [paged.SCRATCH_PAGE])
  np.testing.assert_array_equal(np.asarray(M.read_kv_from_pages(pool, [4], 16)),
                                kv[:, :16] + 1)
  np.testing.assert_array_equal(np.asarray(pool.k[0][:, paged.SCRATCH_PAGE]), 0)
  np.testing.assert_array_equal(np.asarray(M.read_kv_from_pages(pool, [7, 2, 5], 48)), kv)
  with pytest.raises(ValueError, match="page_ids: a page named twice"):
    M.write_kv_to_pages(pool, jnp.asarray(kv[:, :32]), [6, 6])
  with pytest.raises(ValueError, match="PagedPool"):
    M.read_kv_from_pages(pool.k[0], [7], 16)
  with pytest.raises(ValueError, match="blocks_typed"):
    M.write_full_blocks_to_pages(pool, typed[:, :, :8], [7, 2, 5])


def test_paged_attention_is_validated_and_not_a_weight_property(tmp_path):
  with pytest.raises(ValueError, match="ModelConfig.paged_attention"):
    M.get_preset("tiny", paged_attention="flash")
  assert M.get_preset("tiny").paged_attention == "gather"
  # A checkpoint written before the field existed restores under either value.
  path = os.path.join(REPO, "checkpoints", "tiny-recall")
  stored = weights.read_config(path)
  assert stored.paged_attention == "gather"
  model = weights.restore_weights(path, stored.replace(paged_attention="pallas", attention="xla"))
  assert model.config.paged_attention == "pallas" and model.layers[0].config.attention == "xla"
  # One saved with the other value restores too.
  weights.save_weights(tmp_path / "ckpt", model)
  assert weights.read_config(tmp_path / "ckpt").paged_attention == "pallas"
  restored = weights.restore_weights(tmp_path / "ckpt", stored)
  assert restored.config.paged_attention == "gather"
  with pytest.raises(ValueError, match="model.num_layers"):
    weights.restore_weights(path, stored.replace(num_layers=3))


@pytest.mark.parametrize("field,bad", [
    ("pallas_k_splits", 0), ("pallas_k_splits", -4), ("pallas_k_splits", 2.0),
    ("pallas_k_splits", True), ("pallas_block_tokens", 0), ("pallas_block_tokens", 48),
    ("pallas_block_tokens", "128"), ("pallas_num_warps", 0), ("pallas_num_warps", 6),
    ("pallas_num_stages", 0), ("pallas_num_stages", 1.5), ("pallas_kernel", "triton")])
def test_pallas_blocking_fields_are_validated(field, bad):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    M.get_preset("tiny", **{field: bad})


@pytest.mark.parametrize("pallas_kernel", M.PALLAS_KERNELS)
def test_the_kernel_is_compiled_with_the_configs_warps_and_stages(monkeypatch, pallas_kernel):
  """pallas_num_warps / pallas_num_stages reach the Triton kernel pallas_kernel names (interpret
  mode on CPU ignores them, so the call itself is recorded)."""
  from jax.experimental.pallas.ops.gpu import paged_attention as jax_kernel

  from dualpath_jax.model import paged_kernel
  calls = {}

  def recorder(name):
    def record(q, *args, **kwargs):
      calls[name] = kwargs
      return q
    return record

  monkeypatch.setattr(jax_kernel, "paged_attention", recorder("jax"))
  monkeypatch.setattr(paged_kernel, "paged_attention", recorder("dualpath"))
  config = M.get_preset("tiny", paged_attention="pallas", pallas_num_warps=4, pallas_num_stages=3,
                        pallas_kernel=pallas_kernel)
  q = jax.numpy.zeros((2, config.num_heads, config.head_dim), config.jnp_dtype)
  pages = jax.numpy.zeros((config.num_kv_heads, 9, 16, config.head_dim), config.jnp_dtype)
  block_tables = jax.numpy.ones((2, 4), jax.numpy.int32)
  paged._pallas_attention(q, pages, pages, block_tables, jax.numpy.array([5, 9], jax.numpy.int32),
                          config)
  assert list(calls) == [pallas_kernel]
  assert (calls[pallas_kernel]["num_warps"], calls[pallas_kernel]["num_stages"]) == (4, 3)


def test_pallas_blocking_is_not_a_weight_property(tmp_path):
  config = M.get_preset("tiny")
  assert (config.pallas_k_splits, config.pallas_block_tokens) == (
      paged.PALLAS_MAX_K_SPLITS, paged.PALLAS_COMPUTE_BLOCK_TOKENS)
  assert M.get_preset("tiny", pallas_k_splits=np.int64(4)).pallas_k_splits == 4
  # A checkpoint written before the fields existed restores under any blocking ...
  path = os.path.join(REPO, "checkpoints", "tiny-recall")
  stored = weights.read_config(path)
  assert (stored.pallas_k_splits, stored.pallas_block_tokens) == (16, 128)
  blocked = stored.replace(paged_attention="pallas", pallas_k_splits=4, pallas_block_tokens=64)
  model = weights.restore_weights(path, blocked)
  assert model.config == blocked
  # ... one saved with another blocking restores under the defaults, and with_config swaps it.
  weights.save_weights(tmp_path / "ckpt", model)
  assert weights.read_config(tmp_path / "ckpt") == blocked
  assert weights.restore_weights(tmp_path / "ckpt", stored).config == stored
  swapped = weights.with_config(model, blocked.replace(pallas_k_splits=32))
  assert swapped.config.pallas_k_splits == 32
  assert swapped.embed.embedding.get_value() is model.embed.embedding.get_value()  # no copy


def test_bench_page_write_script(tmp_path):
  """scripts/bench_page_write.py on the tiny preset: a row per variant, every write's pages hold
  the prompt's KV, and a bad size is one 'error:' line."""
  import json
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "page_write.json"
  command = [sys.executable, os.path.join(repo, "scripts", "bench_page_write.py"),
             "--preset=tiny", "--pool_tokens=2048", "--read_tokens=64", "--repeats=2"]
  subprocess.run(command + ["--tokens=200", f"--out={out}"], cwd=repo, env=env, check=True,
                 capture_output=True, timeout=300)
  result = json.loads(out.read_text())
  assert [r["variant"] for r in result["rows"]] == ["scatter", "scatter_not_unique",
                                                    "transpose_only", "transpose_then_scatter",
                                                    "copy", "read"]
  assert all(r["median_s"] > 0 for r in result["rows"])
  assert [r["pages_hold_kv"] for r in result["rows"] if "scatter" in r["variant"]] == [True] * 3
  for flag in ("--tokens=4000", "--dtype=int3"):
    bad = subprocess.run(command + [flag, f"--out={out}"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0, flag
    assert bad.stderr.strip().splitlines()[-1].startswith("error:"), (flag, bad.stderr[-500:])


@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=6),
       slots=st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=1, max_size=8),
       steps=st.integers(1, 20), spare=st.integers(0, 12))
@settings(max_examples=60, deadline=None)
def test_prepare_decode_matches_extending_row_by_row(lengths, slots, steps, spare):
  """The one-pass prepare_decode (one new table a step) gives the tables, inputs and errors of
  `extend` row by row, and its tables stay valid (every page owned once or free)."""
  page_tokens, batch, max_pages = 16, 8, 16
  pages = sum(-(-n // page_tokens) for n in lengths)
  table = M.PageTable.create(pages + spare + 1, page_tokens)
  for i, n in enumerate(lengths):
    table = table.allocate(i, n)
  slots = [s if s is None or s < len(lengths) else None for s in slots]

  def reference(t):
    tables = np.full((batch, max_pages), M.SCRATCH_PAGE, np.int32)
    lens = np.zeros((batch,), np.int32)
    for row, seq in enumerate(slots):
      if seq is not None:
        t = t.extend(seq, 1)
        if len(t.block_tables[seq]) > max_pages:
          raise ValueError("max_pages")
        tables[row, :len(t.block_tables[seq])] = t.block_tables[seq]
        lens[row] = t.seq_lens[seq] - 1
    return t, tables, lens

  for _ in range(steps):
    try:
      expected = reference(table)
    except (M.OutOfPagesError, ValueError) as e:
      with pytest.raises(type(e)):
        table.prepare_decode(slots, batch_size=batch, max_pages=max_pages)
      return
    got = table.prepare_decode(slots, batch_size=batch, max_pages=max_pages)
    assert got[0].free_pages == expected[0].free_pages
    assert dict(got[0].block_tables) == dict(expected[0].block_tables)
    assert dict(got[0].seq_lens) == dict(expected[0].seq_lens)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    table = got[0]
    owned = [p for ps in table.block_tables.values() for p in ps] + list(table.free_pages)
    assert sorted(owned) == list(range(1, table.num_pages))
    with pytest.raises(TypeError):  # still read-only
      table.block_tables[0] = ()
