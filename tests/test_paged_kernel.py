"""The project's own Pallas paged decode-attention kernel (model/paged_kernel.py), in Pallas
interpret mode on CPU, against a dense softmax over each row's first `length` tokens: rows of
different lengths (partitions wholly past a row's end skipped, a partial compute block masked, a
row of length 0 giving zeros), pages in any order, one page or several per compute block; its
shape errors; and that it lowers to a Triton kernel for CUDA (checked here, without a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.model import paged_kernel


def _dense_reference(q, k_pages, v_pages, block_tables, lengths):
  """softmax(q k^T / sqrt(D)) v over each row's first length tokens, float64 (numpy)."""
  q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
  batch, num_heads, head_dim = q.shape
  kv_heads, _, page_tokens, _ = k_pages.shape
  group = num_heads // kv_heads
  out = np.zeros_like(q)
  for b in range(batch):
    n = int(lengths[b])
    if n == 0:
      continue
    pages = np.asarray(block_tables[b])
    for h in range(num_heads):
      k = k_pages[h // group, pages].reshape(-1, head_dim)[:n]
      v = v_pages[h // group, pages].reshape(-1, head_dim)[:n]
      s = k @ q[b, h] / np.sqrt(head_dim)
      w = np.exp(s - s.max())
      out[b, h] = (w / w.sum()) @ v
  return out


@pytest.fixture(scope="module")
def pool():
  rng = np.random.default_rng(3)
  kv_heads, num_pages, page_tokens, head_dim = 2, 40, 8, 16
  k = rng.normal(size=(kv_heads, num_pages, page_tokens, head_dim)).astype(np.float32)
  v = rng.normal(size=(kv_heads, num_pages, page_tokens, head_dim)).astype(np.float32)
  q = rng.normal(size=(4, 6, head_dim)).astype(np.float32)  # 3 query heads per KV head
  tables = rng.permutation(np.arange(1, num_pages))[:32].reshape(4, 8).astype(np.int32)
  # 61: the last partition partly masked; 9: most partitions skipped; 64: every page full.
  lengths = np.array([61, 9, 0, 64], np.int32)
  return q, k, v, tables, lengths


@pytest.mark.parametrize("k_splits,pages_per_compute_block,page_gather", [
    (1, 1, False), (2, 2, False), (4, 1, False), (2, 4, False), (8, 1, False), (2, 2, True),
    (4, 1, True)])
def test_kernel_equals_dense_softmax(pool, k_splits, pages_per_compute_block, page_gather):
  """Every blocking; page_gather (the diagnostic load of JAX's kernel) gives the same result."""
  q, k, v, tables, lengths = pool
  got = paged_kernel.paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.asarray(tables), jnp.asarray(lengths), k_splits=k_splits,
                                     pages_per_compute_block=pages_per_compute_block,
                                     interpret=True, page_gather=page_gather)
  assert got.shape == q.shape and got.dtype == jnp.float32
  want = _dense_reference(q, k, v, tables, lengths)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
  # The XLA reference that scripts/check_paged_kernel.py compares with on GPUs agrees too.
  xla = paged_kernel.paged_attention_reference(q, k, v, tables, lengths)
  np.testing.assert_allclose(np.asarray(xla), want, atol=2e-5, rtol=0)
  assert not np.asarray(got)[2].any()  # length 0: zeros, not NaN


def test_kernel_in_bfloat16_keeps_the_input_dtype(pool):
  q, k, v, tables, lengths = pool
  as_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
  got = paged_kernel.paged_attention(*as_bf16, jnp.asarray(tables), jnp.asarray(lengths),
                                     k_splits=2, pages_per_compute_block=2, interpret=True)
  assert got.dtype == jnp.bfloat16
  want = _dense_reference(*(np.asarray(a.astype(jnp.float32)) for a in as_bf16), tables, lengths)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=0)


