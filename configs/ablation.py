r"""Ablation of the offline job (PAPER.md 6.9): techniques added to Basic one at a time.

  python experiments/ablation.py --config=configs/ablation.py:smoke --workdir=/tmp/ablation
  python experiments/ablation.py --config=configs/ablation.py:cpu --workdir=/tmp/ablation_cpu
  python experiments/ablation.py --config=configs/ablation.py:gpu --workdir=$OUT/ablation

Variants (the part of the argument before the first comma):
  smoke  CI-sized, on configs/offline.py:smoke (tiny model, 2P2D, capped links; about a minute)
  cpu    on configs/offline.py:cpu (small model, 4 agents x 4 turns; several minutes)
  gpu    Qwen2.5-7B geometry (random weights) in bfloat16 on four GPUs (platform 'default'),
         2P2D with a storage link per GPU capped at 6.25 GB/s (the paper's per GPU), the store
         in host memory (~130 GB over all runs), 16 agents x 4 turns (GPU_WORKLOAD)
Then the offline config's comma-separated key=value workload overrides, e.g.
  --config=configs/ablation.py:smoke,agents=2,turns=2

Every field is configs/offline.py's (the job runs them through OfflineJob); this file sets
`variants`, named runs with every technique switch given explicitly (so that a `scheduler=`
override of the base cannot leak into them), and `modes`, the runs in order:

  run           mode      layerwise  dual_path  scheduler   batching      split_reads
  basic         basic     False      False      roundrobin  token_budget  False
  +layerwise    basic     True       False      roundrobin  token_budget  False
  +dual_path    basic     True       True       roundrobin  token_budget  False
  +scheduling   dualpath  True       True       dualpath    quota         False   (= dualpath)
  +split_reads  dualpath  True       True       dualpath    quota         True    (beyond the paper)
  oracle        oracle    True       True       dualpath    quota         False   (no KV I/O: bound)

Run names become store namespace parts (any characters but '/'), file names (links_<run>.png,
'+' written as 'plus_') and JSON keys. Pick some runs, or change one, with e.g.
  --config.modes="('basic', '+layerwise', '+dual_path', '+scheduling')"
  --config.variants['+dual_path'].scheduler=dualpath     (a name with '+' needs the [''] form)
"""

import os

import ml_collections

from dualpath_jax.config_files import load_config

VARIANTS = ("smoke", "cpu", "gpu")
BASES = {"smoke": "smoke", "cpu": "cpu", "gpu": "cpu"}  # the configs/offline.py variant of each

_OFF = dict(layerwise=False, dual_path=False, scheduler="roundrobin", batching="token_budget",
            split_reads=False)
_ON = dict(layerwise=True, dual_path=True, scheduler="dualpath", batching="quota",
           split_reads=False)
# gpu: 16 agents x 4 turns of 12K-15K tokens (57 KB of KV per token: ~0.8 GB per read, 0.13 s
# at 6.25 GB/s); each pass with store I/O keeps ~13 GB of KV in the memory store (twice per run
# with the warm-up pass). gpu_bench's e2e_h100x4 has the same appends and generations.
GPU_WORKLOAD = dict(agents=16, turns=4, first_append_tokens=12000, append_tokens=500,
                    gen_tokens=150, length_jitter=0.2)
RUNS = (
    ("basic", dict(_OFF, mode="basic")),
    ("+layerwise", dict(_OFF, mode="basic", layerwise=True)),
    ("+dual_path", dict(_OFF, mode="basic", layerwise=True, dual_path=True)),
    ("+scheduling", dict(_ON, mode="dualpath")),
    ("+split_reads", dict(_ON, mode="dualpath", split_reads=True)),
    ("oracle", dict(_ON, mode="oracle")),
)


def _offline_config(arg: str) -> ml_collections.ConfigDict:
  """configs/offline.py's get_config(arg): the shared sections are defined once, there."""
  return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline.py"), arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _, overrides = (arg or "smoke").partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"config: unknown variant {variant!r}; choose one of {VARIANTS}")
  c = _offline_config(",".join(p for p in (BASES[variant], overrides) if p))
  with c.unlocked():
    c.variant = variant
    c.variants = ml_collections.ConfigDict({name: dict(switches) for name, switches in RUNS})
    c.modes = tuple(name for name, _ in RUNS)
    if variant == "gpu":
      # As configs/gpu_bench.py:e2e_h100x4's 2P2D job: one engine per node, so that each GPU has
      # its own storage link, capped at the paper's storage bandwidth per GPU (one 400 Gb/s
      # storage NIC per 8-GPU node: 6.25 GB/s); the store in host memory (a local disk would be
      # slower than the caps, and ~130 GB of KV over all passes would not fit it).
      c.platform = "default"
      c.matmul_precision = "default"  # bfloat16 matmuls; no token-equality check below
      c.check_reference = False  # a 7B recompute of every turn costs more than the ablation
      c.model.update(preset="qwen2.5-7b", dtype="bfloat16", checkpoint="")  # random weights
      c.topology.update(num_prefill_engines=2, num_decode_engines=2, devices_per_engine=1,
                        engines_per_node=1)
      c.runtime.update(link_bytes_per_s=6.25e9, compute_quota_s=0.3, max_batch_requests=4,
                       token_budget=8192, host_buffer_bytes=48 << 30, decode_batch_size=8,
                       max_context_tokens=32768, kv_chunk_bytes=64 << 20)
      c.store.update(driver="memory", path="store")
      given = {part.partition("=")[0] for part in overrides.split(",")}
      for key, value in GPU_WORKLOAD.items():
        if key not in given:  # the argument's overrides win
          c.workload[key] = value
  c.lock()
  return c
