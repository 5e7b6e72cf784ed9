"""Benchmark support: measuring helpers and the sections of experiments/gpu_bench.py.

  timing.py      median wall-clock timing of device work, a progress log with a time budget
  hardware.py    the card's peak FLOP/s and HBM bandwidth, pinned-host probing, host test data
  ceilings.py    raw link ceilings: pinned H2D per GPU and all at once, GPU-to-GPU per link,
                 multipath ingest into one GPU (own host link + k GPUs forwarding)
  data_plane.py  the project's layerwise KV load into a PE over both paths vs those ceilings
  engine.py      prefill MFU, decode step time vs the HBM roofline, the PE's peak memory
  decode_profile.py  a decode step's device time by kernel class (one jax.profiler trace)
  decode_interference.py  the DE's step time while its own KV traffic runs on its device
  end_to_end.py  offline jobs (basic / dualpath / oracle) per topology and link cap
  report.py      the JSON and markdown that a run leaves behind
  verify.py      moved bytes compared on the device (a D2H between timed runs slows the next)

Nothing here reads a config file or parses flags: the experiment script does, and passes plain
keyword arguments. Every section returns a JSON-ready dict.
"""

SECTIONS = ("ceilings", "host_memory", "data_plane", "engine", "decode_interference",
            "end_to_end")
"""The sections of experiments/gpu_bench.py, in the order they run (configs/gpu_bench.py)."""

PALLAS_FIELDS = ("pallas_k_splits", "pallas_block_tokens", "pallas_num_warps",
                 "pallas_num_stages", "pallas_kernel")
"""The ModelConfig fields of the Pallas decode kernel, in the order engine.pallas_blockings lists
them: blocking (k_splits, block_tokens), then optionally Triton's (num_warps, num_stages), then
optionally the kernel ('jax' or 'dualpath')."""
