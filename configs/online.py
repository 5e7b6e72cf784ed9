r"""Online serving (PAPER.md section 6.8): Poisson agent arrivals, TTFT/TTST/TPOT against APS.

  python experiments/online.py --workdir=/tmp/online                            # default: cpu
  python experiments/online.py --config=configs/online.py:smoke --workdir=/tmp/online_smoke
  python experiments/online.py --config=configs/online.py:smoke,agents=4 --workdir=/tmp/o4
  python experiments/online.py --config=configs/online.py:cpu \
      --config.aps_list="(0.5, 1.0, 2.0, 4.0)" --workdir=/tmp/online_cpu

Variants (the part of the argument before the first comma):
  smoke  CI-sized: tiny model, 2P2D on 8 simulated CPU devices (two engines per node), capped
         links, 6 agents of 3 turns, three APS points, basic and dualpath (about a minute)
  cpu    the CPU demo: small model, 2P2D, 8 agents x 4 turns, four APS points, basic, dualpath
         and oracle, SLO scaled 2x (a few minutes, a minute of it profiling the cost model)
  gpu    Qwen2.5-7B geometry (random weights, bf16) on the GPUs present (2P2D: 4 of them),
         mal32k-like agentic trajectories scaled down 4x, links capped at the paper's storage
         bandwidth per GPU, the paper's SLO unscaled and its 150 s / 30 min stopping windows
Then comma-separated key=value overrides: of the workload (agents, turns, first_append_tokens,
append_tokens, gen_tokens) and `scheduler=roundrobin|dualpath` (every mode's scheduler), as in
configs/offline.py.

Sections shared with configs/offline.py (model, topology, runtime with its technique switches and
cost_model='auto', workload with every kind's fields, store, warmup, variants, platform,
num_cpu_devices, matmul_precision) mean the same; the online fields:
  aps_list    agent arrival rates (agents/s) swept in ascending order per mode; the sweep stops
              after the first point that breaks the SLO
  arrivals    'poisson' (exponential gaps, seeded by `seed`) or 'trace' (the trajectories'
              arrival_s, e.g. workload.kind=trace, stretched in time to each point's APS)
  slo         ttft_s, tpot_s: the paper's 4 s and 50 ms, times `scale` (for small models on CPU);
              stat: the statistic of a point's turns compared with them (mean, p50, p90, p99)
  steady_window_s, steady_lag_s, steady_tolerance
              stopping rule: stop when the SLO statistic of the TTFT in the last window exceeds
              the TTFT SLO, or when the mean TTFT of the last window is within the tolerance of
              the window steady_lag_s earlier (the paper: 150 s, 30 min, 5%; 0 lag = adjacent)
  max_point_duration_s   longest a point takes arrivals (None: until every agent finished)
  drain_timeout_s        longest the turns in flight at a stop may take to finish
  warmup_agents          trajectories of the untimed warm-up pass per mode (0 = all)
"""

import os

import ml_collections

from dualpath_jax.config_files import load_config

VARIANTS = ("smoke", "cpu", "gpu")
BASES = {"smoke": "smoke", "cpu": "cpu", "gpu": "cpu"}  # the configs/offline.py variant of each


def _offline_config(arg: str) -> ml_collections.ConfigDict:
  """configs/offline.py's get_config(arg): the shared sections are defined once, there."""
  return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline.py"), arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _, overrides = (arg or "cpu").partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"config: unknown variant {variant!r}; choose one of {VARIANTS}")
  # Workload and scheduler overrides are parsed (and checked) by configs/offline.py.
  c = _offline_config(",".join(p for p in (BASES[variant], overrides) if p))
  given = {part.partition("=")[0] for part in overrides.split(",") if part}
  with c.unlocked():
    c.variant = variant
    c.modes = ("basic", "dualpath")  # CLI: --config.modes="('basic', 'dualpath', 'oracle')"
    # Untimed warm-up per mode (offline, own namespaces, uncapped links, then online passes):
    # no point's latencies include compilation. warmup_agents (configs/offline.py): its
    # trajectories (0 = all).
    c.check_reference = False  # online runs compare latencies, not tokens
    workload = dict(agents=6, turns=3)  # online replay uses Turn.think_s (0 for synthetic)
    # Online serving.
    c.aps_list = (1.0, 3.0, 9.0)
    c.arrivals = "poisson"
    c.seed = 0  # arrival times: the same at every point and in every mode
    # The smoke's SLO: the paper's TTFT times 0.5 (2 s; an idle turn takes 0.1-0.5 s here) and
    # 4x its TPOT times 0.5 (100 ms: tiny-model decode steps on two shared CPU cores).
    c.slo = ml_collections.ConfigDict(dict(ttft_s=4.0, tpot_s=0.2, scale=0.5, stat="p90"))
    c.steady_window_s = 5.0
    c.steady_lag_s = 0.0
    c.steady_tolerance = 0.05
    c.max_point_duration_s = ml_collections.FieldReference(60.0, field_type=float)
    c.drain_timeout_s = 60.0

    if variant == "cpu":
      c.modes = ("basic", "dualpath", "oracle")
      c.runtime.update(compute_quota_s=0.1, link_bytes_per_s=4e6)
      workload = dict(agents=8, turns=4, first_append_tokens=600, append_tokens=96,
                      gen_tokens=16)
      c.aps_list = (0.25, 0.5, 1.0, 2.0)
      c.warmup_agents = 4
      # A cold 600-token prompt of the small model takes ~0.5-1 s on two shared CPU cores: the
      # paper's TTFT times 2 (8 s); TPOT 2 x 100 ms.
      c.slo.update(ttft_s=4.0, tpot_s=0.1, scale=2.0)
      c.steady_window_s = 20.0
      c.max_point_duration_s = 120.0
    elif variant == "gpu":
      c.modes = ("basic", "dualpath", "oracle")
      c.platform = "default"
      c.model.update(preset="qwen2.5-7b", dtype="bfloat16", checkpoint="")  # random weights
      c.topology.engines_per_node = 1
      c.runtime.update(
          link_bytes_per_s=6.25e9,  # one 400 Gb/s storage NIC per 8-GPU node, per GPU
          host_buffer_bytes=48 << 30, decode_batch_size=16, max_context_tokens=8192,
          kv_chunk_bytes=64 << 20, compute_quota_s=0.3, token_budget=8192,
          max_batch_requests=4)
      c.workload.update(kind="agentic", preset="mal32k", scale=4)
      workload = dict(agents=128)
      c.warmup_agents = 8
      c.aps_list = (0.1, 0.2, 0.4, 0.8, 1.6)
      c.slo.update(ttft_s=4.0, tpot_s=0.05, scale=1.0)  # the paper's, unscaled
      c.steady_window_s = 150.0
      c.steady_lag_s = 1800.0
      c.max_point_duration_s = 1800.0
      c.drain_timeout_s = 300.0
      c.store.update(driver="memory", path="store")
    c.workload.update({k: v for k, v in workload.items() if k not in given})
  c.lock()
  return c
