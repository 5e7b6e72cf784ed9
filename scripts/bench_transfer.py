"""Measures device->device movers, H2D and D2H for Layer-Block-sized KV arrays.

The arrays are one layer of n Full Blocks of Qwen2.5-7B (28 layers, 4 KV heads, head dim 128,
bf16, 64-token blocks: 128 KiB a Layer Block, 4 MiB for 32 blocks), i.e. the unit a layerwise
prefill moves per layer. Moves go from the first prefill engine to the first decode engine of a
1P1D topology (devices 0 and 1). Reports the median GB/s (1e9 bytes/s) over repeats after warm-up.

  python scripts/bench_transfer.py                          # CPU: 8 simulated devices
  python scripts/bench_transfer.py --out=docs/perf/transfer_h100.json   # GPUs, unchanged

On CPU the script simulates 8 host devices (XLA_FLAGS is set before jax is imported unless the
caller set it); on GPUs that flag only concerns the host platform and changes nothing.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out", "docs/perf/transfer_cpu.json", "JSON file to write.")
_BLOCKS = flags.DEFINE_list("blocks", ["1", "8", "32", "128"], "Blocks per moved layer.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed repeats first (compilation, allocation).")


def main(argv):
  del argv
  import jax
  import numpy as np

  from dualpath_jax.bench.timing import median_gbps
  from dualpath_jax.engines import TopologyConfig, build_topology
  from dualpath_jax.kvstore.layout import KVLayout
  from dualpath_jax.transfer import device_to_host, has_pinned_host, host_to_device, make_mover

  layout = KVLayout(num_layers=28, num_kv_heads=4, head_dim=128, dtype="bfloat16",
                    block_tokens=64)  # Qwen2.5-7B
  topo = build_topology(TopologyConfig(num_prefill_engines=1, num_decode_engines=1))
  src, dst = topo.prefill_engines[0], topo.decode_engines[0]
  movers = {name: make_mover(name) for name in ("device_put", "shard_map")}
  staging = ["direct"] + (["pinned"] if has_pinned_host(dst.replicated_sharding) else [])
  rng = np.random.default_rng(0)
  rows = []
  for num_blocks in map(int, _BLOCKS.value):
    blocks = rng.integers(0, 256, (num_blocks, *layout.full_block_shape), dtype=np.uint8)
    host = layout.layer_kv(blocks, 0)  # [n*B, 2, H, D] bf16
    nbytes = host.nbytes
    x = host_to_device(host, src)

    def record(kind, name, fn):
      gbps, median_s = median_gbps(fn, nbytes, _REPEATS.value, _WARMUP.value)
      rows.append(dict(kind=kind, impl=name, blocks=num_blocks, bytes=nbytes, gbps=gbps,
                       median_s=median_s))
      print(f"{kind:4s} {name:10s} {num_blocks:4d} blocks {nbytes / 2**20:8.2f} MiB "
            f"{gbps:8.2f} GB/s  {median_s * 1e3:8.3f} ms", flush=True)

    for name, mover in movers.items():
      record("d2d", name, lambda mover=mover: mover.move(x, dst))
    for mode in staging:
      record("h2d", mode, lambda mode=mode: host_to_device(host, dst, staging=mode))
    out = np.empty_like(host)
    record("d2h", "into_out", lambda: device_to_host(x, out))

  by_size = {}
  for r in rows:
    if r["kind"] == "d2d":
      by_size.setdefault(r["blocks"], {})[r["impl"]] = r["gbps"]
  wins = {name: sum(max(v, key=v.get) == name for v in by_size.values()) for name in movers}
  result = dict(
      date=datetime.date.today().isoformat(),
      device=f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
      num_devices=len(jax.devices()), host=platform.node(), cpu_count=os.cpu_count(),
      jax=jax.__version__, layout="qwen2.5-7b layer of n Full Blocks (bf16, 64-token blocks)",
      repeats=_REPEATS.value, warmup=_WARMUP.value, rows=rows,
      faster_mover=max(wins, key=wins.get), mover_wins_by_size=wins)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  print(f"faster mover: {result['faster_mover']} (wins by size: {wins}); wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