def test_kernel_rejects_shapes_that_do_not_fit(pool):
  q, k, v, tables, lengths = (jnp.asarray(a) for a in pool)
  with pytest.raises(ValueError, match="k_splits=3"):
    paged_kernel.paged_attention(q, k, v, tables, lengths, k_splits=3, pages_per_compute_block=1,
                                 interpret=True)
  with pytest.raises(ValueError, match="compute blocks of 4 pages"):
    paged_kernel.paged_attention(q, k, v, tables, lengths, k_splits=4, pages_per_compute_block=4,
                                 interpret=True)
  with pytest.raises(ValueError, match="lengths"):
    paged_kernel.paged_attention(q, k, v, tables, lengths[:2], k_splits=2,
                                 pages_per_compute_block=1, interpret=True)
  with pytest.raises(ValueError, match="k_pages"):
    paged_kernel.paged_attention(q[:, :5], k, v, tables, lengths, k_splits=2,
                                 pages_per_compute_block=1, interpret=True)
  # A pool too large for int32 element offsets (checked from shapes: nothing is allocated).
  huge = jax.ShapeDtypeStruct((4, 2 ** 16, 64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="2\\*\\*31"):
    jax.eval_shape(lambda q, k, v, t, n: paged_kernel.paged_attention(
        q, k, v, t, n, k_splits=2, pages_per_compute_block=1),
        jax.ShapeDtypeStruct((4, 28, 128), jnp.bfloat16), huge, huge,
        jax.ShapeDtypeStruct((4, 8), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32))


@pytest.mark.parametrize("k_splits,pages_per_compute_block", [(26, 1), (13, 2)])
def test_kernel_lowers_to_triton_for_cuda(k_splits, pages_per_compute_block):
  """The Qwen2.5-7B decode shape at 8K context in 64-token pages (130 pages a row), lowered for
  CUDA on this machine: the Pallas-to-Triton lowering accepts the kernel and launches one
  program per (row, KV head, partition). Compiling the Triton IR needs a GPU."""
  q = jax.ShapeDtypeStruct((32, 28, 128), jnp.bfloat16)
  pages = jax.ShapeDtypeStruct((4, 4200, 64, 128), jnp.bfloat16)
  tables = jax.ShapeDtypeStruct((32, 130), jnp.int32)
  lengths = jax.ShapeDtypeStruct((32,), jnp.int32)
  text = paged_kernel.paged_attention.trace(
      q, pages, pages, tables, lengths, k_splits=k_splits,
      pages_per_compute_block=pages_per_compute_block).lower(
          lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text
  assert f"grid_x = 32 : i32, grid_y = 4 : i32, grid_z = {k_splits} : i32" in text


def test_gpu_check_script_runs_and_reports(tmp_path):
  """scripts/check_paged_kernel.py (the GPU correctness check of both kernels) on the tiny preset
  in interpret mode: every kernel within tolerance of the reference, empty rows zero."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "check.json"
  subprocess.run([sys.executable, os.path.join(repo, "scripts", "check_paged_kernel.py"),
                  "--preset=tiny", "--page_tokens=8", "--max_context=40", "--batch=8",
                  "--blockings=2,16;1,8", f"--out={out}"], check=True, cwd=repo,
                 env={**os.environ, "PYTHONPATH": repo}, capture_output=True)
  result = json.loads(out.read_text())
  assert result["passed"] and [r["kernel"] for r in result["rows"]] == ["jax", "dualpath",
                                                                         "dualpath"]
  assert min(result["lengths"]) == 0 and max(result["lengths"]) == 40
  for row in result["rows"]:
    assert row["finite"] and row["max_abs_error_vs_reference"] <= result["tolerance"]
  assert all(r["empty_rows_zero"] for r in result["rows"][1:])
  for bad, message in (("--blockings=2;1,8", "--blockings: expected k_splits,block_tokens"),
                       ("--blockings=0,16", "ModelConfig.pallas_k_splits"),
                       ("--batch=0", "--batch must be positive")):
    run = subprocess.run([sys.executable, os.path.join(repo, "scripts", "check_paged_kernel.py"),
                          "--preset=tiny", bad], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                         capture_output=True, text=True)
    assert run.returncode != 0 and f"error: {message}" in run.stderr
    assert "Traceback" not in run.stderr


def test_kernel_bench_script_runs_each_point(tmp_path):
  """scripts/bench_paged_kernel.py on the tiny preset in interpret mode: a row per point with a
  positive time and read rate; the diagnostic variant says what it skips; bad points fail."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "bench.json"
  command = [sys.executable, os.path.join(repo, "scripts", "bench_paged_kernel.py"),
             "--preset=tiny", "--batch=2", "--context=40", "--page_tokens=8", "--calls=2",
             "--repeats=1", f"--out={out}"]
  env = {**os.environ, "PYTHONPATH": repo}
  subprocess.run(command + ["--points=jax:2,16;jax_fixed_trip:2,16;dualpath:2,8;"
                             "dualpath_page_gather:2,16"], check=True, cwd=repo, env=env,
                 capture_output=True)
  result = json.loads(out.read_text())
  assert [(r["kernel"], r["k_splits"], r["block_tokens"]) for r in result["rows"]] == [
      ("jax", 2, 16), ("jax_fixed_trip", 2, 16), ("dualpath", 2, 8),
      ("dualpath_page_gather", 2, 16)]
  assert all(r["per_call_s"] > 0 and r["kv_read_gbps"] > 0 for r in result["rows"])
  assert ["diagnostic" in r for r in result["rows"]] == [False, True, False, True]
  assert result["kv_bytes_a_call"] == 2 * 41 * 2 * 2 * 16 * 2  # rows, tokens, K+V, heads, D, bf16
  bad = subprocess.run(command + ["--points=triton:2,16"], cwd=repo, env=env,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "error: --points: kernel must be one of" in bad.stderr
  assert "Traceback" not in bad.stderr
