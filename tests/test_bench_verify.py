"""bench.verify: the benchmarks' on-device check of moved bytes, and scripts/bench_h2d.py."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.bench.verify import device_bytes_equal, expected_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_bytes_equal_compares_every_byte_in_order():
  host = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(ml_dtypes.bfloat16)
  d0 = jax.devices()[0]
  parts = [jax.device_put(host[:2], d0), jax.device_put(host[2:], d0)]
  want = expected_bytes(host, parts[0])
  assert want.dtype == np.uint8 and want.shape == (host.nbytes,)
  assert device_bytes_equal(parts, want)
  assert not device_bytes_equal(parts[::-1], want)  # the parts' order counts
  assert not device_bytes_equal(parts[:1], want)  # too few bytes
  flipped = host.copy()
  flipped.view(np.uint8)[5] ^= 1  # one bit of one byte
  assert not device_bytes_equal([jax.device_put(flipped, d0)], want)
  # bytes, not values: -0.0 equals 0.0 as a number but not as bytes
  zeros = np.zeros(4, np.float32)
  negative = -zeros
  assert not device_bytes_equal([jax.device_put(negative, d0)],
                                expected_bytes(zeros, jax.device_put(zeros, d0)))
  with pytest.raises(ValueError, match="parts"):
    device_bytes_equal([], want)
  # expected bytes from a device array (no D2H) equal those from its host copy
  on_device = jax.device_put(host, d0)
  assert device_bytes_equal(parts, expected_bytes(on_device, parts[0]))


def test_device_bytes_equal_rejects_a_part_on_another_device():
  if len(jax.devices()) < 2:
    pytest.skip("needs two devices")
  host = np.arange(8, dtype=np.uint8)
  want = expected_bytes(host, jax.device_put(host, jax.devices()[0]))
  assert not device_bytes_equal([jax.device_put(host, jax.devices()[1])], want)


def test_bench_h2d_script(tmp_path):
  """scripts/bench_h2d.py on CPU: a row per configuration with every repeat, bytes checked;
  kinds the CPU lacks are listed as unavailable; bad input is one 'error:' line."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "h2d.json"
  command = [sys.executable, os.path.join(REPO, "scripts", "bench_h2d.py"), "--total_mib=8",
             "--piece_mib=2,4", "--bound_mib=0,4", "--repeats=2", "--warmup=1"]
  subprocess.run(command + ["--sources=numpy,jax_pinned_array,dma_mapped",
                            "--copies=device_put,engine", "--dtypes=uint8,bfloat16",
                            "--shapes=flat,kv", "--issuers=main,pool", "--before=none,asarray",
                            f"--out={out}"],
                 cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  result = json.loads(out.read_text())
  rows = result["rows"]
  # numpy: 2 copies, jax_pinned_array: device_put only; x 2 pieces x 2 bounds x 2 dtypes x
  # 2 shapes x 2 issuers x 2 befores
  assert len(rows) == (2 + 1) * 2 * 2 * 2 * 2 * 2 * 2
  assert all(r["bytes_equal"] and len(r["times"]) == 2 and r["gbps"] > 0 for r in rows)
  assert {(r["piece_bytes"], r["pieces"]) for r in rows} == {(2 << 20, 4), (4 << 20, 2)}
  assert {r["bound_pieces"] for r in rows if r["bound_bytes"]} == {1, 2}
  assert [u["source"] for u in result["unavailable"]] == ["dma_mapped"]  # the CPU client
  for flag in ("--sources=hugepages", "--piece_mib=0", "--dtypes=int3", "--before=later"):
    bad = subprocess.run(command + [flag, f"--out={out}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0, flag
    assert bad.stderr.strip().splitlines()[-1].startswith("error:"), (flag, bad.stderr[-500:])
