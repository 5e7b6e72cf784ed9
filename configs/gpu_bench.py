r"""GPU benchmark: link ceilings, the KV data plane, one engine's prefill/decode, end to end.

  python experiments/gpu_bench.py --config=configs/gpu_bench.py:smoke --out=/tmp/gpu_bench
  python experiments/gpu_bench.py --config=configs/gpu_bench.py:h100x4 --out=$OUT

On the GPU image (jax preinstalled, ml_collections carried as a wheel in .whl/):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
  PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 experiments/gpu_bench.py \
      --config=configs/gpu_bench.py:h100x4 --out=$OUT

Variants:
  smoke   CPU, 4 simulated devices, tiny sizes: every section in seconds (the test runs it)
  h100x4  the real run on the GPUs present (any count >= 1: 1, 2 or 4 H100s or H200s), all of
          it inside one ~7-minute call (a soft budget skips what no longer fits); decode with
          the Pallas kernel is also measured under a few other blockings
          (engine.pallas_blockings). Only that decode sweep, at batch 32 and 8K context:
            --config.sections="('engine',)" --config.engine.prefill_contexts="()"
            --config.engine.peak_context=0 --config.engine.decode_attentions="('pallas',)"
            --config.engine.decode_batches="(32,)"
          Prefill is measured as the masked cuDNN call ('layerwise_sdpa') and as split attention
          ('layerwise_split', one row per engine.prefill_kv_splits value).
Sections run in the order ceilings, host_memory, data_plane, engine, decode_interference,
end_to_end; pick some with e.g.
  --config.sections="('ceilings', 'data_plane')"
decode_interference (off in h100x4; one GPU, ~2.5 min a shape) is the DE's step time while its
own KV traffic (H2D, D2H, both) or its own admissions run on its device, gate off and on:
--config.sections="('decode_interference',)"
  e2e_h100x4  only the end-to-end jobs on 4 GPUs: Qwen2.5-7B geometry (random weights, bf16),
          1P3D and 2P2D, basic / dualpath / oracle, links capped at the paper's storage
          bandwidth per GPU (one 400 Gb/s storage NIC per 8-GPU node: 6.25 GB/s; our cards'
          dense bf16 peak equals the paper's Hopper GPUs', so the scale factor is 1) and
          uncapped with the store in host memory (the host links are then the NICs); 24 agents,
          a primed 16K-token first turn, then 3 timed turns appending ~500 tokens and generating
          150 (contexts 16K-21K). Without a cost model for the card, the first job profiles one
          and the later jobs reuse it. Prefill runs split attention (4 prefix chunks); each
          timed run first compiles its PE batch shapes (summary.json 'precompiled'). Where the
          threads spend each timed run: --config.end_to_end.thread_sample_hz=100. One job per call:
            --config.end_to_end.topologies="('1P3D',)" --config.end_to_end.link_caps="(6.25e9,)"
  pd_sweep_x8  the P/D sweep of an 8-GPU host (PAPER.md Figure 8): e2e_h100x4's jobs over 1P7D,
          2P6D, 4P4D and 6P2D, capped links only
  pd_sweep_smoke  the same sweep on 8 simulated CPU devices with the tiny model (minutes)
end_to_end is off in h100x4: add it to `sections` and set end_to_end.* (preset, topologies,
link_caps, agents, turns, ...), or use e2e_h100x4.
"""

import ml_collections

from dualpath_jax.bench import SECTIONS

