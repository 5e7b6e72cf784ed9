# Diagnostic only (not committed): the data plane's layer_major_direct in a bare process.
import json, sys, time
import jax, numpy as np
from dualpath_jax.bench import data_plane, ceilings
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model.config import get_preset
layout = KVLayout.for_model(get_preset("qwen2.5-7b", dtype="bfloat16"))
devs = jax.devices()[:1]
out = {}
def dp(tag):
  r = data_plane.measure_data_plane(devs, layout=layout, prefix_tokens=int(sys.argv[2]) if len(sys.argv) > 2 else 32768,
      variants=("layer_major_direct",), repeats=9, warmup=3, components=False,
      host_memory=sys.argv[3] if len(sys.argv) > 3 else "cuda_registered", log=lambda m: None)
  row = r["rows"][0]
  out[tag] = dict(gbps=row["gbps"], times_ms=[round(t * 1e3, 2) for t in row["times_s"]])
  print(tag, out[tag], flush=True)
dp("bare_first")
dp("bare_second")
ceilings.measure_ceilings(devs, total_bytes=(1 << 30) if len(sys.argv) < 3 else (64 << 20), chunk_bytes=32 << 20, d2d_bytes=1 << 28,
                          repeats=5, warmup=1, issue_modes=("threads",), log=lambda m: None)
dp("after_ceilings")
ceilings.measure_ceilings(devs, total_bytes=(1 << 30) if len(sys.argv) < 3 else (64 << 20), chunk_bytes=32 << 20, d2d_bytes=1 << 28,
                          repeats=5, warmup=1, issue_modes=("threads",), pageable=False, log=lambda m: None)
dp("after_ceilings_no_pageable")
json.dump(out, open(sys.argv[1], "w"), indent=1)
