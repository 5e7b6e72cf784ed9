"""Paged KV pool on a decode engine, its host-side page table, and batched decode.

Pool layout (KVLayout's paged pool): a `PagedPool` pytree of 2 * L separate arrays, K and V of
every layer, each [H, num_pages, page_tokens, D] in the model dtype (the layout the Pallas GPU
paged-attention kernels read in place, JAX's and model/paged_kernel.py; one array per layer and
per K/V because slicing a layer out of a larger array for a pallas_call makes XLA copy it). Page
p of every array together holds `page_tokens` consecutive tokens of one sequence in every layer,
so with page_tokens equal to block_tokens a Full Block [L, B, 2, H, D] is exactly one page
(`write_full_blocks_to_pages`).
Token t of a sequence lives at page block_table[t // page_tokens], slot t % page_tokens. The
public inputs and outputs stay in the model's KV layout: KV [L, T, 2, H, D] in
(`write_kv_to_pages`) and out (`read_kv_from_pages`), Full Blocks [n, L, B, 2, H, D] in.

Decode attention (ModelConfig.paged_attention): 'gather' copies each row's pages into a dense
context per layer and runs the model's attention on it; 'pallas' writes the new token's K/V into
its page slot first and calls a Pallas kernel on the pool with lengths = seq_lens + 1: JAX's, or
the project's own (model/paged_kernel.py), as ModelConfig.pallas_kernel says. The
kernel's blocking (`pallas_blocking`: how many partitions of a row's pages run in parallel, how
many pages each loop iteration reads) comes from ModelConfig.pallas_k_splits and
ModelConfig.pallas_block_tokens (defaults PALLAS_MAX_K_SPLITS, PALLAS_COMPUTE_BLOCK_TOKENS), its
Triton compilation from pallas_num_warps and pallas_num_stages. They are part of the model's
config, so a model under other values (weights.with_config, no copy of the weights) traces its
own decode step: they can be swept in one process (bench/engine.py, engine.pallas_blockings).

Page SCRATCH_PAGE (0) is never given to a sequence. Padding rows of a decode batch point all their
page ids at it with seq_len 0: they write their (ignored) KV into its slot 0 and attend to that slot
only, so they cannot touch a real sequence's KV. Unused tail entries of a real row's block table
should also be SCRATCH_PAGE; they are masked out.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model.config import ModelConfig
from dualpath_jax.model.flat import split_module
from dualpath_jax.model.transformer import Transformer

SCRATCH_PAGE = 0


class OutOfPagesError(RuntimeError):
  """The pool has fewer free pages than an allocation needs."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PageTable:
  """Which pages each sequence owns. Functional: every update returns a new table."""

  num_pages: int
  """Pages in the pool, SCRATCH_PAGE included (num_pages - 1 are allocatable)."""
  page_tokens: int
  """Tokens per page."""
  free_pages: tuple[int, ...]
  """Unallocated page ids, handed out from the front."""
  block_tables: Mapping[Hashable, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  """Per sequence id: its page ids in token order."""
  seq_lens: Mapping[Hashable, int] = dataclasses.field(default_factory=dict)
  """Per sequence id: tokens whose KV is (or is about to be) in its pages."""

  def __post_init__(self):
    for field in ("num_pages", "page_tokens"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"PageTable.{field} must be a positive int, got {value!r}")
    if SCRATCH_PAGE in self.free_pages:
      raise ValueError(f"PageTable.free_pages must not contain SCRATCH_PAGE={SCRATCH_PAGE}")
    if any(not 0 <= p < self.num_pages for p in self.free_pages):
      raise ValueError(f"PageTable.free_pages: page ids must be in [1, {self.num_pages})")
    # Read-only views, so that no caller can mutate a table that others hold.
    object.__setattr__(self, "block_tables", types.MappingProxyType(dict(self.block_tables)))
    object.__setattr__(self, "seq_lens", types.MappingProxyType(dict(self.seq_lens)))

  @classmethod
  def create(cls, num_pages: int, page_tokens: int) -> "PageTable":
    """An empty table whose free list is pages 1 .. num_pages - 1."""
    return cls(num_pages=num_pages, page_tokens=page_tokens,
               free_pages=tuple(range(SCRATCH_PAGE + 1, num_pages)))

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_tokens)

  def _derived(self, free: tuple[int, ...], block_tables: dict, seq_lens: dict) -> "PageTable":
    """A table made from this one by an update that only moves pages between its free list and
    its sequences: the checks of __post_init__ (O(pages), milliseconds a decode step on a DE's
    pool when every update ran them) hold by construction and are not repeated."""
    table = object.__new__(type(self))
    for name, value in (("num_pages", self.num_pages), ("page_tokens", self.page_tokens),
                        ("free_pages", free),
                        ("block_tables", types.MappingProxyType(block_tables)),
                        ("seq_lens", types.MappingProxyType(seq_lens))):
      object.__setattr__(table, name, value)
    return table

  def _with(self, seq_id, pages: tuple[int, ...], length: int, free: tuple[int, ...]):
    block_tables, seq_lens = dict(self.block_tables), dict(self.seq_lens)
    block_tables[seq_id], seq_lens[seq_id] = pages, length
    return self._derived(free, block_tables, seq_lens)

  def _take(self, count: int, seq_id) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if count > len(self.free_pages):
      raise OutOfPagesError(f"sequence {seq_id!r} needs {count} more page(s) of "
                            f"{self.page_tokens} tokens; {len(self.free_pages)} free")
    return self.free_pages[:count], self.free_pages[count:]

  def allocate(self, seq_id: Hashable, num_tokens: int) -> "PageTable":
    """Adds a sequence of `num_tokens` tokens (e.g. a prompt) with the pages it needs."""
    if seq_id in self.seq_lens:
      raise ValueError(f"PageTable.allocate: sequence {seq_id!r} already exists")
    if num_tokens < 0:
      raise ValueError(f"PageTable.allocate: num_tokens must be >= 0, got {num_tokens}")
    taken, free = self._take(self.pages_for(num_tokens), seq_id)
    return self._with(seq_id, taken, num_tokens, free)

  def extend(self, seq_id: Hashable, num_tokens: int = 1) -> "PageTable":
    """Grows a sequence by `num_tokens`, taking a new page whenever it crosses a page boundary."""
    if seq_id not in self.seq_lens:
      raise ValueError(f"PageTable.extend: unknown sequence {seq_id!r}")
    length = self.seq_lens[seq_id] + num_tokens
    pages = self.block_tables[seq_id]
    taken, free = self._take(self.pages_for(length) - len(pages), seq_id)
    return self._with(seq_id, pages + taken, length, free)

  def free(self, seq_id: Hashable) -> "PageTable":
    """Drops a sequence and returns its pages to the free list."""
    if seq_id not in self.seq_lens:
      raise ValueError(f"PageTable.free: unknown sequence {seq_id!r}")
    block_tables, seq_lens = dict(self.block_tables), dict(self.seq_lens)
    pages = block_tables.pop(seq_id)
    del seq_lens[seq_id]
    return self._derived(self.free_pages + pages, block_tables, seq_lens)

  def prepare_decode(self, seq_ids: Sequence[Hashable], *, batch_size: int, max_pages: int
                     ) -> tuple["PageTable", np.ndarray, np.ndarray]:
    """Reserves one more token for each of `seq_ids` and builds `decode_step`'s inputs.

    Returns (new table, block_tables [batch_size, max_pages] int32, seq_lens [batch_size] int32),
    where seq_lens are the lengths before this step (the new tokens' positions). Rows past
    len(seq_ids) are padding: all SCRATCH_PAGE, length 0; so is a row whose entry is None (a
    free slot of a DE's batch, whose sequences keep their row while they decode).
    """
    if len(seq_ids) > batch_size:
      raise ValueError(f"prepare_decode: {len(seq_ids)} sequences exceed batch_size={batch_size}")
    # One new table for the whole batch (a DE calls this every step): as `extend` row by row.
    tables, lengths = dict(self.block_tables), dict(self.seq_lens)
    free, taken = self.free_pages, 0
    block_tables = np.full((batch_size, max_pages), SCRATCH_PAGE, np.int32)
    seq_lens = np.zeros((batch_size,), np.int32)
    for row, seq_id in enumerate(seq_ids):
      if seq_id is None:
        continue
      if seq_id not in lengths:
        raise ValueError(f"PageTable.prepare_decode: unknown sequence {seq_id!r}")
      length, pages = lengths[seq_id] + 1, tables[seq_id]
      need = self.pages_for(length) - len(pages)
      if need > 0:
        if taken + need > len(free):
          raise OutOfPagesError(f"sequence {seq_id!r} needs {need} more page(s) of "
                                f"{self.page_tokens} tokens; {len(free) - taken} free")
        pages = pages + free[taken:taken + need]
        taken += need
      if len(pages) > max_pages:
        raise ValueError(f"prepare_decode: sequence {seq_id!r} has {len(pages)} pages, "
                         f"more than max_pages={max_pages}")
      tables[seq_id], lengths[seq_id] = pages, length
      block_tables[row, :len(pages)] = pages
      seq_lens[row] = length - 1
    return self._derived(free[taken:], tables, lengths), block_tables, seq_lens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedPool:
  """A decode engine's paged KV pool: K and V pages of every layer as separate arrays (a pytree:
  jit, donation and jax.device_put treat it like an array)."""

  k: tuple[jax.Array, ...]
  """Per layer: K pages [H, num_pages, page_tokens, D], model dtype (after RoPE)."""
  v: tuple[jax.Array, ...]
  """Per layer: V pages [H, num_pages, page_tokens, D], model dtype."""

  @property
  def num_layers(self) -> int:
    """Layers (L)."""
    return len(self.k)

  @property
  def num_pages(self) -> int:
    """Pages in the pool, SCRATCH_PAGE included."""
    return self.k[0].shape[1]

  @property
  def page_tokens(self) -> int:
    """Tokens per page."""
    return self.k[0].shape[2]

  @property
  def kv_tail(self) -> tuple[int, int]:
    """(H, D) of every page array."""
    return self.k[0].shape[0], self.k[0].shape[3]

  @property
  def dtype(self):
    """The KV dtype (the model dtype)."""
    return self.k[0].dtype

  @property
  def nbytes(self) -> int:
    """Bytes of all pages of all layers."""
    return sum(int(a.nbytes) for a in self.k + self.v)