VARIANTS = ("smoke", "h100x4", "e2e_h100x4", "pd_sweep_x8", "pd_sweep_smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "h100x4"
  if variant not in VARIANTS:
    raise ValueError(f"config: unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.platform = "default"  # 'cpu' simulates num_cpu_devices devices; 'default' takes jax's backend
  c.num_cpu_devices = 4
  c.sections = ("ceilings", "host_memory", "data_plane", "engine")
  # Soft wall-clock budget (s) for the whole run: a measurement that would start later is
  # recorded as skipped. Leave room under the call's hard limit for the one already running.
  c.budget_s = 360.0
  c.seed = 0
  # XLA's persistent compilation cache ('' = off): on GPUs one compile serves every device, so
  # the engines of an end-to-end job compile each program once, not once per GPU.
  c.compilation_cache_dir = "/tmp/dualpath_jax_xla_cache"

  c.ceilings = ml_collections.ConfigDict(dict(
      # bytes per H2D / ingest measurement: the data plane's (28 layers of a 32K-token prefix),
      # so that its ratio compares equal byte counts (1024 up to 2026-11-29)
      total_mib=1792,
      chunk_mib=32,  # one transfer; ingest deals chunks round robin over the paths
      d2d_mib=256,  # bytes per GPU-to-GPU measurement
      repeats=5, warmup=1,
      issue_modes=("threads", "async"),
      pageable=True,  # also H2D from plain numpy into GPU 0
      pinned=True))  # False: host buffers as plain numpy (if pinned_host fails)

  # whole-layer H2D by host memory kind and copies in flight, D2H by target (bench/host_memory.py)
  c.host_memory = ml_collections.ConfigDict(dict(
      preset="qwen2.5-7b", dtype="bfloat16",
      prefix_tokens=32768,  # one layer of this prefix a copy (64 MiB for the preset)
      bounds=(0, 1, 3, 6, 12),  # most copies unfinished at once; 0 = back to back
      sources=("numpy", "jax_pinned", "jax_pinned_array", "cuda_registered", "dma_mapped"),
      repeats=3, warmup=1))

  c.data_plane = ml_collections.ConfigDict(dict(
      preset="qwen2.5-7b",  # KV geometry (28 layers, 4 KV heads, head dim 128)
      dtype="bfloat16",
      prefix_tokens=32768,
      # data_plane.VARIANTS; 'layer_major' is the runtime since 2026-11-28 (reads land
      # layer-major, no gather); 'transfer_fresh_buffers' is the bench's 'transfer' up to
      # 2026-11-27 (a fresh gather array every layer), kept so older records compare
      variants=("layer_major", "layer_major_direct", "transfer", "transfer_direct", "traffic",
                "transfer_fresh_buffers"),
      # the 'traffic' and 'layer_major' variants' TrafficConfig: the GPU end-to-end runtime's
      # kv_chunk_bytes and kv_max_wait_s (e2e_h100x4 below); no model step runs here, so the
      # wait never applies. 32 MiB: the ceilings' chunk size (48.6-52.8 GB/s from numpy there);
      # through host_to_device, 32 MiB pieces back to back moved 33-35 GB/s (4x H100) and 64 MiB
      # 32 GB/s (4x H200): no clear gain measured (record 5 of docs/perf/gpu_bench.md)
      chunk_bytes=32 << 20,
      max_kv_wait_s=0.0,
      # the PE's bound on layers of prefix KV in flight (runtime.prefill_layers_in_flight)
      layers_in_flight=3,
      # where the 'layer_major' variants' reads land (runtime.host_memory; pinned_memory kinds):
      # the GPU end-to-end preset's ('numpy' up to 2026-11-29; the GPU records passed this)
      host_memory="cuda_registered",
      # the 'traffic' and 'layer_major' variants' H2D staging: the GPU preset's ('' up to
      # 2026-11-29: 'direct' where the components showed it faster, else 'auto'; record 13's
      # k = 1 rows ran 'auto' with the components off)
      h2d_staging="direct",
      components=True,
      repeats=3, warmup=1,
      target_ratio=0.90))

  c.engine = ml_collections.ConfigDict(dict(
      preset="qwen2.5-7b", dtype="bfloat16",
      prefill_contexts=(8192, 32768), append_tokens=512,
      prefill_variants=("layerwise", "layerwise_sdpa", "layerwise_split", "whole"),
      sdpa_implementation="cudnn",  # '' skips layerwise_sdpa; 'cudnn' also for layerwise_split
      # ModelConfig.prefill_kv_splits values the 'layerwise_split' rows run at (prefix chunks
      # merged by log-sum-exp, no mask: model/split_attention.py)
      prefill_kv_splits=(1, 2, 4, 8),
      decode_batches=(1, 8, 32), decode_context=8192, decode_steps=10,
      # ModelConfig.paged_attention values decode is measured with: 'gather' (pages copied into
      # a dense context per layer) and 'pallas' (a Pallas paged-attention kernel read in place)
      decode_attentions=("gather", "pallas"),
      # (ModelConfig.pallas_k_splits, pallas_block_tokens) pairs, or 4-tuples adding
      # (pallas_num_warps, pallas_num_stages), or 5-tuples adding pallas_kernel ('jax' or
      # 'dualpath', model/paged_kernel.py), under which 'pallas' decode is measured once more
      # at the largest decode batch (a compile and 2 x decode_steps steps each, ~5 s on an
      # H200), to pick the fastest kernel; () = the model's default (16, 128, 8, 2, 'dualpath')
      # only.
      # h100x4 sweeps a few blockings around the default.
      pallas_blockings=(),
      # > 0: last of the section, one jax.profiler trace of this many DE-loop steps per decode
      # configuration (batch 1 ctx 0, the largest batch, the fastest sweep point), split by
      # kernel class (bench/decode_profile.py); the trace lands under OUT/decode_profile
      decode_profile_steps=0,
      peak_context=65536,  # 0 skips the peak-memory run
      block_tokens=64,
      repeats=5, warmup=2,
      peak_flops=0.0,  # dense bf16 FLOP/s; 0 = by device_kind (H100 SXM / H200: 989e12)
      hbm_bytes_per_s=0.0,  # 0 = by device_kind (H100 SXM: 3.35e12, H200: 4.8e12)
      target_prefill_mfu=0.40,  # the issue: >= 40% at 32K context
      target_decode_roofline=0.625))  # the issue: step time within 1.6x of the roofline

  # The DE's step time while its own KV traffic runs on its device (bench/decode_interference.py):
  # one GPU; the traffic moves as the GPU end-to-end preset moves it (e2e_h100x4 below).
  c.decode_interference = ml_collections.ConfigDict(dict(
      preset="qwen2.5-7b", dtype="bfloat16", paged_attention="pallas",
      pallas_kernel="",  # '' = the model's default kernel
      # (batch, context): the decode target's point, and the end-to-end DE's (16 rows, 16K-21K)
      shapes=((32, 8192), (16, 16384)), page_tokens=64,
      steps=150, rounds=3,  # steps a condition a round; conditions interleaved each round
      # 'admit': the DE loop's own page write of a landed prompt and page read of a finishing
      # turn, every admit_every steps (admit_tokens: a 16K prompt)
      kinds=("none", "h2d", "d2h", "h2d+d2h", "admit"), admit_every=10, admit_tokens=16384,
      # TrafficConfig (chunk_bytes, max_kv_wait_s): the preset's gate off, and the gate on
      gates=((32 << 20, 0.0), (4 << 20, 0.05)),
      # an H2D move: one layer of a 32K prefix's half (the DE path's share), 32 MiB; a D2H
      # move: a turn's ~650 new tokens in whole pages, padded to a power of two (56 MiB)
      h2d_tokens=16384, d2h_tokens=1024, in_flight=3,
      host_memory="cuda_registered", h2d_staging="direct", d2h_staging="cuda_memcpy",
      target_inflation=0.05))  # the issue: decode step-time inflation from KV traffic <= 5%

  c.end_to_end = ml_collections.ConfigDict(dict(
      base_config="configs/offline.py:smoke",  # the offline config the jobs start from
      preset="small", dtype="float32",
      topologies=("1P3D", "2P2D"),
      link_caps=(0.0, 4e6),  # bytes/s per node; 0 = uncapped
      agents=4, turns=4, first_append_tokens=1000, append_tokens=128, gen_tokens=16,
      modes=("basic", "dualpath", "oracle"),
      # timed runs of each mode, interleaved (basic, dualpath, oracle, basic_r2, ...); speedups
      # and bounds then come from each mode's median JCT (bench/end_to_end.py repeat_runs)
      repeats=1,
      # named runs that modes may list: a mode plus RuntimeConfig overrides (configs/offline.py
      # variants), e.g. --config.end_to_end.variants="{'deep': {'mode': 'dualpath',
      # 'prefill_layers_in_flight': 8}}" --config.end_to_end.modes="('dualpath', 'deep')"
      variants=ml_collections.ConfigDict(),
      # warm-up pass: its agents and turns (0 = all); primed_turns: turns of every agent run
      # untimed before the clock starts (configs/offline.py)
      warmup=True, warmup_agents=0, warmup_turns=0, primed_turns=0, check_reference=False,
      engines_per_node=0,  # 0 = the base config's where it divides P and D, else 1
      # > 0: sample every thread's stack at this rate (Hz) over each timed run; the per-thread
      # top frames land in each job's summary.json (runtime/thread_samples.py)
      thread_sample_hz=0.0,
      # a jax.profiler window of these modes' timed runs: device streams and host spans,
      # summarized in each job's summary.json (configs/offline.py device_trace)
      device_trace=ml_collections.ConfigDict(dict(modes=(), start_s=1.0, seconds=0.5)),
      # Python's GIL switch interval over the jobs (0 = Python's own, 5 ms): how long a thread
      # that wants the GIL waits for one that holds it (sys.setswitchinterval)
      gil_switch_interval_s=0.0,
      # gc.freeze() when each timed run's clock starts (configs/offline.py gc_freeze)
      gc_freeze=False,
      target_speedup_over_bound=0.85,
      target_jct_over_oracle=1.15,  # dualpath JCT at most 1.15x oracle's
      target_decode_inflation=0.05,  # decode step time with KV traffic at most 5% above without
      # Further fields of the offline config's sections, and the cost model's JSON ('' = the
      # base config's: 'auto', the profile for this device kind or one made at start-up).
      runtime=ml_collections.ConfigDict(dict(compute_quota_s=0.03, max_batch_requests=8,
                                             h2d_staging="auto", d2h_staging="direct")),
      workload=ml_collections.ConfigDict(dict(length_jitter=0.5)),
      store=ml_collections.ConfigDict(dict(driver="memory", path="store")),
      # ModelConfig execution fields (prefill_kv_splits > 0: split prefill attention, see
      # engine.prefill_kv_splits; pallas_*: the Pallas decode kernel's blocking, see
      # engine.pallas_blockings) and the checkpoint ('' = random weights).
      model=ml_collections.ConfigDict(dict(attention="einsum", prefill_kv_splits=0,
                                           paged_attention="gather",
                                           pallas_k_splits=16, pallas_block_tokens=128,
                                           pallas_num_warps=8, pallas_num_stages=2,
                                           pallas_kernel="dualpath", checkpoint="")),
      cost_model=""))

  if variant == "h100x4":
    # The default (16, 128, 8, 2, 'dualpath') is measured anyway; JAX's kernel beside it and
    # blockings around it that came within noise of it on an H200 (record 10; ~30 s in all).
    c.engine.pallas_blockings = ((16, 128, 8, 2, "jax"), (16, 128, 4, 3), (16, 64, 4, 2),
                                 (16, 64, 2, 3), (8, 128, 4, 4))
  if variant in ("e2e_h100x4", "pd_sweep_x8", "pd_sweep_smoke"):
    # The GPU end-to-end jobs: Qwen2.5-7B geometry (random weights, bf16), cuDNN attention in
    # prefill, the Pallas paged-attention kernel in decode. 24 agents whose first turn (16K
    # tokens) is primed (run untimed, KV stored) and whose 3 timed turns append ~500 tokens and
    # generate 150: contexts 16K-21K, ~95% of each prompt a hit, the paper's regime. The warm-up
    # pass compiles with 4 agents x 2 turns (the first-turn and the hit-turn programs).
    c.sections = ("end_to_end",)
    c.budget_s = 560.0
    c.end_to_end.update(
        preset="qwen2.5-7b", dtype="bfloat16", topologies=("1P3D", "2P2D"),
        link_caps=(6.25e9, 0.0), agents=24, turns=4, first_append_tokens=16000,
        append_tokens=500, gen_tokens=150, engines_per_node=1, warmup=True, warmup_agents=4,
        warmup_turns=2, primed_turns=1)
    c.end_to_end.runtime.update(compute_quota_s=0.3, max_batch_requests=4, token_budget=8192,
                                # 16 GiB a node, page-locked once (node peaks: 12 GiB on
                                # 1P1D, 2x H200, record 6 of docs/perf/gpu_bench.md)
                                host_buffer_bytes=16 << 30, decode_batch_size=16,
                                max_context_tokens=24576, kv_chunk_bytes=32 << 20,
                                prefill_layers_in_flight=3,
                                # 1 up to record 15 (runtime/config.py says why 2)
                                decode_steps_in_flight=2,
                                # the node buffers' memory: 'numpy' (pageable) up to record 5;
                                # page-locked since record 6 (1P1D capped, 2x H200: basic 11.3 ->
                                # 8.2 s, dualpath 8.9 -> 7.5 s with the D2H below), H2D from it
                                # 'direct' and D2H into it by the CUDA runtime
                                host_memory="cuda_registered", h2d_staging="direct",
                                d2h_staging="cuda_memcpy",
                                # The priority gate off, as measured on 4x H200 (record 2 of
                                # docs/perf/gpu_bench.md): then a piece waited for a moment with
                                # no step, up to 50 ms, on a DE decoding back to back. It now
                                # waits for the running step only; compare with
                                # --config.end_to_end.runtime.kv_max_wait_s=0.05.
                                kv_max_wait_s=0.0)
    c.end_to_end.workload.update(length_jitter=0.2)
    # Split prefill attention, 4 prefix chunks: 44% MFU at 32K + 512 against 34% for the one
    # masked cuDNN call (2x H100, 2026-11-27, docs/perf/gpu_bench.md record 4).
    c.end_to_end.model.update(attention="cudnn", prefill_kv_splits=4, paged_attention="pallas")
  if variant == "pd_sweep_x8":
    c.end_to_end.update(topologies=("1P7D", "2P6D", "4P4D", "6P2D"), link_caps=(6.25e9,))
  if variant == "pd_sweep_smoke":
    c.platform = "cpu"
    c.num_cpu_devices = 8
    c.compilation_cache_dir = ""
    c.budget_s = 0.0
    c.end_to_end.update(preset="tiny", dtype="float32", link_caps=(1e6,), agents=8, turns=3,
                        first_append_tokens=400, append_tokens=64, gen_tokens=8,
                        warmup_agents=0, warmup_turns=0, primed_turns=0)
    c.end_to_end.runtime.update(compute_quota_s=0.03, token_budget=2048, max_batch_requests=8,
                                host_buffer_bytes=256 << 20, max_context_tokens=2048,
                                kv_chunk_bytes=4 << 20, decode_batch_size=8,
                                # no CUDA on a CPU host
                                host_memory="numpy", h2d_staging="auto", d2h_staging="direct")
    c.end_to_end.workload.update(length_jitter=0.5)
    c.end_to_end.model.update(attention="einsum", paged_attention="gather")
  if variant == "smoke":
    c.platform = "cpu"
    c.compilation_cache_dir = ""
    c.sections = SECTIONS
    c.budget_s = 0.0  # no budget: the test wants every section
    c.ceilings.update(total_mib=32, chunk_mib=4, d2d_mib=8, repeats=3, warmup=1)
    # 2 MiB a layer: 256 KiB pieces make the 'traffic' moves chunked and joined on the PE
    c.data_plane.update(prefix_tokens=1024, repeats=2, warmup=1, chunk_bytes=256 << 10,
                        host_memory="numpy", h2d_staging="")  # no CUDA on a CPU host
    # no CUDA runtime on a CPU host: 'cuda_registered' would only report its error
    c.host_memory.update(preset="tiny", dtype="float32", prefix_tokens=1024, bounds=(0, 2),
                         sources=("numpy", "jax_pinned", "jax_pinned_array"), repeats=2, warmup=1)
    c.engine.update(preset="tiny", prefill_contexts=(256,), append_tokens=64,
                    sdpa_implementation="xla", decode_batches=(1, 4), decode_context=256,
                    decode_steps=3, peak_context=512, repeats=2, warmup=1,
                    pallas_blockings=((2, 128),),  # 5 pages of 64 tokens: 2 splits of 4, 2 a block
                    prefill_kv_splits=(3,),
                    decode_profile_steps=2,
                    peak_flops=1e12, hbm_bytes_per_s=1e11)  # CPU: no datasheet; nominal
    c.decode_interference.update(preset="tiny", dtype="float32", paged_attention="gather",
                                 shapes=((4, 256),), steps=8, rounds=1, h2d_tokens=256,
                                 d2h_tokens=128, admit_every=3, admit_tokens=200,
                                 gates=((256 << 10, 0.0), (64 << 10, 0.02)),
                                 host_memory="numpy", h2d_staging="auto", d2h_staging="direct")
    c.end_to_end.update(preset="tiny", topologies=("2P2D",), link_caps=(0.0, 1e6), agents=2,
                        turns=2, first_append_tokens=200, append_tokens=64, gen_tokens=4,
                        warmup=False)
  c.lock()
  return c
