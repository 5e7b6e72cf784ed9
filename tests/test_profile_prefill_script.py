"""scripts/profile_prefill.py: a bad model field is one 'error:' line, before any profiling."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flag, field", [("--kv_splits=-1", "prefill_kv_splits"),
                                         ("--preset=qwen9", "qwen9")])
def test_bad_model_flags_are_one_error_line(tmp_path, flag, field):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "cost.json"
  bad = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "profile_prefill.py"),
                        flag, f"--out={out}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and field in last, bad.stderr[-500:]
  assert not out.exists()  # nothing profiled, nothing written
