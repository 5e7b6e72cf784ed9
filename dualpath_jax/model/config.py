"""Model geometry: one frozen record per preset.

The presets `qwen2.5-7b` and `qwen2.5-32b` carry the true shapes of those models (random weights):
their shapes fix the KV bytes per token and the FLOPs that scheduling and the simulator use.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
PAGED_ATTENTION_IMPLEMENTATIONS = ("gather", "pallas")
# The Pallas paged-attention kernels 'pallas' can run (ModelConfig.pallas_kernel).
PALLAS_KERNELS = ("jax", "dualpath")
# ModelConfig fields that choose how the model is computed, not what its weights are: a
# checkpoint restores under any values of them (weights.restore_weights, weights.with_config).
EXECUTION_FIELDS = ("attention", "prefill_kv_splits", "paged_attention", "pallas_k_splits",
                    "pallas_block_tokens", "pallas_num_warps", "pallas_num_stages",
                    "pallas_kernel")
# The attentions split prefill (prefill_kv_splits > 0, model/split_attention.py) can run on.
SPLIT_ATTENTION_IMPLEMENTATIONS = ("einsum", "cudnn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Geometry of a decoder-only GQA transformer (RoPE, SwiGLU, RMSNorm)."""

  name: str
  """Preset name, for logs and checkpoints."""
  vocab_size: int
  """Number of token ids."""
  hidden_size: int
  """Residual stream width."""
  num_layers: int
  """Number of transformer blocks."""
  num_heads: int
  """Query heads per layer."""
  num_kv_heads: int
  """Key/value heads per layer (GQA: num_heads is a multiple of it)."""
  head_dim: int
  """Width of one attention head."""
  intermediate_size: int
  """SwiGLU hidden width."""
  rope_theta: float = 1_000_000.0
  """RoPE base frequency."""
  rms_norm_eps: float = 1e-6
  """RMSNorm epsilon."""
  qkv_bias: bool = True
  """Bias on the q/k/v projections (Qwen2.5 has it)."""
  dtype: str = "bfloat16"
  """Parameter, activation and KV dtype: 'bfloat16' by default, 'float32' in tests."""
  attention: str = "einsum"
  """How attention is computed (not a weight property): 'einsum' (the reference, float32 scores
  materialised), or jax.nn.dot_product_attention with implementation 'xla' or 'cudnn' (fused
  flash attention on NVIDIA GPUs, bf16/fp16 only)."""
  prefill_kv_splits: int = 0
  """How prefill attends (not a weight property): 0 = one `attention` call over concat(prefix,
  new) with an explicit mask; k > 0 = split_attention.prefill_attention: the prefix in k chunks
  on the batch axis plus one causal call over the new tokens, merged by their log-sum-exp (no
  mask; attention 'einsum' or 'cudnn' only). Decode and the plain forward pass are unaffected."""
  paged_attention: str = "gather"
  """How paged decode (paged.decode_step) reads the pool (not a weight property): 'gather' copies
  each sequence's pages into a dense [B, S, 2, H, D] context per layer and runs `attention` on it;
  'pallas' runs a Pallas (Triton) paged-attention kernel that reads the pages in place, the one
  `pallas_kernel` names. 'pallas'
  runs in Pallas interpret mode automatically when jax.default_backend() is 'cpu' (slow: tests
  and tiny models only); page_tokens and head_dim must be powers of 2 on GPUs (Triton)."""
  pallas_k_splits: int = 16
  """'pallas' blocking (not a weight property; default paged.PALLAS_MAX_K_SPLITS): at most this
  many partitions of a row's pages run in parallel, their partial softmaxes merged at the end
  (paged.pallas_blocking). A different value retraces the decode step."""
  pallas_block_tokens: int = 128
  """'pallas' blocking (not a weight property; default paged.PALLAS_COMPUTE_BLOCK_TOKENS): about
  this many tokens are read per loop iteration of a partition, in a power-of-2 number of pages
  (at least one page); a power of 2 (paged.pallas_blocking). A different value retraces."""
  pallas_num_warps: int = 8
  """'pallas' compilation (not a weight property; the kernel's own default): warps per program
  of the Triton kernel, a power of 2. Ignored in interpret mode (CPU). A different value
  retraces."""
  pallas_num_stages: int = 2
  """'pallas' compilation (not a weight property; the kernel's own default): Triton's software
  pipelining depth for the kernel's page loop (each stage holds a compute block of K and V in
  shared memory). Ignored in interpret mode (CPU). A different value retraces."""
  pallas_kernel: str = "dualpath"
  """Which kernel 'pallas' runs (not a weight property): 'dualpath' = the project's own
  (model/paged_kernel.py: 2-D tile loads where JAX's gathers pages 3-D; on an H200 it
  reads the KV of a batch-32 8K-context step at 3.9-4.1 TB/s, JAX's at 2.1-2.4: record 10 of
  docs/perf/gpu_bench.md), 'jax' = JAX's (jax.experimental.pallas.ops.gpu.paged_attention).
  Both take the blocking and compilation fields above. A different value retraces."""

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
          f"ModelConfig.num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                       f"{self.attention!r}")
    if self.paged_attention not in PAGED_ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.paged_attention must be one of "
                       f"{PAGED_ATTENTION_IMPLEMENTATIONS}, got {self.paged_attention!r}")
    if self.pallas_kernel not in PALLAS_KERNELS:
      raise ValueError(f"ModelConfig.pallas_kernel must be one of {PALLAS_KERNELS}, got "
                       f"{self.pallas_kernel!r}")
    for field in ("pallas_k_splits", "pallas_block_tokens", "pallas_num_warps",
                  "pallas_num_stages", "prefill_kv_splits"):
      value = getattr(self, field)
      least = 0 if field == "prefill_kv_splits" else 1
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        kind = "a non-negative" if least == 0 else "a positive"
        raise ValueError(f"ModelConfig.{field} must be {kind} int, got {value!r}")
      object.__setattr__(self, field, int(value))  # plain ints: hashable alike, JSON-able
    if self.prefill_kv_splits and self.attention not in SPLIT_ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.prefill_kv_splits > 0 needs attention in "
                       f"{SPLIT_ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    for field in ("pallas_block_tokens", "pallas_num_warps"):
      value = getattr(self, field)
      if value & (value - 1):
        raise ValueError(f"ModelConfig.{field} must be a power of 2, got {value!r}")
    if self.dtype not in ("bfloat16", "float32", "float16"):
      raise ValueError(f"ModelConfig.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def itemsize(self) -> int:
    return np.dtype(jnp.dtype(self.dtype)).itemsize

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Tests: seconds to compile and run on CPU.
    "tiny": ModelConfig(name="tiny", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=128, rope_theta=10_000.0),
    # CPU demos.
    "small": ModelConfig(name="small", vocab_size=512, hidden_size=256, num_layers=4, num_heads=8,
                         num_kv_heads=2, head_dim=32, intermediate_size=768,
                         rope_theta=10_000.0),
    # True geometries (HF config.json of Qwen/Qwen2.5-7B and Qwen/Qwen2.5-32B).
    "qwen2.5-7b": ModelConfig(name="qwen2.5-7b", vocab_size=152_064, hidden_size=3584,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              intermediate_size=18_944),
    "qwen2.5-32b": ModelConfig(name="qwen2.5-32b", vocab_size=152_064, hidden_size=5120,
                               num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128,
                               intermediate_size=27_648),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name`, with field overrides (e.g. dtype='float32',
  paged_attention='pallas')."""
  if name not in PRESETS:
    raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"model: unknown field(s) {sorted(unknown)} for ModelConfig")
  return PRESETS[name].replace(**overrides)
