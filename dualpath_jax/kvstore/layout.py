"""KV layouts: model KV arrays, Full Blocks and Layer Blocks (PAPER.md section 2.4).

Shapes (L layers, T tokens, H kv heads, D head dim, B = block_tokens, W = token_layer_bytes):
  model KV of a sequence    [L, T, 2, H, D]   model dtype; index 0 of axis 2 is K, 1 is V
  model KV of one layer        [T, 2, H, D]
  Full Block                [L, B, W]          uint8; W = 2 * H * D * itemsize
  Layer Block               [1, B, W]          uint8; a view of one layer of a Full Block
  paged pool (decode)       per layer, K and V apart: [H, pages, B, D] each; page p of all 2L
                            arrays holds one block's tokens (model/paged.py, PagedPool)

A Full Block is the byte view of the model KV of B tokens, so Full Block <-> [L, B, 2, H, D] is a
free reinterpretation (`np.ndarray.view`), and a Layer Block is a slice of a Full Block: no layout
conversion is ever needed. The only copies are the ones the data movement itself needs: cutting a
sequence's KV into per-block contiguous buffers (a transpose of the token axis in front of the
layer axis) and gathering one layer across blocks for a layerwise transfer. (The DE's paged pool
splits K from V and puts the head axis first, the layout its paged-attention kernel reads; that
transpose happens on the device as KV enters or leaves the pool.)
"""

from __future__ import annotations

import dataclasses

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from dualpath_jax.kvstore import host_copy

