r"""Offline agentic job (PAPER.md section 6.7): all agents start at t=0; JCT when all finish.

  python experiments/offline.py --workdir=/tmp/dualpath                       # default: cpu
  python experiments/offline.py --config=configs/offline.py:smoke --workdir=/tmp/smoke
  python experiments/offline.py --config=configs/offline.py:smoke,agents=16 --workdir=/tmp/s16
  python experiments/offline.py --config=configs/offline.py:cpu --config.topology.num_decode_engines=3 \
      --config.topology.num_prefill_engines=1 --workdir=/tmp/1p3d

Variants (the part of the argument before the first comma):
  smoke  CI-sized: tiny model, 2P2D, links capped so that loading dominates (seconds)
  cpu    the CPU demo: small model, 2P2D, 4 agents x 4 turns, capped links (a minute or two)
Then comma-separated key=value overrides: of the workload (agents, turns, first_append_tokens,
append_tokens, gen_tokens) and `scheduler=roundrobin|dualpath`, which sets the scheduler of every
mode (default: each mode's own, PAPER.md: basic round robin, dualpath and oracle the paper's).

  python experiments/offline.py --config=configs/offline.py:smoke,scheduler=roundrobin --workdir=A
  python experiments/offline.py --config=configs/offline.py:smoke,scheduler=dualpath --workdir=B

Technique switches (runtime.layerwise, dual_path, scheduler, batching, split_reads) override the
modes' own; `variants` adds named runs (a mode plus overrides) that `modes` may list, e.g.
  --config.variants="{'split': {'mode': 'dualpath', 'split_reads': True}}" \
  --config.modes="('dualpath', 'split')"
"""

import ml_collections

VARIANTS = ("smoke", "cpu")
WORKLOAD_OVERRIDES = ("agents", "turns", "first_append_tokens", "append_tokens", "gen_tokens")
SCHEDULERS = ("roundrobin", "dualpath")