def init_pool(config: ModelConfig, num_pages: int, page_tokens: int) -> PagedPool:
  """Zeros: K and V [H, num_pages, page_tokens, D] per layer in the model dtype.

  Zeros matter: masked slots are multiplied by 0 in attention, which only stays 0 for finite data.
  """
  if num_pages < 2:
    raise ValueError(f"init_pool: num_pages must be >= 2 (page {SCRATCH_PAGE} is scratch), "
                     f"got {num_pages}")
  if page_tokens <= 0:
    raise ValueError(f"init_pool: page_tokens must be positive, got {page_tokens}")
  shape = (config.num_kv_heads, num_pages, page_tokens, config.head_dim)
  zeros = lambda: jnp.zeros(shape, config.jnp_dtype)  # noqa: E731  (distinct buffers)
  return PagedPool(k=tuple(zeros() for _ in range(config.num_layers)),
                   v=tuple(zeros() for _ in range(config.num_layers)))


def _check_pool(pool, kv_tail: tuple[int, ...] | None, what: str = "") -> None:
  """pool must be a PagedPool whose every array is [H, num_pages, page_tokens, D] alike, with
  (H, D) = kv_tail[-2:] unless kv_tail is None (the trailing [..., H, D] of `what`)."""
  if not isinstance(pool, PagedPool):
    raise ValueError(f"pages: expected a PagedPool (init_pool), got {type(pool).__name__}")
  if len(pool.k) != len(pool.v) or not pool.k:
    raise ValueError(f"pages: expected as many K as V layers (> 0), got {len(pool.k)} K and "
                     f"{len(pool.v)} V")
  first = pool.k[0]
  for array in pool.k + pool.v:
    if array.ndim != 4 or array.shape != first.shape or array.dtype != first.dtype:
      raise ValueError(f"pages: every K/V array must be [H, num_pages, page_tokens, D] of one "
                       f"shape and dtype, got {list(array.shape)} {array.dtype} next to "
                       f"{list(first.shape)} {first.dtype}")
  if kv_tail is None:
    return
  heads, head_dim = kv_tail[-2:]
  if (first.shape[0], first.shape[3]) != (heads, head_dim):
    raise ValueError(f"pages: expected [H={heads}, num_pages, page_tokens, D={head_dim}] to match "
                     f"{what}, got {list(first.shape)}")


