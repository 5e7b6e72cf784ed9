"""Measures the data plane's host-memory copies at 1, 2, ... copy threads (host_copy's pool).

One request's hit of `tokens` tokens of Qwen2.5-7B geometry (28 layers, 64-token Full Blocks of
3.67 MB), read as a list of blocks: stacking the list (a first chunk's read blocks), the
per-layer gather into a reused and into a fresh buffer (layerwise loading), and the transpose
into model KV (whole-prompt loading, the DE-read part merged into the DE buffer). Reports the
best of `repeats` GB/s (1e9 bytes/s) per copy and thread count; no JAX involved.

  python scripts/bench_host_copy.py --threads=1,2 --out=/tmp/host_copy.json
  python3 scripts/bench_host_copy.py --threads=1,2,4,8,16 --out=$OUT/host_copy.json  # GPU host
"""

import datetime
import json
import os
import platform
import subprocess
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "JSON file to write.", required=True)
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "Copy-pool sizes to measure.")
_TOKENS = flags.DEFINE_integer("tokens", 16000, "Tokens of the hit (rounded down to blocks).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best is reported).")
_ONE = flags.DEFINE_integer("one", 0, "Internal: measure at this pool size and print JSON.")


def _measure(tokens: int, repeats: int) -> dict:
  import time

  import numpy as np

  from dualpath_jax.kvstore import KVLayout, host_copy
  from dualpath_jax.model import get_preset

  layout = KVLayout.for_model(get_preset("qwen2.5-7b", dtype="bfloat16"))
  n = tokens // layout.block_tokens
  rng = np.random.default_rng(0)
  blocks = [rng.integers(0, 255, size=layout.full_block_shape, dtype=np.uint8) for _ in range(n)]
  nbytes = n * layout.full_block_bytes
  stacked = host_copy.stack(blocks)
  out = np.empty(n * layout.layer_block_bytes, np.uint8)
  copies = {
      "stack_read_blocks": lambda: host_copy.stack(blocks),
      "layer_gather_reused_buffer": lambda: [layout.layer_kv(stacked, l, out=out)
                                             for l in range(layout.num_layers)],
      "layer_gather_fresh_buffer": lambda: [layout.layer_kv(stacked, l)
                                            for l in range(layout.num_layers)],
      "full_blocks_to_kv": lambda: layout.full_blocks_to_kv(stacked),
  }
  result = dict(threads=host_copy.workers(), bytes=nbytes, gbps={})
  for name, fn in copies.items():
    fn()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    result["gbps"][name] = nbytes / best / 1e9
  return result


def main(argv):
  del argv
  if _ONE.value:
    print(json.dumps(_measure(_TOKENS.value, _REPEATS.value)))
    return
  rows = []
  for threads in map(int, _THREADS.value):
    # A process per pool size: the pool is sized once per process (DUALPATH_COPY_THREADS).
    env = dict(os.environ, DUALPATH_COPY_THREADS=str(threads))
    line = subprocess.run([sys.executable, __file__, f"--one={threads}",
                           f"--tokens={_TOKENS.value}", f"--repeats={_REPEATS.value}",
                           f"--out={_OUT.value}"],
                          env=env, check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(line.strip().splitlines()[-1]))
    print(f"threads {threads:3d}: " + ", ".join(f"{k} {v:.2f} GB/s"
                                                 for k, v in rows[-1]["gbps"].items()))
  doc = dict(date=datetime.date.today().isoformat(), host=platform.node(), cpus=os.cpu_count(),
             python=platform.python_version(), tokens=_TOKENS.value, repeats=_REPEATS.value,
             rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(doc, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