def _parse(arg: str | None) -> tuple[str, dict[str, int], str]:
  parts = [p for p in (arg or "cpu").split(",") if p]
  variant, overrides, scheduler = parts[0], {}, ""
  if variant not in VARIANTS:
    raise ValueError(f"config: unknown variant {variant!r}; choose one of {VARIANTS}")
  for part in parts[1:]:
    key, sep, value = part.partition("=")
    if sep and key == "scheduler":
      if value not in SCHEDULERS:
        raise ValueError(f"config: scheduler={value!r}; choose one of {SCHEDULERS}")
      scheduler = value
      continue
    if not sep or key not in WORKLOAD_OVERRIDES:
      raise ValueError(f"config: bad override {part!r}; expected key=value with key one of "
                       f"{WORKLOAD_OVERRIDES + ('scheduler',)}")
    try:
      overrides[key] = int(value)
    except ValueError:
      raise ValueError(f"config: {key}={value!r} is not an integer") from None
  return variant, overrides, scheduler


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides, scheduler = _parse(arg)
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.modes = ("basic", "dualpath", "oracle")  # CLI: --config.modes="('basic', 'dualpath')"
  # Run each mode once untimed first (own namespaces, uncapped links): JCT excludes compilation.
  # warmup_agents / warmup_turns: the first agents and turns only (0 = all), a cheaper pass.
  c.warmup = True
  c.warmup_agents = 0
  c.warmup_turns = 0
  # Turns of every agent run untimed before the clock starts, their KV stored in the timed run's
  # own namespaces: agents that resume with early context in storage (0 = time every turn).
  c.primed_turns = 0
  # Compare every generated token with a no-cache full recompute on one device.
  c.check_reference = True
  # Sample every thread's stack this often (Hz) over each timed run, 0 = off: where the PE's
  # and DE's threads spend their time, in summary.json (runtime/thread_samples.py).
  c.thread_sample_hz = 0.0
  # A window of these runs' timed part recorded by jax.profiler (device streams, XLA's host
  # work and the runtime's spans), from start_s after the clock starts, for `seconds`: into
  # WORKDIR/device_trace/<run>, summarized in summary.json (runtime/profile_window.py).
  c.device_trace = ml_collections.ConfigDict(dict(modes=(), start_s=1.0, seconds=0.5))
  # gc.freeze() when each timed run's clock starts: the objects alive then (model, caches,
  # workload) leave the collector's reach; collections over the timed part are in summary.json
  # (runs[i].gc_pauses) either way (runtime/gc_pauses.py).
  c.gc_freeze = False
  # XLA's float32 matmul precision for the whole process. 'highest' keeps float32 exact enough
  # for token equality with the reference on GPUs, whose default (TF32) is not.
  c.matmul_precision = "highest"
  c.platform = "cpu"  # 'cpu' simulates num_cpu_devices devices; 'default' takes jax's backend
  c.num_cpu_devices = 8

  # checkpoint: 'recall' = the repository's trained recall checkpoint of the preset
  # (checkpoints/<preset>-recall, docs/checkpoints.md), whose outputs depend on far-back context
  # so that token equality checks the KV; '' = random weights (seed); else an orbax folder.
  c.model = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32", seed=0,
                                           checkpoint="recall"))
  # Sliding window of the storage-link balance metric (max/avg bytes over the links).
  c.snic_window_s = 0.5
  c.variants = ml_collections.ConfigDict()  # name -> dict(mode=..., switch overrides)
  # 2P2D with two engines per node: one PE group of two data-parallel shards (whose attention
  # balance the quota keeps) and one DE node; two storage links.
  c.topology = ml_collections.ConfigDict(dict(num_prefill_engines=2, num_decode_engines=2,
                                              devices_per_engine=1, engines_per_node=2))
  c.runtime = ml_collections.ConfigDict(dict(
      link_bytes_per_s=1e6,  # emulated storage NIC per node; None = uncapped
      host_buffer_bytes=256 << 20, mover="device_put", decode_batch_size=8,
      max_context_tokens=2048, kv_chunk_bytes=4 << 20,
      # KV moves (dualpath_jax/runtime/config.py): the gate's longest wait for running model
      # steps (0 = off), how H2D leaves and D2H reaches host memory ('auto' | 'pinned' | 'direct';
      # D2H also 'cuda_memcpy').
      kv_max_wait_s=0.05, h2d_staging="auto", d2h_staging="direct",
      # layerwise prefill: most layers of prefix KV on a PE at once (>= 2)
      prefill_layers_in_flight=3,
      # decode steps a DE keeps dispatched ahead of the one it reads (>= 1)
      decode_steps_in_flight=2,
      # the node buffers' host memory: 'numpy' (pageable) or, on CUDA GPUs, page-locked
      # ('cuda_registered' | 'jax_pinned'; then d2h_staging='cuda_memcpy' copies straight in)
      host_memory="numpy",
      # Technique switches: '' / None = the mode's own (see dualpath_jax/runtime/config.py).
      scheduler=scheduler, layerwise=ml_collections.FieldReference(None, field_type=bool),
      dual_path=ml_collections.FieldReference(None, field_type=bool), batching="",
      split_reads=False,
      # PE batches: predicted forward time per shard (the paper's 300 ms on GPU; the CPU value
      # is scaled to our tiny model's forwards, a few ms to tens of ms), or the token budget.
      compute_quota_s=0.03, token_budget=2048, max_batch_requests=8,
      # The cost model's JSON: 'auto' = configs/cost_models/<device>-<preset>-<dtype>.json
      # (written by scripts/profile_prefill.py), profiled at start-up when that file is absent.
      cost_model="auto"))
  # Every kind's fields (dualpath_jax/workload/build.py says which kind reads which), so that any
  # kind can be picked from the command line, e.g. --config.workload.kind=trace
  # --config.workload.path=../shared/traces/mooncake/conversation_trace.jsonl
  c.workload = ml_collections.ConfigDict(dict(
      kind="synthetic", agents=8, turns=4, first_append_tokens=400, append_tokens=64,
      gen_tokens=8, seed=0,
      # Per-agent and per-turn append lengths vary by up to +-50%: read sizes differ, as they do
      # in agentic traces (a load-oblivious scheduler then unbalances the storage links).
      length_jitter=0.5,
      preset="mal32k", scale=32,  # kind=agentic
      # kind=trace: lengths divided by trace_scale (8: the Mooncake conversation trace's median
      # prompt of 6.9K tokens becomes ~860, within the smoke's 2,048-token context); the first
      # max_requests requests (0 = all) rebuilt into sessions, at most max_sessions of them.
      path="", format="auto", sessions=True, max_sessions=0, max_requests=0, trace_scale=8,
      max_turns=0))  # any kind: at most this many turns per trajectory (0 = all)
  c.store = ml_collections.ConfigDict(dict(driver="file", path=""))  # '' = WORKDIR/store

  if variant == "smoke":
    c.workload.update(max_requests=400, max_sessions=8)  # kind=trace: a CI-sized prefix
  if variant == "cpu":
    c.model.preset = "small"
    c.runtime.compute_quota_s = 0.1
    c.runtime.link_bytes_per_s = 4e6
    c.runtime.max_context_tokens = 2048
    c.workload.update(agents=4, turns=4, first_append_tokens=1000, append_tokens=128,
                      gen_tokens=16)
  for key, value in overrides.items():
    c.workload[key] = value
  c.lock()
  return c
