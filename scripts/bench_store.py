"""Throughput of KVBlockStore against raw tensorstore zarr3 reads of the very same chunks.

Writes N Full Blocks of a model's geometry through the store, then reads them back in batches
(read_blocks_async, `--inflight` batches at once) and, in the same run, reads the same slots
straight from the segment arrays with tensorstore (every slot's read issued, then waited, with the
same batches and the same number in flight). The difference is the store's own cost: index reads,
record decoding and the Python bookkeeping around each block. Both paths verify the zarr3 crc32c.

Cold reads evict the chunk files from the page cache first (posix_fadvise DONTNEED, which drops
clean pages without root; blocks are fsynced on write so their pages are clean); a virtual disk
may still be cached by the host. Warm reads run after a pass has loaded the page cache.

  python scripts/bench_store.py --out docs/perf/kvstore_bench.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import tempfile
import time

import numpy as np
import tensorstore as ts

from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec, chain_block_hashes
from dualpath_jax.model.config import get_preset


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="qwen2.5-7b", help="model preset giving the KV geometry")
  parser.add_argument("--total_gb", type=float, default=1.0, help="bytes to write, in GB (1e9)")
  parser.add_argument("--blocks", type=int, default=0, help="blocks to write (overrides total_gb)")
  parser.add_argument("--batch_blocks", type=int, default=32, help="blocks per read/write call")
  parser.add_argument("--inflight", type=int, default=2, help="read calls in flight at once")
  parser.add_argument("--passes", type=int, default=6,
                      help="cold and warm passes per path; the median is reported")
  parser.add_argument("--driver", default="file", choices=("file", "memory"),
                      help="store driver: 'file' (a folder) or 'memory' (tensorstore's in-memory "
                           "kvstore, as the GPU benchmark's end-to-end jobs use; --landing only)")
  parser.add_argument("--path", default="", help="store folder (default: a fresh temp folder)")
  parser.add_argument("--keep", action="store_true", help="keep the store folder afterwards")
  parser.add_argument("--landing", action="store_true",
                      help="only compare landing reads layer-major (warm): read_blocks + a copy a "
                           "block (full_blocks_to_kv) against read_blocks_into the buffer")
  parser.add_argument("--out", default="docs/perf/kvstore_bench.json", help="JSON result file")
  args = parser.parse_args()
  if args.driver == "memory" and not args.landing:
    parser.error("--driver=memory: only with --landing (cold reads and the raw path need files)")
  return args


def evict_page_cache(folder: str) -> None:
  for parent, _, files in os.walk(folder):
    for name in files:
      fd = os.open(os.path.join(parent, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  args = parse_args()
  load_before = os.getloadavg()[0]
  layout = KVLayout.for_model(get_preset(args.model))
  block_bytes = layout.full_block_bytes
  num_blocks = args.blocks or max(1, round(args.total_gb * 1e9 / block_bytes))
  folder = args.path or (tempfile.mkdtemp(prefix="kvstore_bench_") if args.driver == "file"
                         else "kvstore_bench")
  spec = StoreSpec(driver=args.driver, path=folder)
  store = KVBlockStore.open(spec, layout)
  namespace = "bench"
  tokens = np.random.default_rng(0).integers(0, 150_000, num_blocks * layout.block_tokens)
  hashes = chain_block_hashes(tokens, layout.block_tokens)
  batches = [hashes[i:i + args.batch_blocks] for i in range(0, num_blocks, args.batch_blocks)]
  total_bytes = num_blocks * block_bytes
  print(f"{args.model}: {num_blocks} Full Blocks of {block_bytes / 1e6:.2f} MB "
        f"({total_bytes / 1e9:.2f} GB) in {folder}; batches of {args.batch_blocks}, "
        f"{args.inflight} in flight")

  # Write: blocks generated per batch (random bytes, incompressible), timed without generation.
  rng = np.random.default_rng(1)
  write_s = 0.0
  for batch in batches:
    blocks = rng.integers(0, 256, (len(batch), *layout.full_block_shape), dtype=np.uint8)
    write_s += timed(lambda: store.write_blocks(namespace, batch, blocks))
  assert store.stats.blocks_written == num_blocks

  pool = concurrent.futures.ThreadPoolExecutor(args.inflight)
  if args.landing:
    landing(args, store, namespace, batches, layout, pool, total_bytes, load_before)
    pool.shutdown()
    store.close()
    if args.driver == "file" and not args.path and not args.keep:
      shutil.rmtree(folder)
    return

  # The raw path reads the same slots of the same segment arrays, located once, untimed.
  index = ts.KvStore.open(spec.kvstore_spec()).result()
  records = [json.loads(index.read(f"ns/{namespace}/index/{h}").result().value) for h in hashes]
  slot_of = {h: (r["segment"], r["slot"]) for h, r in zip(hashes, records)}
  raw_context = ts.Context(spec.context_spec())
  segments = {s: ts.open({"driver": "zarr3", "fill_missing_data_reads": False},
                         kvstore=index / f"ns/{namespace}/segments/{s}/", open=True,
                         context=raw_context).result()
              for s in {r["segment"] for r in records}}

  def raw_read_batch(batch):
    reads = [segments[slot_of[h][0]][slot_of[h][1]].read() for h in batch]
    return [read.result() for read in reads]

  def store_pass():
    # Keeps `inflight` calls in flight, like storage links issuing reads for queued requests.
    futures = [pool.submit(lambda b: store.read_blocks_async(namespace, b).result(), b)
               for b in batches]
    misses = sum(block is None for f in futures for block in f.result())
    assert misses == 0, f"{misses} store misses"

  def raw_pass():
    for f in [pool.submit(raw_read_batch, b) for b in batches]:
      f.result()

  results = {"write": total_bytes / write_s / 1e9}
  passes = {"store": store_pass, "raw": raw_pass}
  cold, warm = {"store": [], "raw": []}, {"store": [], "raw": []}
  for i in range(args.passes):
    # Alternate which path goes first: the virtual disk has caches of its own that we cannot drop.
    order = ("store", "raw") if i % 2 == 0 else ("raw", "store")
    for path in order:
      evict_page_cache(folder)
      cold[path].append(total_bytes / timed(passes[path]) / 1e9)
    for path in order:
      passes[path]()  # loads the page cache
      warm[path].append(total_bytes / timed(passes[path]) / 1e9)
  for path in ("store", "raw"):
    results[f"{path}_read_cold"] = float(np.median(cold[path]))
    results[f"{path}_read_warm"] = float(np.median(warm[path]))
  # Ratio of adjacent passes, which share the machine's state of the moment; median over passes.
  for kind, runs in (("cold", cold), ("warm", warm)):
    results[f"store_over_raw_{kind}"] = float(np.median(np.array(runs["store"]) /
                                                        np.array(runs["raw"])))

  best = {f"{path}_read_{kind}": max(runs[path]) for kind, runs in (("cold", cold), ("warm", warm))
          for path in ("store", "raw")}
  print(f"{'GB/s (1e9 B/s)':<22}{'median':>8}{'best':>8}")
  for name, value in results.items():
    print(f"{name:<22}{value:>8.3f}{best[name] if name in best else value:>8.3f}")
  report = {"model": args.model, "layout": layout.__dict__, "full_block_bytes": block_bytes,
            "blocks": num_blocks, "total_bytes": total_bytes, "batch_blocks": args.batch_blocks,
            "inflight": args.inflight, "passes": args.passes, "cpu_count": os.cpu_count(),
            "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "gb_per_s": {k: v for k, v in results.items() if "over" not in k},
            "best_gb_per_s": best, "cold_passes_gb_per_s": cold, "warm_passes_gb_per_s": warm,
            "store_over_raw": {"cold": results["store_over_raw_cold"],
                               "warm": results["store_over_raw_warm"]},
            "stats": store.stats.__dict__}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  pool.shutdown()
  store.close()
  if not args.path and not args.keep:
    shutil.rmtree(folder)


def landing(args, store, namespace, batches, layout, pool, total_bytes, load_before) -> None:
  """Reads landing layer-major in one buffer per batch (the runtime's node-buffer layout): the
  store's arrays then a copy a block, against the store writing into the buffer's views."""
  bt = layout.block_tokens
  buffers = [np.zeros((layout.num_layers, len(b) * bt, layout.token_layer_bytes), np.uint8)
             for b in batches]

  def then_copy(i):
    layout.full_blocks_to_kv(store.read_blocks(namespace, batches[i]), out=buffers[i].reshape(-1))

  def into(i):
    views = [buffers[i][:, k * bt:(k + 1) * bt] for k in range(len(batches[i]))]
    assert all(store.read_blocks_into(namespace, batches[i], views))

  runs = {"read_then_copy": then_copy, "read_into": into}
  for fn in runs.values():  # warm the page cache (and check)
    for f in [pool.submit(fn, i) for i in range(len(batches))]:
      f.result()
  rates = {name: [] for name in runs}
  for p in range(args.passes):
    order = ("read_then_copy", "read_into")
    for name in (order if p % 2 == 0 else order[::-1]):
      seconds = timed(lambda: [f.result() for f in [pool.submit(runs[name], i)
                                                    for i in range(len(batches))]])
      rates[name].append(total_bytes / seconds / 1e9)
  report = {"model": args.model, "driver": args.driver, "blocks": sum(len(b) for b in batches),
            "total_bytes": total_bytes, "batch_blocks": args.batch_blocks,
            "inflight": args.inflight, "passes": args.passes, "cpu_count": os.cpu_count(),
            "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "landing_warm_gb_per_s": {k: float(np.median(v)) for k, v in rates.items()},
            "landing_warm_passes_gb_per_s": rates}
  for name, values in rates.items():
    print(f"landing {name:<16} median {np.median(values):.3f} GB/s, best {max(values):.3f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
