"""Typed configuration of the disaggregated runtime (built once, at the edge, from a config file)."""

from __future__ import annotations

import dataclasses

from dualpath_jax.engines.topology import TopologyConfig

MODES = ("basic", "dualpath", "oracle")
MOVERS = ("device_put", "shard_map")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
  """One runtime: its mode, engines, links, buffers and batch sizes."""

  mode: str
  """'basic' (PE-side reads, whole-prompt load before prefill, round robin: the paper's baseline),
  'dualpath' (layerwise prefill, reads on the node with the shorter read queue) or 'oracle' (every
  storage read, host/device copy and PE-to-DE transfer skipped: a timing bound whose outputs are
  not meaningful)."""
  topology: TopologyConfig
  """Engines of each role, devices per engine, engines per node."""
  link_bytes_per_s: float | None = None
  """Emulated storage-link speed per node (bytes/s); None = the hardware's own limit."""
  host_buffer_bytes: int = 1 << 30
  """Host buffer per node (bytes); must hold at least one Full Block."""
  mover: str = "device_put"
  """Device-to-device implementation: 'device_put' or 'shard_map'."""
  decode_batch_size: int = 8
  """Sequences per decode step on one DE (padded to this size: one compiled program)."""
  max_context_tokens: int = 4096
  """Longest prompt + generation a DE holds for one sequence (sizes its page pool)."""
  kv_chunk_bytes: int = 4 << 20
  """Largest piece of a KV move the traffic manager issues at once."""

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"runtime.mode: unknown mode {self.mode!r}; choose one of {MODES}")
    if self.mover not in MOVERS:
      raise ValueError(f"runtime.mover: unknown mover {self.mover!r}; choose one of {MOVERS}")
    rate = self.link_bytes_per_s
    if rate is not None and (isinstance(rate, bool) or not rate > 0):
      raise ValueError(f"runtime.link_bytes_per_s must be positive or None, got {rate!r}")
    for field in ("host_buffer_bytes", "decode_batch_size", "max_context_tokens",
                  "kv_chunk_bytes"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"runtime.{field} must be a positive int, got {value!r}")

  @property
  def layerwise(self) -> bool:
    return self.mode in ("dualpath", "oracle")

  @property
  def dual_path(self) -> bool:
    return self.mode == "dualpath"

  @property
  def skips_kv_io(self) -> bool:
    return self.mode == "oracle"
