"""On a CUDA GPU: the CUDA-runtime D2H copies land the right bytes (transfer/pinned_memory.py).

cuda_copy_to_host (a head of an array along axis 1) and cuda_copy_rows_to_host (rows of a batch
array, batch axis 0 and 1), into pageable and page-locked ('cuda_registered') memory, each
compared with numpy. CPU tests only emulate these copies; run this after changing them:

  PYTHONPATH=. python3 scripts/check_cuda_copies.py     # prints ALL OK or fails
"""

from __future__ import annotations

import jax
import numpy as np

from dualpath_jax.transfer import pinned_memory as pm


def main() -> None:
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise SystemExit(f"needs a CUDA GPU, found {device}")
  rng = np.random.default_rng(0)
  results = []
  for kind in ("numpy", "cuda_registered"):
    mem = pm.allocate(3 * 10 * 2 * 4 * 2, kind).view(np.int16).reshape(3, 10, 2, 4)
    x = jax.device_put(rng.integers(0, 999, (3, 8, 2, 4), np.int16), device)
    mem[:] = 0
    pm.cuda_copy_to_host(x, mem[:, 2:7], axis=1)
    want = np.zeros_like(mem)
    want[:, 2:7] = np.asarray(x)[:, :5]
    results.append(("to_host", kind, bool((mem == want).all())))
    for batch_axis in (0, 1):
      shape = (4, 8, 2, 4) if batch_axis == 0 else (3, 4, 8, 2, 4)
      batch = jax.device_put(rng.integers(0, 999, shape, np.int16), device)
      mem[:] = 0
      heads = (mem[1:2, 0:5], mem[1:2, 5:8]) if batch_axis == 0 else (mem[:, 0:5], mem[:, 5:8])
      pm.cuda_copy_rows_to_host(batch, [(2, heads[0]), (3, heads[1])], batch_axis)
      host = np.asarray(batch)
      want = np.zeros_like(mem)
      if batch_axis == 0:
        want[1, 0:5], want[1, 5:8] = host[2, :5], host[3, :3]
      else:
        want[:, 0:5], want[:, 5:8] = host[:, 2, :5], host[:, 3, :3]
      results.append(("rows", kind, batch_axis, bool((mem == want).all())))
  print(results)
  if not all(r[-1] for r in results):
    raise SystemExit("wrong bytes landed")
  print("ALL OK")


if __name__ == "__main__":
  main()