def _layer_kv_to_pages(kv_layer, num_pages):
  """[n * page_tokens, 2, H, D] -> (K, V) [H, n, page_tokens, D]."""
  per_page = kv_layer.reshape(num_pages, -1, *kv_layer.shape[1:])  # [n, pt, 2, H, D]
  return (jnp.transpose(per_page[:, :, 0], (2, 0, 1, 3)),
          jnp.transpose(per_page[:, :, 1], (2, 0, 1, 3)))


def _set_pages(pool, page_ids, kv):
  """kv [L, n * page_tokens, 2, H, D] into pages page_ids [n] of every layer; entries naming
  SCRATCH_PAGE (the padding of a write: a sequence's own pages are distinct) are dropped.

  The scatters are told their indices are unique (XLA's unique_indices): without it XLA's GPU
  scatter wrote a 16K-token admission (940 MB of Qwen2.5-7B KV) in 4.4 ms, with it in 1.15 ms;
  the decode steps right behind such an admission took +45% (1x H200, 2026-11-29,
  docs/perf/gpu_bench.md record 11, scripts/bench_page_write.py). Scratch entries would repeat,
  so they point past the pool and mode='drop' skips them."""
  ids = jnp.where(page_ids == SCRATCH_PAGE, pool.num_pages, page_ids)
  new_k, new_v = [], []
  for layer in range(pool.num_layers):
    k, v = _layer_kv_to_pages(kv[layer].astype(pool.dtype), page_ids.shape[0])
    new_k.append(pool.k[layer].at[:, ids].set(k, mode="drop", unique_indices=True))
    new_v.append(pool.v[layer].at[:, ids].set(v, mode="drop", unique_indices=True))
  return PagedPool(k=tuple(new_k), v=tuple(new_v))


