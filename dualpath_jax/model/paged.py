"""Paged KV pool on a decode engine, its host-side page table, and batched decode.

Pool layout (KVLayout's paged pool): pages [L, num_pages, page_tokens, 2, H, D] in the model dtype.
A page holds `page_tokens` consecutive tokens of one sequence in every layer, so with page_tokens
equal to block_tokens a Full Block [L, B, 2, H, D] is exactly one page (`write_full_blocks_to_pages`).
Token t of a sequence lives at page block_table[t // page_tokens], slot t % page_tokens.

Page SCRATCH_PAGE (0) is never given to a sequence. Padding rows of a decode batch point all their
page ids at it with seq_len 0: they write their (ignored) KV into its slot 0 and attend to that slot
only, so they cannot touch a real sequence's KV. Unused tail entries of a real row's block table
should also be SCRATCH_PAGE; they are masked out.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model.config import ModelConfig
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

  def _with(self, seq_id, pages: tuple[int, ...], length: int, free: tuple[int, ...]):
    block_tables, seq_lens = dict(self.block_tables), dict(self.seq_lens)
    block_tables[seq_id], seq_lens[seq_id] = pages, length
    return dataclasses.replace(self, free_pages=free, block_tables=block_tables, seq_lens=seq_lens)

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
    return dataclasses.replace(self, free_pages=self.free_pages + pages,
                               block_tables=block_tables, seq_lens=seq_lens)

  def prepare_decode(self, seq_ids: Sequence[Hashable], *, batch_size: int, max_pages: int
                     ) -> tuple["PageTable", np.ndarray, np.ndarray]:
    """Reserves one more token for each of `seq_ids` and builds `decode_step`'s inputs.

    Returns (new table, block_tables [batch_size, max_pages] int32, seq_lens [batch_size] int32),
    where seq_lens are the lengths before this step (the new tokens' positions). Rows past
    len(seq_ids) are padding: all SCRATCH_PAGE, length 0.
    """
    if len(seq_ids) > batch_size:
      raise ValueError(f"prepare_decode: {len(seq_ids)} sequences exceed batch_size={batch_size}")
    table = self
    block_tables = np.full((batch_size, max_pages), SCRATCH_PAGE, np.int32)
    seq_lens = np.zeros((batch_size,), np.int32)
    for row, seq_id in enumerate(seq_ids):
      table = table.extend(seq_id, 1)
      pages = table.block_tables[seq_id]
      if len(pages) > max_pages:
        raise ValueError(f"prepare_decode: sequence {seq_id!r} has {len(pages)} pages, "
                         f"more than max_pages={max_pages}")
      block_tables[row, :len(pages)] = pages
      seq_lens[row] = table.seq_lens[seq_id] - 1
    return table, block_tables, seq_lens


def init_pool(config: ModelConfig, num_pages: int, page_tokens: int) -> jax.Array:
  """Zeros [L, num_pages, page_tokens, 2, H, D] in the model dtype.

  Zeros matter: masked slots are multiplied by 0 in attention, which only stays 0 for finite data.
  """
  if num_pages < 2:
    raise ValueError(f"init_pool: num_pages must be >= 2 (page {SCRATCH_PAGE} is scratch), "
                     f"got {num_pages}")
  if page_tokens <= 0:
    raise ValueError(f"init_pool: page_tokens must be positive, got {page_tokens}")
  return jnp.zeros((config.num_layers, num_pages, page_tokens, 2, config.num_kv_heads,
                    config.head_dim), config.jnp_dtype)


def _check_pool(pages: jax.Array, kv_tail: tuple[int, ...], what: str) -> None:
  if pages.ndim != 6 or tuple(pages.shape[3:]) != tuple(kv_tail):
    raise ValueError(f"pages: expected [L, num_pages, page_tokens, {', '.join(map(str, kv_tail))}]"
                     f" to match {what}, got {list(pages.shape)}")


def _write_kv(pages, kv, page_ids):
  num_layers, tokens = kv.shape[:2]
  page_tokens = pages.shape[2]
  padded = jnp.pad(kv, [(0, 0), (0, page_ids.shape[0] * page_tokens - tokens)] + [(0, 0)] * 3)
  per_page = padded.reshape(num_layers, page_ids.shape[0], page_tokens, *kv.shape[2:])
  return pages.at[:, page_ids].set(per_page.astype(pages.dtype))


_write_kv_donated = jax.jit(_write_kv, donate_argnums=0)


def write_kv_to_pages(pages: jax.Array, kv: jax.Array, page_ids) -> jax.Array:
  """Writes a sequence's KV [L, T, 2, H, D] into its pages page_ids [ceil(T / page_tokens)].

  T need not be page-aligned: the last page's tail slots get zeros. `pages` is donated.
  """
  page_ids = jnp.asarray(page_ids, jnp.int32)
  _check_pool(pages, kv.shape[2:], "kv")
  if kv.ndim != 5 or kv.shape[0] != pages.shape[0]:
    raise ValueError(f"kv: expected [L={pages.shape[0]}, T, 2, H, D], got {list(kv.shape)}")
  needed = -(-kv.shape[1] // pages.shape[2])
  if page_ids.shape != (needed,):
    raise ValueError(f"page_ids: {kv.shape[1]} tokens need {needed} pages of {pages.shape[2]} "
                     f"tokens, got page_ids of shape {list(page_ids.shape)}")
  return _write_kv_donated(pages, jnp.asarray(kv), page_ids)


def _write_blocks(pages, blocks_typed, page_ids):
  return pages.at[:, page_ids].set(jnp.swapaxes(blocks_typed, 0, 1).astype(pages.dtype))


_write_blocks_donated = jax.jit(_write_blocks, donate_argnums=0)


def write_full_blocks_to_pages(pages: jax.Array, blocks_typed, page_ids) -> jax.Array:
  """Full Blocks [n, L, B, 2, H, D] (KVLayout.full_blocks_as_kv) -> pages page_ids [n], one each.

  Requires page_tokens == B. `pages` is donated.
  """
  page_ids = jnp.asarray(page_ids, jnp.int32)
  expected = (pages.shape[0], pages.shape[2], *pages.shape[3:])
  if blocks_typed.ndim != 6 or tuple(blocks_typed.shape[1:]) != expected:
    raise ValueError(f"blocks_typed: expected [n, {', '.join(map(str, expected))}] (page_tokens "
                     f"= block_tokens), got {list(blocks_typed.shape)}")
  if page_ids.shape != (blocks_typed.shape[0],):
    raise ValueError(f"page_ids: expected [{blocks_typed.shape[0]}], got {list(page_ids.shape)}")
  return _write_blocks_donated(pages, jnp.asarray(blocks_typed), page_ids)


def _read_kv(pages, page_ids, num_tokens):
  gathered = pages[:, page_ids]  # [L, n, page_tokens, 2, H, D]
  return gathered.reshape(pages.shape[0], -1, *pages.shape[3:])[:, :num_tokens]


_read_kv_jit = jax.jit(_read_kv, static_argnames=("num_tokens",))


def read_kv_from_pages(pages: jax.Array, page_ids, num_tokens: int) -> jax.Array:
  """The first `num_tokens` tokens' KV [L, T, 2, H, D] of the pages page_ids, in order."""
  page_ids = jnp.asarray(page_ids, jnp.int32)
  if page_ids.ndim != 1 or not 0 <= num_tokens <= page_ids.shape[0] * pages.shape[2]:
    raise ValueError(f"read_kv_from_pages: num_tokens={num_tokens} does not fit page_ids of shape "
                     f"{list(page_ids.shape)} with {pages.shape[2]} tokens a page")
  return _read_kv_jit(pages, page_ids, num_tokens=int(num_tokens))


def decode_step(model: Transformer, pages: jax.Array, tokens: jax.Array, block_tables: jax.Array,
                seq_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One decode step for a batch of sequences of different lengths (`decode_step_jit` donates).

  pages [L, num_pages, page_tokens, 2, H, D]; tokens [B] int32; block_tables [B, P] int32;
  seq_lens [B] int32 (tokens already in the pool = the new token's position).
  Writes each new token's KV at page block_tables[b, seq_lens[b] // page_tokens], slot
  seq_lens[b] % page_tokens; that page must already be in the row's block table (see
  PageTable.prepare_decode: out-of-range indices would be clamped, not caught, under jit).
  Returns (logits [B, vocab] float32, updated pages).
  """
  config = model.config
  _check_pool(pages, (2, config.num_kv_heads, config.head_dim), "the model config")
  batch = tokens.shape[0]
  if pages.shape[0] != config.num_layers or pages.dtype != config.jnp_dtype:
    raise ValueError(f"pages: expected L={config.num_layers} layers of {config.dtype}, "
                     f"got {list(pages.shape)} {pages.dtype}")
  if tokens.ndim != 1 or seq_lens.shape != (batch,) or block_tables.ndim != 2 \
      or block_tables.shape[0] != batch:
    raise ValueError(f"decode_step: expected tokens [B], block_tables [B, P], seq_lens [B], got "
                     f"{list(tokens.shape)}, {list(block_tables.shape)}, {list(seq_lens.shape)}")
  page_tokens = pages.shape[2]
  context_tokens = block_tables.shape[1] * page_tokens
  seq_lens = seq_lens.astype(jnp.int32)
  # The new token attends to the pool's first seq_lens slots and to itself (the last key).
  context_ok = jnp.arange(context_tokens, dtype=jnp.int32)[None, :] < seq_lens[:, None]
  mask = jnp.concatenate([context_ok, jnp.ones((batch, 1), bool)], axis=-1)[:, None, :]
  write_page = jnp.take_along_axis(block_tables, (seq_lens // page_tokens)[:, None], axis=1)[:, 0]
  write_slot = seq_lens % page_tokens
  x = model.embed(tokens[:, None])  # [B, 1, hidden]
  for layer_index, layer in enumerate(model.layers):
    context = pages[layer_index][block_tables]  # [B, P, page_tokens, 2, H, D]
    context = context.reshape(batch, context_tokens, *pages.shape[3:])
    x, new_kv = layer(x, seq_lens[:, None], context, mask)
    pages = pages.at[layer_index, write_page, write_slot].set(new_kv[:, 0])
  return model.logits(x[:, 0]), pages


# The pool is donated: XLA updates it in place instead of copying all of it every step.
decode_step_jit = jax.jit(decode_step, donate_argnames=("pages",))
