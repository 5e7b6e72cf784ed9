"""Typed configuration of the disaggregated runtime (built once, at the edge, from a config file).

A mode is a named set of technique switches (PAPER.md 6.5 and the ablation of 6.9); every switch
can also be set on its own, so that the paper's ablation (Basic, +layerwise, +dual path,
+scheduling) is four configs:

  mode      layerwise  dual_path  scheduler   batching       store I/O
  basic     False      False      roundrobin  token_budget   real
  dualpath  True       True       dualpath    quota          real
  oracle    True       True       dualpath    quota          skipped (a timing bound)
"""

from __future__ import annotations

import dataclasses

from dualpath_jax.engines.topology import TopologyConfig

MODES = ("basic", "dualpath", "oracle")
MOVERS = ("device_put", "shard_map")
SCHEDULERS = ("roundrobin", "dualpath")
BATCHINGS = ("token_budget", "quota")
DE_READ_ROUTES = ("de_device", "pe_host_link")
DE_PATH_H2D = ("forward", "per_layer")
MODE_SWITCHES = {
    "basic": dict(layerwise=False, dual_path=False, scheduler="roundrobin",
                  batching="token_budget"),
    "dualpath": dict(layerwise=True, dual_path=True, scheduler="dualpath", batching="quota"),
    "oracle": dict(layerwise=True, dual_path=True, scheduler="dualpath", batching="quota"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
  """One runtime: its mode and technique switches, engines, links, buffers and batch sizes."""

  mode: str
  """'basic', 'dualpath' or 'oracle' (every storage read, host/device copy and PE-to-DE transfer
  skipped: a timing bound whose outputs are not meaningful). Sets the switches below that are
  left unset."""
  topology: TopologyConfig
  """Engines of each role, devices per engine, engines per node."""
  layerwise: bool | None = None
  """Stream the prefix KV into the PE one layer at a time (else the whole prompt's KV first)."""
  dual_path: bool | None = None
  """Reads may run on the DE's node and reach the PE over D2D (else PE-side reads only)."""
  scheduler: str = ""
  """'roundrobin' (PE, DE round robin; the read side alternates when dual_path) or 'dualpath'
  (PAPER.md section 5: alpha/beta PE selection, two-level DE selection, shorter read queue)."""
  batching: str = ""
  """PE batch selection: 'quota' (predicted forward time per data-parallel shard within
  compute_quota_s; chunked prefill of the overflowing request) or 'token_budget' (new tokens
  within token_budget, no quota)."""
  split_reads: bool = False
  """Beyond the paper (its future work): split one request's read over both sides in proportion
  to the two links' expected drain times. Needs dual_path."""
  de_read_route: str = "de_device"
  """How KV in a DE node's buffer (a DE-side read, a later chunk's prefix) reaches the PE:
  'de_device' (H2D over the DE GPU's host link, then D2D over NVLink: the compute-network path
  of DESIGN.md) or 'pe_host_link', A DIAGNOSTIC THAT LEAVES THE DE'S GPU OUT: one H2D from the
  DE node's buffer straight onto the PE over the PE's own host link (not the paper's path; the
  store reads still run on the DE's storage link)."""
  de_path_h2d: str = "per_layer"
  """Layerwise prefill with de_read_route 'de_device': when the DE path's KV goes H2D onto the DE
  device. 'per_layer' (the default): each layer's H2D as the PE's loop loads it, then its D2D.
  'forward': every layer of the forward's DE-side prefix at the forward's start, each layer's D2D
  to the PE as the loop loads it. An H2D onto a GPU waits for the work queued on that GPU's
  compute stream when it is issued (PJRT's GPU client allocates device buffers
  compute-synchronized), so on a decoding DE per-layer H2Ds wait for the decode step in flight:
  3 x 32 MiB in flight moved 10.8 GB/s onto a decoding H200 against 54.7 GB/s with no step
  running; 28 in flight (a forward's layers at once) 54.3 GB/s (docs/perf/gpu_bench.md record
  11). 'forward' was the default from 2026-11-29 for that reason, until 1P1D end to end (2x H200,
  links capped at 6.25 GB/s, record 13) ran it 5% slower than 'per_layer' (JCT medians 7.06 s
  against 6.72 s in one call) with more decode inflation (+43-45% against +15-17%), holding
  2.2-3.1 GB staged on the DE: there the DE path's rate is not what bounds the job. 'forward'
  holds the forward's DE-side prefix on the DE device until each layer's D2D has been issued
  (bounded by de_path_stage_bytes). With the priority gate on (kv_max_wait_s > 0) the moves
  stay per layer: a gated move's pieces are issued one after another on the PE's thread."""
  de_path_stage_bytes: int = 0
  """Under de_path_h2d 'forward': most bytes of one forward's DE-path layers staged on a DE and
  not yet sent on to the PE (0: no bound, every layer of every region at its first use). With a
  bound, a region stages ahead only while the DE's staged bytes fit, and tops up as the PE's loop
  sends layers on; the layer the loop needs now is always staged. Smaller bounds issue the H2Ds
  in smaller groups, each waiting for the DE's step in flight (record 11: 3 x 32 MiB moved
  10.8 GB/s onto a decoding H200, 28 x 32 MiB 54.3). Summaries report max_de_staged_bytes."""
  compute_quota_s: float = 0.3
  """Predicted forward time per shard that one PE batch may fill (the paper: 300 ms on GPU)."""
  token_budget: int = 8192
  """New tokens per PE batch under 'token_budget' batching."""
  max_batch_requests: int = 8
  """Most requests (or chunks) in one PE batch."""
  link_bytes_per_s: float | None = None
  """Emulated storage-link speed per node (bytes/s); None = the hardware's own limit."""
  host_buffer_bytes: int = 1 << 30
  """Host buffer per node (bytes); must hold at least one Full Block."""
  host_memory: str = "numpy"
  """What the host buffers' pool blocks are (transfer.pinned_memory): 'numpy' (pageable),
  'jax_pinned' (views of jax pinned_host arrays), 'cuda_registered' (numpy page-locked by
  cudaHostRegister) or 'dma_mapped' (numpy page-locked by the PJRT client's dma_map). On GPUs a
  copy from page-locked memory needs no staging copy; the GPU bench's host_memory section
  measures what each kind gives."""
  mover: str = "device_put"
  """Device-to-device implementation: 'device_put' or 'shard_map'."""
  decode_batch_size: int = 8
  """Sequences per decode step on one DE (padded to this size: one compiled program)."""
  max_context_tokens: int = 4096
  """Longest prompt + generation a DE holds for one sequence (sizes its page pool)."""
  kv_chunk_bytes: int = 4 << 20
  """Largest piece of a KV move the traffic manager issues at once."""
  h2d_staging: str = "auto"
  """How H2D moves leave host memory (transfer.host_to_device): 'auto' (through pinned staging
  on GPUs), 'pinned', or 'direct' (jax.device_put from the buffer itself)."""
  d2h_staging: str = "direct"
  """How D2H moves reach host memory (transfer.device_to_host): 'direct' (np.asarray, a fresh
  host allocation per piece), 'pinned' (through the backend's pinned memory, whose blocks are
  reused), 'auto' (pinned on GPUs) or 'cuda_memcpy' (the CUDA runtime copies straight into the
  node buffer: one DMA into page-locked host_memory; CUDA GPUs only)."""
  prefill_layers_in_flight: int = 3
  """Layerwise prefill: most layers of prefix KV on a PE's device at once (at least 2: the layer
  computing and the next loading). More keeps more H2D moves in flight, at the cost of a layer of
  prefix KV per row each. From pageable host memory one 64 MiB jax.device_put takes ~14 ms, so 3
  in flight moved 11.8 GB/s; from page-locked memory (host_memory) 3 in flight moved 41-46 GB/s,
  the link's rate (4x H100, docs/perf/gpu_bench.md record 6)."""
  decode_steps_in_flight: int = 2
  """Decode steps a DE keeps dispatched ahead of the one whose tokens it reads (>= 1). Each
  step's tokens go into the next on the device, so only the host's reads wait; generation
  lengths are forced, so a row's last step is known when it is dispatched and no step is spent
  on a finished row. With one, the device idles whenever a dispatch call takes longer than the
  step in flight, and the dispatch call has to win the GIL from the runtime's other threads:
  on 1P1D (2x H200) the DE's steps that overlapped KV moves spent 2-5 ms longer in it
  (docs/perf/gpu_bench.md record 16). Two: dualpath's decode inflation +48% / +33% against
  +72% / +143% with one, the same JCT (record 16, call 2). A thread that keeps the GIL busy for
  as long as the steps run still slows them at any depth (record 16,
  scripts/bench_decode_host.py)."""
  kv_max_wait_s: float = 0.05
  """Longest a KV piece waits for the model steps running on its engine to end
  (TrafficConfig.max_kv_wait_s); 0 turns the priority gate off. A piece of every per-layer move
  may pay up to one step on a busy DE (runtime/traffic.py)."""

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"runtime.mode: unknown mode {self.mode!r}; choose one of {MODES}")
    for field, value in MODE_SWITCHES[self.mode].items():
      if getattr(self, field) in (None, ""):
        object.__setattr__(self, field, value)
    if self.mover not in MOVERS:
      raise ValueError(f"runtime.mover: unknown mover {self.mover!r}; choose one of {MOVERS}")
    if self.scheduler not in SCHEDULERS:
      raise ValueError(f"runtime.scheduler: unknown scheduler {self.scheduler!r}; choose one of "
                       f"{SCHEDULERS}")
    if self.batching not in BATCHINGS:
      raise ValueError(f"runtime.batching: unknown batching {self.batching!r}; choose one of "
                       f"{BATCHINGS}")
    for field in ("layerwise", "dual_path", "split_reads"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"runtime.{field} must be true or false, got {getattr(self, field)!r}")
    if self.de_read_route not in DE_READ_ROUTES:
      raise ValueError(f"runtime.de_read_route: expected one of {list(DE_READ_ROUTES)}, got "
                       f"{self.de_read_route!r}")
    if self.de_path_h2d not in DE_PATH_H2D:
      raise ValueError(f"runtime.de_path_h2d: expected one of {list(DE_PATH_H2D)}, got "
                       f"{self.de_path_h2d!r}")
    stage = self.de_path_stage_bytes
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
      raise ValueError(f"runtime.de_path_stage_bytes: expected a non-negative int (0: no bound), "
                       f"got {stage!r}")
    if self.split_reads and not self.dual_path:
      raise ValueError("runtime.split_reads needs runtime.dual_path (a split read uses both sides)")
    rate = self.link_bytes_per_s
    if rate is not None and (isinstance(rate, bool) or not rate > 0):
      raise ValueError(f"runtime.link_bytes_per_s must be positive or None, got {rate!r}")
    from dualpath_jax.transfer.host_device import D2H_STAGING_MODES, STAGING_MODES
    for field, modes in (("h2d_staging", STAGING_MODES), ("d2h_staging", D2H_STAGING_MODES)):
      if getattr(self, field) not in modes:
        raise ValueError(f"runtime.{field}: expected one of {list(modes)}, got "
                         f"{getattr(self, field)!r}")
    from dualpath_jax.transfer.pinned_memory import HOST_MEMORY_KINDS
    if self.host_memory not in HOST_MEMORY_KINDS:
      raise ValueError(f"runtime.host_memory: expected one of {list(HOST_MEMORY_KINDS)}, got "
                       f"{self.host_memory!r}")
    wait = self.kv_max_wait_s
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
      raise ValueError(f"runtime.kv_max_wait_s must be >= 0, got {wait!r}")
    layers = self.prefill_layers_in_flight
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 2:
      raise ValueError(f"runtime.prefill_layers_in_flight must be an int >= 2 (the layer "
                       f"computing and the next one loading), got {layers!r}")
    depth = self.decode_steps_in_flight
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
      raise ValueError(f"runtime.decode_steps_in_flight must be an int >= 1, got {depth!r}")
    quota = self.compute_quota_s
    if isinstance(quota, bool) or not isinstance(quota, (int, float)) or not quota > 0:
      raise ValueError(f"runtime.compute_quota_s must be positive, got {quota!r}")
    for field in ("host_buffer_bytes", "decode_batch_size", "max_context_tokens",
                  "kv_chunk_bytes", "token_budget", "max_batch_requests"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"runtime.{field} must be a positive int, got {value!r}")

  @property
  def skips_kv_io(self) -> bool:
    return self.mode == "oracle"

  def switches(self) -> dict:
    """The technique switches as run (for summaries)."""
    return dict(layerwise=self.layerwise, dual_path=self.dual_path, scheduler=self.scheduler,
                batching=self.batching, split_reads=self.split_reads,
                skips_kv_io=self.skips_kv_io)
