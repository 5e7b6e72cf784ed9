"""scripts/bench_decode_host.py: the DE's host work per decode step, on CPU with the tiny model."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_host_script(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "decode_host.json"
  command = [sys.executable, os.path.join(REPO, "scripts", "bench_decode_host.py"),
             "--preset=tiny", "--dtype=float32", "--paged_attention=gather", "--steps=6",
             "--rounds=2", f"--out={out}"]
  subprocess.run(command + ["--shapes=2x128,3x64", "--chunks_us=0,200",
                            "--switch_intervals_s=0.005,0.001", "--in_flight=1,2",
                            "--copy_contenders=h2d"],
                 cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  result = json.loads(out.read_text())
  assert result["meta"]["xla_flags"] == "" and result["meta"]["preset"] == "tiny"
  rows = result["rows"]
  # Per shape and depth: the baseline (no contender, so no switch interval to vary), then each
  # contender under each switch interval.
  assert [(r["batch"], r["context"], r["in_flight"], r["contender"], r["switch_interval_s"])
          for r in rows] == [
      (b, c, d, *cond) for b, c in ((2, 128), (3, 64)) for d in (1, 2)
      for cond in (("none", 0.005), ("python:200", 0.005), ("python:200", 0.001),
                   ("h2d", 0.005))]
  for r in rows:
    assert r["steps"] == 12  # steps x rounds
    assert 0 < r["dispatch_median_s"] < r["period_median_s"] and r["wait_median_s"] > 0
    assert r["period_p90_s"] >= r["period_median_s"]
    assert (r["contender_rounds"] > 0) == (r["contender"] != "none")
    assert r["contender_chunk_us"] == (200 if r["contender"].startswith("python") else 0)
    if r["contender"] == "none":
      assert r["period_inflation"] == 0
  for flag in ("--copy_contenders=d2h", "--in_flight=0", "--shapes=2by128", "--chunks_us=100,0",
               "--switch_intervals_s=0", "--steps=0",
               "--preset=qwen9"):
    bad = subprocess.run(command + [flag], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0, flag
    assert bad.stderr.strip().splitlines()[-1].startswith("error:"), (flag, bad.stderr[-500:])