DEFAULT_BLOCK_TOKENS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVLayout:
  """Byte geometry of the KV cache of one model."""

  num_layers: int
  """Transformer layers (L)."""
  num_kv_heads: int
  """KV heads per layer (H)."""
  head_dim: int
  """Head width (D)."""
  dtype: str
  """KV dtype name as numpy spells it ('bfloat16', 'float32', 'float16')."""
  block_tokens: int = DEFAULT_BLOCK_TOKENS
  """Tokens per Full Block (B)."""

  def __post_init__(self):
    for field in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"KVLayout.{field} must be a positive int, got {value!r}")
    try:
      np.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"KVLayout.dtype: unknown dtype {self.dtype!r}") from e

  @classmethod
  def for_model(cls, model_config, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> "KVLayout":
    return cls(num_layers=model_config.num_layers, num_kv_heads=model_config.num_kv_heads,
               head_dim=model_config.head_dim, dtype=model_config.dtype, block_tokens=block_tokens)

  @property
  def np_dtype(self) -> np.dtype:
    return np.dtype(self.dtype)

  @property
  def token_layer_bytes(self) -> int:
    """W: K and V bytes of one token in one layer."""
    return 2 * self.num_kv_heads * self.head_dim * self.np_dtype.itemsize

  @property
  def kv_bytes_per_token(self) -> int:
    """K and V bytes of one token over all layers."""
    return self.num_layers * self.token_layer_bytes

  @property
  def layer_block_bytes(self) -> int:
    return self.block_tokens * self.token_layer_bytes

  @property
  def full_block_bytes(self) -> int:
    return self.num_layers * self.layer_block_bytes

  @property
  def full_block_shape(self) -> tuple[int, int, int]:
    return (self.num_layers, self.block_tokens, self.token_layer_bytes)

  @property
  def token_kv_shape(self) -> tuple[int, int, int]:
    """Shape of one token's KV in one layer: [2, H, D]."""
    return (2, self.num_kv_heads, self.head_dim)

  def num_full_blocks(self, tokens: int) -> int:
    """Complete blocks in a sequence of `tokens` tokens (a partial tail is not a block)."""
    return tokens // self.block_tokens

  # --- conversions -------------------------------------------------------------------------------

  def check_kv(self, kv: np.ndarray, what: str = "kv") -> None:
    expected = (self.num_layers, None, *self.token_kv_shape)
    if (kv.ndim != 5 or kv.shape[0] != self.num_layers or kv.shape[2:] != self.token_kv_shape):
      raise ValueError(f"{what}: expected shape [L={expected[0]}, T, 2, H={expected[3]}, "
                       f"D={expected[4]}], got {list(kv.shape)}")
    if kv.dtype != self.np_dtype:
      raise ValueError(f"{what}: expected dtype {self.dtype}, got {kv.dtype}")

  def check_full_blocks(self, blocks: np.ndarray, what: str = "blocks") -> None:
    if blocks.ndim != 4 or blocks.shape[1:] != self.full_block_shape or blocks.dtype != np.uint8:
      raise ValueError(f"{what}: expected uint8 Full Blocks [n, {', '.join(map(str, self.full_block_shape))}]"
                       f", got {blocks.dtype} {list(blocks.shape)}")

  def kv_to_full_blocks(self, kv: np.ndarray) -> np.ndarray:
    """[L, n*B, 2, H, D] model KV -> [n, L, B, W] uint8 Full Blocks (one transpose copy)."""
    self.check_kv(kv)
    tokens = kv.shape[1]
    if tokens % self.block_tokens:
      raise ValueError(f"kv: {tokens} tokens is not a multiple of block_tokens={self.block_tokens}")
    n = tokens // self.block_tokens
    # Copies move bytes (uint8): numpy copies extension dtypes such as bfloat16 element by
    # element, several times slower than a byte copy.
    raw = np.ascontiguousarray(kv).view(np.uint8).reshape(self.num_layers, n, self.block_tokens,
                                                           -1)
    out = np.empty((n, *raw.shape[:1], *raw.shape[2:]), np.uint8)
    return host_copy.copy(out, raw.transpose(1, 0, 2, 3)).reshape(n, *self.full_block_shape)

  def full_blocks_as_kv(self, blocks: np.ndarray) -> np.ndarray:
    """[n, L, B, W] uint8 -> [n, L, B, 2, H, D] model dtype: a view, no copy."""
    self.check_full_blocks(blocks)
    blocks = np.ascontiguousarray(blocks)
    return blocks.view(self.np_dtype).reshape(blocks.shape[0], self.num_layers, self.block_tokens,
                                              *self.token_kv_shape)

  def full_blocks_to_kv(self, blocks, out: np.ndarray | None = None,
                        tokens: int | None = None) -> np.ndarray:
    """Full Blocks -> [L, tokens, 2, H, D] model KV (one transposing copy), into `out` (a uint8
    buffer of at least that many bytes) when given. `tokens` (default n*B) may be larger: the
    rows past n*B are zeros.

    blocks: uint8 [n, L, B, W], or a sequence of n Full Blocks [L, B, W] as the store's reads
    return them (no stacked copy in between: each block lands at its rows of every layer). This
    is how a read lands in a node buffer: layer-major, so that each layer's prefix is one
    contiguous array that goes to a device as it is (no per-layer gather; PAPER.md section A.5:
    n Layer Blocks side by side are one layer of the prefix).
    """
    stacked = isinstance(blocks, np.ndarray)
    if stacked:
      self.check_full_blocks(blocks)
    else:
      for i, block in enumerate(blocks):
        if np.shape(block) != self.full_block_shape or np.asarray(block).dtype != np.uint8:
          raise ValueError(f"blocks[{i}]: expected a uint8 Full Block "
                           f"{list(self.full_block_shape)}, got {np.asarray(block).dtype} "
                           f"{list(np.shape(block))}")
    n = len(blocks)
    raw = self._kv_rows(n, out, tokens, self.num_layers)
    bt = self.block_tokens
    if stacked:
      src = blocks.transpose(1, 0, 2, 3)  # a byte copy (see kv_to_full_blocks)
      host_copy.copy(raw[:, :n * bt].reshape(src.shape), src)
    else:
      def land(part: slice) -> None:
        for i in range(part.start, part.stop):
          raw[:, i * bt:(i + 1) * bt] = blocks[i]
      host_copy.for_ranges(n, n * self.full_block_bytes, land)
    return raw.view(self.np_dtype).reshape(self.num_layers, -1, *self.token_kv_shape)

  def landing_rows(self, num_blocks: int, out: np.ndarray, tokens: int) -> np.ndarray:
    """A uint8 [L, tokens, token_layer_bytes] array in `out` whose rows past num_blocks' tokens
    are zeroed: where a read of num_blocks Full Blocks lands layer-major (block i at rows
    [i*B, (i+1)*B) of every layer; full_blocks_to_kv's layout)."""
    return self._kv_rows(num_blocks, out, tokens, self.num_layers)

  def _kv_rows(self, num_blocks: int, out, tokens, layers: int) -> np.ndarray:
    """A uint8 [layers, tokens, token_layer_bytes] array (in `out` when given) whose rows past
    the blocks' tokens are zeroed."""
    have = num_blocks * self.block_tokens
    tokens = have if tokens is None else tokens
    if tokens < have:
      raise ValueError(f"tokens: {tokens} is fewer than the blocks' {have}")
    shape = (layers, tokens, self.token_layer_bytes)
    nbytes = layers * tokens * self.token_layer_bytes
    if out is None:
      raw = np.empty(shape, np.uint8)
    elif out.dtype != np.uint8 or out.size < nbytes:
      raise ValueError(f"out: expected uint8 of at least {nbytes} bytes, got {out.dtype} "
                       f"{list(out.shape)}")
    else:
      raw = out.reshape(-1)[:nbytes].reshape(shape)
    raw[:, have:] = 0
    return raw

  def layer_block(self, full_block: np.ndarray, layer: int) -> np.ndarray:
    """One Layer Block [1, B, W] of a Full Block [L, B, W]: a view."""
    if full_block.shape != self.full_block_shape:
      raise ValueError(f"full_block: expected {list(self.full_block_shape)}, got {list(full_block.shape)}")
    return full_block[layer:layer + 1]

  def layer_kv(self, blocks: np.ndarray, layer: int, out: np.ndarray | None = None,
               tokens: int | None = None) -> np.ndarray:
    """Layer `layer` of n Full Blocks as one contiguous model-KV array [tokens, 2, H, D]
    (tokens: default n*B; rows past n*B are zeros).

    This is the per-layer transfer unit of layerwise loading: n Layer Blocks gathered into one
    buffer (one copy of 1/L of the blocks' bytes). `out`, a reused uint8 buffer of at least
    n * B * W bytes, saves the fresh allocation, whose first-touch page faults made the gather
    several times slower than the copy itself (3.3 GB/s on the 4x H200 host, 2026-11-27).
    Large gathers are split over host_copy's threads.
    """
    self.check_full_blocks(blocks)
    raw = self._kv_rows(blocks.shape[0], out, tokens, 1)[0]  # a byte copy (see kv_to_full_blocks)
    have = blocks.shape[0] * self.block_tokens
    # split over host_copy's threads when large
    host_copy.copy(raw[:have].reshape(blocks.shape[0], self.block_tokens, -1), blocks[:, layer])
    return raw.view(self.np_dtype).reshape(-1, *self.token_kv_shape)
