"""scripts/bench_pe_layer.py: the PE's host work per layer, on CPU with the tiny model."""

import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))


def test_bench_pe_layer_script(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "pe_layer.json"
  command = [sys.executable, os.path.join(REPO, "scripts", "bench_pe_layer.py"),
             "--preset=tiny", "--dtype=float32", "--attention=einsum", "--kv_splits=0",
             "--append=40", "--host_memory=numpy", "--repeats=2", "--warmup=1"]
  subprocess.run(command + ["--rows=1,3", "--prefix_tokens=100", f"--out={out}"], cwd=REPO,
                 env=env, check=True, capture_output=True, timeout=300)
  result = json.loads(out.read_text())
  assert result["meta"]["xla_flags"] == "" and result["meta"]["preset"] == "tiny"
  rows = result["rows"]
  assert [(r["rows"], r["variant"]) for r in rows] == [
      (n, v) for n in (1, 3) for v in ("layers", "runtime", "loads_first")]
  for r in rows:
    assert r["logits_equal"] and len(r["times_s"]) == 2
    assert (r["tp"], r["tn"], r["padded_rows"]) == (128, 64, 1 if r["rows"] == 1 else 4)
    loads = {"h2d", "pad"} | ({"stack"} if r["rows"] > 1 else set())  # one row: no stack
    kinds = {"embed", "layer", "logits"} | (loads if r["variant"] != "layers" else set())
    assert set(r["host_s"]) == kinds  # the 'layers' variant loads nothing in the clock
    assert 0 < r["host_total_s"] <= max(r["times_s"]) and r["host_fraction"] > 0
  for flag in ("--rows=0", "--host_memory=hugepages", "--preset=qwen9", "--repeats=0"):
    bad = subprocess.run(command + [flag, "--prefix_tokens=100", f"--out={out}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0, flag
    assert bad.stderr.strip().splitlines()[-1].startswith("error:"), (flag, bad.stderr[-500:])


def test_bench_pe_layer_catches_a_wrong_pad(monkeypatch):
  import bench_pe_layer

  from dualpath_jax.model.config import get_preset
  from dualpath_jax.runtime import prefill_shard

  pad = prefill_shard._pad_to

  def lossy_pad(x, length, axis):  # the row's first token is lost (attention ignores order)
    return pad(x.at[0].set(0), length, axis)

  monkeypatch.setattr(prefill_shard, "_pad_to", lossy_pad)
  config = get_preset("tiny", dtype="float32", attention="einsum", prefill_kv_splits=0)
  with pytest.raises(RuntimeError, match="logits differ"):
    bench_pe_layer.measure(jax.devices()[0], config, 2, 100, 40, 64, "numpy", 1, 0, 0,
                           log=lambda line: None)
