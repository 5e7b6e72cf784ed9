# Diagnostic only (not committed): what a D2H before a timed H2D run does to it.
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from dualpath_jax.bench import data_plane, hardware
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model.config import get_preset
from dualpath_jax.transfer import pinned_memory, host_to_device
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
kind = sys.argv[3] if len(sys.argv) > 3 else "cuda_registered"
layout = KVLayout.for_model(get_preset("qwen2.5-7b", dtype="bfloat16"))
dev = jax.devices()[0]
n = layout.num_full_blocks(tokens)
blocks = hardware.random_normal_bits(n * layout.full_block_bytes, layout.dtype, 0).reshape(
    n, *layout.full_block_shape)
pe, _, _ = data_plane._engines([dev])
landed = layout.full_blocks_to_kv(blocks, out=pinned_memory.allocate(blocks.nbytes, kind, dev))
layers = [landed[l] for l in range(layout.num_layers)]
other = jax.device_put(np.ones(layers[0].shape, layers[0].dtype), dev)
tiny = jax.device_put(np.ones(4, np.int32), dev)
locked = [pinned_memory.allocate(layers[0].nbytes, kind, dev).view(layers[0].dtype).reshape(layers[0].shape) for _ in range(2)] if dev.platform == "gpu" else None
eq = jax.jit(lambda a, b: jnp.array_equal(a, b))
want = jax.device_put(layers[0], dev)
out = {}
def run():
  moved = []
  for h in layers:
    if len(moved) >= 3: jax.block_until_ready(moved[-3])
    moved.append(host_to_device(h, pe, copy=False, staging="direct"))
  return moved
def timeit(tag, before, reps=7, warm=2):
  ts = []
  for i in range(warm + reps):
    o = run(); jax.block_until_ready(o)
    before(o)
    for x in o: x.delete()
    t0 = time.perf_counter(); o = run(); jax.block_until_ready(o); s = time.perf_counter() - t0
    for x in o: x.delete()
    if i >= warm: ts.append(s)
  out[tag] = dict(gbps=blocks.nbytes / statistics.median(ts) / 1e9, ms=[round(t * 1e3, 1) for t in ts])
  print(tag, round(out[tag]["gbps"], 2), out[tag]["ms"], flush=True)
timeit("nothing", lambda o: None)
timeit("asarray_2_layers", lambda o: [np.asarray(o[0]), np.asarray(o[-1])])
for s in (0.01, 0.05, 0.2, 1.0):
  timeit(f"asarray_2_layers_sleep_{s}", lambda o, s=s: ([np.asarray(o[0]), np.asarray(o[-1])], time.sleep(s)))
timeit("asarray_other_64MiB_fresh", lambda o: np.asarray(jnp.copy(other)))
timeit("asarray_tiny_fresh", lambda o: np.asarray(tiny + 1))
timeit("device_equal", lambda o: bool(eq(o[0], want)))
if locked:
  timeit("cuda_memcpy_2_layers", lambda o: [pinned_memory.cuda_copy_to_host(o[0], locked[0]), pinned_memory.cuda_copy_to_host(o[-1], locked[1])])
timeit("nothing_again", lambda o: None)
json.dump(out, open(sys.argv[1], "w"), indent=1)
