# Diagnostic only (not committed): pieces of measure_data_plane's layer_major_direct, one by one.
import concurrent.futures, json, statistics, sys, time
import jax, numpy as np
from dualpath_jax.bench import data_plane, hardware
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model.config import get_preset
from dualpath_jax.transfer import make_mover, pinned_memory, host_to_device
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
kind = sys.argv[3] if len(sys.argv) > 3 else "cuda_registered"
layout = KVLayout.for_model(get_preset("qwen2.5-7b", dtype="bfloat16"))
devs = jax.devices()[:1]
n = layout.num_full_blocks(tokens)
blocks = hardware.random_normal_bits(n * layout.full_block_bytes, layout.dtype, 0).reshape(
    n, *layout.full_block_shape)
pe, des, engines = data_plane._engines(devs)
mover = make_mover("device_put")
pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
out = {}
def timeit(tag, fn, cleanup, reps=9, warm=3):
  ts = []
  for i in range(warm + reps):
    t0 = time.perf_counter(); o = fn(); jax.block_until_ready(o); s = time.perf_counter() - t0
    if i >= warm: ts.append(s)
    cleanup(o)
  out[tag] = dict(gbps=blocks.nbytes / statistics.median(ts) / 1e9, ms=[round(t * 1e3, 1) for t in ts])
  print(tag, round(out[tag]["gbps"], 2), out[tag]["ms"], flush=True)
def delete(o):
  for x in jax.tree_util.tree_leaves(o): x.delete()
def check_delete(o):
  for layer in (0, layout.num_layers - 1):
    np.asarray(o[0][layer])
  delete(o)
run_path = data_plane._path_runner("layer_major_direct", layout, [blocks], pe, des, mover, engines,
                                   None, 3, kind)
via_pool = lambda: [pool.submit(run_path, 0, blocks).result()]
timeit("dp_runner_pool_check", via_pool, check_delete)
timeit("dp_runner_pool_nocheck", via_pool, delete)
timeit("dp_runner_main_nocheck", lambda: [run_path(0, blocks)], delete)
# the same landed layers, issued by a plain loop
landed = layout.full_blocks_to_kv(blocks, out=pinned_memory.allocate(blocks.nbytes, kind, devs[0]))
layers = [landed[l] for l in range(layout.num_layers)]
def plain(layers=layers):
  moved = []
  for h in layers:
    if len(moved) >= 3: jax.block_until_ready(moved[-3])
    moved.append(host_to_device(h, pe, copy=False, staging="direct"))
  return [moved]
timeit("plain_landed", plain, delete)
# fresh page-locked memory filled by numpy, in layer views of the same shape
buf = pinned_memory.allocate(blocks.nbytes, kind, devs[0])
buf[:] = np.random.default_rng(0).integers(0, 256, blocks.nbytes, np.uint8)
kv = buf.view(landed.dtype).reshape(landed.shape)
timeit("plain_random_bytes", lambda: plain([kv[l] for l in range(layout.num_layers)]), delete)
buf[:] = landed.reshape(-1).view(np.uint8)
timeit("plain_copied_landed_bytes", lambda: plain([kv[l] for l in range(layout.num_layers)]), delete)
json.dump(out, open(sys.argv[1], "w"), indent=1)