def _write_kv(pages, kv, page_ids):
  tokens = kv.shape[1]
  padded = jnp.pad(kv, [(0, 0), (0, page_ids.shape[0] * pages.page_tokens - tokens)] + [(0, 0)] * 3)
  return _set_pages(pages, page_ids, padded)


_write_kv_donated = jax.jit(_write_kv, donate_argnums=0)


def _distinct_page_ids(page_ids) -> jax.Array:
  """page_ids as int32; those not SCRATCH_PAGE must be distinct (the scatters rely on it)."""
  if not isinstance(page_ids, jax.Array):  # host ids (every runtime caller): checked here
    host = np.asarray(page_ids).reshape(-1)
    real = host[host != SCRATCH_PAGE]
    if len(np.unique(real)) != len(real):
      raise ValueError(f"page_ids: a page named twice in {host.tolist()} (only SCRATCH_PAGE="
                       f"{SCRATCH_PAGE}, the padding, may repeat)")
  return jnp.asarray(page_ids, jnp.int32)


def write_kv_to_pages(pages: PagedPool, kv: jax.Array, page_ids) -> PagedPool:
  """Writes a sequence's KV [L, T, 2, H, D] into its pages page_ids [ceil(T / page_tokens)].

  T need not be page-aligned: the last page's tail slots get zeros. Page ids must be distinct;
  SCRATCH_PAGE entries (padding) are not written. `pages` is donated.
  """
  page_ids = _distinct_page_ids(page_ids)
  _check_pool(pages, kv.shape[-2:], "kv")
  if kv.ndim != 5 or kv.shape[0] != pages.num_layers or kv.shape[2] != 2:
    raise ValueError(f"kv: expected [L={pages.num_layers}, T, 2, H, D], got {list(kv.shape)}")
  needed = -(-kv.shape[1] // pages.page_tokens)
  if page_ids.shape != (needed,):
    raise ValueError(f"page_ids: {kv.shape[1]} tokens need {needed} pages of {pages.page_tokens} "
                     f"tokens, got page_ids of shape {list(page_ids.shape)}")
  return _write_kv_donated(pages, jnp.asarray(kv), page_ids)


def _write_blocks(pages, blocks_typed, page_ids):
  # [n, L, B, 2, H, D] -> [L, n * B, 2, H, D]
  kv = jnp.swapaxes(blocks_typed, 0, 1).reshape(blocks_typed.shape[1], -1,
                                                 *blocks_typed.shape[3:])
  return _set_pages(pages, page_ids, kv)


_write_blocks_donated = jax.jit(_write_blocks, donate_argnums=0)


def write_full_blocks_to_pages(pages: PagedPool, blocks_typed, page_ids) -> PagedPool:
  """Full Blocks [n, L, B, 2, H, D] (KVLayout.full_blocks_as_kv) -> pages page_ids [n], one each.

  Requires page_tokens == B. Page ids must be distinct; SCRATCH_PAGE entries are not written.
  `pages` is donated.
  """
  page_ids = _distinct_page_ids(page_ids)
  _check_pool(pages, tuple(blocks_typed.shape[-2:]), "blocks_typed")
  expected = (pages.num_layers, pages.page_tokens, 2, *pages.kv_tail)
  if blocks_typed.ndim != 6 or tuple(blocks_typed.shape[1:]) != expected:
    raise ValueError(f"blocks_typed: expected [n, {', '.join(map(str, expected))}] (page_tokens "
                     f"= block_tokens), got {list(blocks_typed.shape)}")
  if page_ids.shape != (blocks_typed.shape[0],):
    raise ValueError(f"page_ids: expected [{blocks_typed.shape[0]}], got {list(page_ids.shape)}")
  return _write_blocks_donated(pages, jnp.asarray(blocks_typed), page_ids)


def _gather_layer(pool, layer, block_tables):
  """Layer `layer`'s pages block_tables [..., n] as dense KV [..., n * page_tokens, 2, H, D]."""
  def dense(pages):  # [H, num_pages, pt, D] -> [..., n * pt, H, D]
    gathered = pages[:, block_tables]  # [H, ..., n, pt, D]
    gathered = jnp.moveaxis(gathered, 0, -2)  # [..., n, pt, H, D]
    return gathered.reshape(*block_tables.shape[:-1], -1, *gathered.shape[-2:])
  return jnp.stack([dense(pool.k[layer]), dense(pool.v[layer])], axis=-3)


def _read_kv(pages, page_ids, num_tokens):
  return jnp.stack([_gather_layer(pages, layer, page_ids)[:num_tokens]
                    for layer in range(pages.num_layers)])


_read_kv_jit = jax.jit(_read_kv, static_argnames=("num_tokens",))


def read_kv_from_pages(pages: PagedPool, page_ids, num_tokens: int) -> jax.Array:
  """The first `num_tokens` tokens' KV [L, T, 2, H, D] of the pages page_ids, in order."""
  page_ids = jnp.asarray(page_ids, jnp.int32)
  _check_pool(pages, None)
  if page_ids.ndim != 1 or not 0 <= num_tokens <= page_ids.shape[0] * pages.page_tokens:
    raise ValueError(f"read_kv_from_pages: num_tokens={num_tokens} does not fit page_ids of shape "
                     f"{list(page_ids.shape)} with {pages.page_tokens} tokens a page")
  return _read_kv_jit(pages, page_ids, num_tokens=int(num_tokens))


# Pallas kernel blocking defaults (ModelConfig.pallas_k_splits, ModelConfig.pallas_block_tokens):
# up to MAX_K_SPLITS partitions of a row's pages run in parallel (their partial softmaxes are
# merged at the end), and each loop iteration of a partition reads about COMPUTE_BLOCK_TOKENS
# tokens (the kernel's default: 8 pages of 16 tokens).
PALLAS_MAX_K_SPLITS = 16
PALLAS_COMPUTE_BLOCK_TOKENS = 128


def pallas_blocking(pages_per_seq: int, page_tokens: int, *,
                    max_k_splits: int = PALLAS_MAX_K_SPLITS,
                    block_tokens: int = PALLAS_COMPUTE_BLOCK_TOKENS) -> tuple[int, int, int]:
  """(k_splits, pages_per_compute_block, padded pages_per_seq) for the Pallas paged kernel.

  At most `max_k_splits` partitions; a compute block is the largest power of 2 of pages that is
  at most block_tokens / page_tokens pages (at least 1) and at most a partition's pages.
  The kernel needs padded % k_splits == 0 and (padded / k_splits) % pages_per_compute_block == 0;
  Triton loads need pages_per_compute_block * page_tokens * head_dim to be a power of 2, so
  pages_per_compute_block is a power of 2. Padding pages (SCRATCH_PAGE) lie past every row's
  length: the kernel masks them and skips partitions that start past it.
  """
  if pages_per_seq <= 0 or page_tokens <= 0:
    raise ValueError(f"pallas_blocking: pages_per_seq and page_tokens must be positive, got "
                     f"{pages_per_seq}, {page_tokens}")
  if max_k_splits <= 0 or block_tokens <= 0:
    raise ValueError(f"pallas_blocking: max_k_splits and block_tokens must be positive, got "
                     f"{max_k_splits}, {block_tokens}")
  k_splits = min(max_k_splits, pages_per_seq)
  per_split = -(-pages_per_seq // k_splits)
  per_block = max(1, min(block_tokens // page_tokens, per_split))
  per_block = 1 << (per_block.bit_length() - 1)  # largest power of 2 <= per_block
  per_split = -(-per_split // per_block) * per_block
  k_splits = -(-pages_per_seq // per_split)
  return k_splits, per_block, k_splits * per_split


def pallas_kernel_args(block_tables, page_tokens: int, config: ModelConfig):
  """(block_tables padded with SCRATCH_PAGE, the keyword arguments of either Pallas kernel's
  paged_attention) for config's blocking and compilation fields (read at trace time)."""
  k_splits, per_block, padded = pallas_blocking(
      block_tables.shape[1], page_tokens, max_k_splits=config.pallas_k_splits,
      block_tokens=config.pallas_block_tokens)
  block_tables = jnp.pad(block_tables, [(0, 0), (0, padded - block_tables.shape[1])],
                         constant_values=SCRATCH_PAGE)
  return block_tables, dict(k_splits=k_splits, pages_per_compute_block=per_block,
                            num_warps=config.pallas_num_warps,
                            num_stages=config.pallas_num_stages,
                            interpret=jax.default_backend() == "cpu")


def _pallas_attention(q, k_pages, v_pages, block_tables, lengths, config: ModelConfig):
  """Paged attention of one new token per row: q [B, N, D] -> [B, N, D], by the Pallas kernel
  config.pallas_kernel names, blocked and compiled as `pallas_kernel_args` says."""
  block_tables, kernel_args = pallas_kernel_args(block_tables, k_pages.shape[2], config)
  if config.pallas_kernel == "dualpath":
    from dualpath_jax.model.paged_kernel import paged_attention as dualpath_paged_attention
    return dualpath_paged_attention(q, k_pages, v_pages, block_tables, lengths, **kernel_args)
  from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
  # JAX's kernel does not scale the scores (nor does its reference): scale q by head_dim ** -0.5
  # as transformer.attention scales its float32 scores (in bf16 this rounds q once more).
  q = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
  return paged_attention(q, k_pages, v_pages, block_tables, lengths, **kernel_args)


def decode_step(model: Transformer, pages: PagedPool, tokens: jax.Array, block_tables: jax.Array,
                seq_lens: jax.Array) -> tuple[jax.Array, PagedPool]:
  """One decode step for a batch of sequences of different lengths (`decode_step_jit` donates).

  pages: the PagedPool (init_pool); tokens [B] int32; block_tables [B, P] int32;
  seq_lens [B] int32 (tokens already in the pool = the new token's position).
  Writes each new token's KV at page block_tables[b, seq_lens[b] // page_tokens], slot
  seq_lens[b] % page_tokens; that page must already be in the row's block table (see
  PageTable.prepare_decode: out-of-range indices would be clamped, not caught, under jit).
  Attention follows model.config.paged_attention ('gather' or 'pallas', see the module doc),
  'pallas' blocked by model.config.pallas_k_splits and pallas_block_tokens.
  Returns (logits [B, vocab] float32, updated pages).
  """
  config = model.config
  _check_pool(pages, (config.num_kv_heads, config.head_dim), "the model config")
  batch = tokens.shape[0]
  if pages.num_layers != config.num_layers or pages.dtype != config.jnp_dtype:
    raise ValueError(f"pages: expected L={config.num_layers} layers of {config.dtype}, "
                     f"got {pages.num_layers} of {pages.dtype}")
  if tokens.ndim != 1 or seq_lens.shape != (batch,) or block_tables.ndim != 2 \
      or block_tables.shape[0] != batch:
    raise ValueError(f"decode_step: expected tokens [B], block_tables [B, P], seq_lens [B], got "
                     f"{list(tokens.shape)}, {list(block_tables.shape)}, {list(seq_lens.shape)}")
  page_tokens = pages.page_tokens
  context_tokens = block_tables.shape[1] * page_tokens
  block_tables = block_tables.astype(jnp.int32)
  seq_lens = seq_lens.astype(jnp.int32)
  write_page = jnp.take_along_axis(block_tables, (seq_lens // page_tokens)[:, None], axis=1)[:, 0]
  write_slot = seq_lens % page_tokens
  positions = seq_lens[:, None]
  # The new token attends to the pool's first seq_lens slots and to itself.
  if config.paged_attention == "gather":  # itself: the last key, after the dense context
    context_ok = jnp.arange(context_tokens, dtype=jnp.int32)[None, :] < seq_lens[:, None]
    mask = jnp.concatenate([context_ok, jnp.ones((batch, 1), bool)], axis=-1)[:, None, :]

  def write(layer_pages, new):  # [H, num_pages, pt, D] <- new [B, H, D] at (write_page, slot)
    return layer_pages.at[:, write_page, write_slot].set(
        jnp.swapaxes(new, 0, 1).astype(layer_pages.dtype))

  new_k, new_v = list(pages.k), list(pages.v)
  x = model.embed(tokens[:, None])  # [B, 1, hidden]
  for index, layer in enumerate(model.layers):
    if config.paged_attention == "gather":
      context = _gather_layer(pages, index, block_tables)  # [B, context_tokens, 2, H, D]
      x, new_kv = layer(x, positions, context, mask)
      new_k[index] = write(new_k[index], new_kv[:, 0, 0])
      new_v[index] = write(new_v[index], new_kv[:, 0, 1])
    else:
      q, k, v = layer.project_qkv(x, positions)
      # The token's own K/V goes into its slot first: the kernel reads it from there.
      new_k[index], new_v[index] = write(new_k[index], k[:, 0]), write(new_v[index], v[:, 0])
      attn = _pallas_attention(q[:, 0], new_k[index], new_v[index], block_tables, seq_lens + 1,
                               config)
      x = layer.output_and_mlp(x, attn.reshape(batch, 1, config.num_heads * config.head_dim))
  return model.logits(x[:, 0]), PagedPool(k=tuple(new_k), v=tuple(new_v))


# The pool is donated: XLA updates it in place instead of copying all of it every step. The model
# goes in as its parameter arrays (model/flat.py).
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_step_flat(structure, leaves, pages, tokens, block_tables, seq_lens):
  return decode_step(structure.merge(leaves), pages, tokens, block_tables, seq_lens)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _greedy_step_flat(structure, leaves, pages, tokens, block_tables, seq_lens):
  logits, pages = decode_step(structure.merge(leaves), pages, tokens, block_tables, seq_lens)
  next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # The next step's lengths if every row goes on: one more token; padding rows (length 0) stay.
  return next_tokens, jnp.where(seq_lens > 0, seq_lens + 1, 0), pages


def decode_step_jit(model: Transformer, pages: PagedPool, tokens: jax.Array,
                    block_tables: jax.Array, seq_lens: jax.Array) -> tuple[jax.Array, PagedPool]:
  """`decode_step` compiled, with the pool donated.

  The model goes in as its parameter arrays, split from the module once per model object
  (model/flat.py: dispatch per step 1.9 -> 0.37 ms on the 2-core sandbox, 2026-11-27).
  """
  structure, leaves = split_module(model)
  return _decode_step_flat(structure, leaves, pages, tokens, block_tables, seq_lens)


def greedy_decode_step_jit(model: Transformer, pages: PagedPool, tokens: jax.Array,
                           block_tables: jax.Array, seq_lens: jax.Array
                           ) -> tuple[jax.Array, jax.Array, PagedPool]:
  """`decode_step_jit` with the greedy choice in the same program: returns (next tokens [B]
  int32, the next step's seq_lens if the batch goes on unchanged [B] int32, updated pages). A
  DE feeds both back to the next step without a host round trip (runtime/decode_worker.py)."""
  structure, leaves = split_module(model)
  return _greedy_step_flat(structure, leaves, pages, tokens, block_tables, seq_lens)
