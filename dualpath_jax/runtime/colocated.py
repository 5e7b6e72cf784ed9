"""One engine that does a whole turn on one device: the reference flow, without disaggregation.

A turn's life here: hash the prompt into Full Blocks -> look up the longest cached prefix in the
store -> read those blocks (each verified; a corrupt block ends the hit there and is recomputed) ->
prefill only the rest, with the prefix KV as input -> greedy-decode the forced number of tokens over
a paged pool -> persist every completed Full Block not already stored, so that the next turn hits
it. With `use_cache=False` nothing is read (a full recompute): the reference that cached runs are
compared with, token for token.

The disaggregated runtime splits exactly these steps over prefill and decode engines; this module
stays the ground truth for its outputs.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.kvstore.block_store import KVBlockStore
from dualpath_jax.kvstore.hashing import chain_block_hashes
from dualpath_jax.model import paged
from dualpath_jax.model.prefill import pad_axis, pow2_at_least, prefill_jit
from dualpath_jax.model.transformer import Transformer



@dataclasses.dataclass(frozen=True, kw_only=True)
class TurnResult:
  """What one turn did."""

  prompt_tokens: int
  """Tokens in the prompt (context + append)."""
  hit_tokens: int
  """Prompt tokens whose KV came from the store (whole blocks)."""
  generated: np.ndarray
  """[G] int32 greedy tokens."""
  bytes_read: int
  """Store bytes read for the hit."""
  bytes_written: int
  """Store bytes of Full Blocks newly persisted."""
  elapsed_s: float
  """Wall time of the turn."""


class ColocatedEngine:
  """Runs turns on one device against a KV block store (or without it, as the reference)."""

  def __init__(self, model: Transformer, store: KVBlockStore | None, *, use_cache: bool = True,
               max_context_tokens: int = 8192):
    if use_cache and store is None:
      raise ValueError("ColocatedEngine: use_cache=True needs a store")
    self.model = model
    self.store = store
    self.use_cache = use_cache
    self.block_tokens = store.layout.block_tokens if store is not None else 64
    self.max_pages = -(-max_context_tokens // self.block_tokens)
    # Scratch page 0 plus room for one sequence of max_context_tokens.
    self.pool = paged.init_pool(model.config, self.max_pages + 1, self.block_tokens)

  def run_turn(self, namespace: str, prompt: np.ndarray, gen_tokens: int) -> TurnResult:
    start = time.perf_counter()
    prompt = np.asarray(prompt, np.int32)
    config, bt = self.model.config, self.block_tokens
    if gen_tokens <= 0:
      raise ValueError(f"gen_tokens must be positive, got {gen_tokens}")
    if prompt.shape[0] + gen_tokens > self.max_pages * bt:
      raise ValueError(f"prompt of {prompt.shape[0]} tokens + {gen_tokens} generated exceeds "
                       f"max_context_tokens={self.max_pages * bt}")
    hashes = chain_block_hashes(prompt, bt)
    # At least one prompt token is always computed: its logits give the first generated token.
    hit_blocks, blocks = 0, []
    if self.use_cache:
      hit_blocks = min(self.store.longest_prefix(namespace, hashes), (prompt.shape[0] - 1) // bt)
      blocks = self.store.read_blocks(namespace, hashes[:hit_blocks])
      if any(b is None for b in blocks):  # corrupt or vanished: recompute from there on
        hit_blocks = next(i for i, b in enumerate(blocks) if b is None)
        blocks = blocks[:hit_blocks]
    hit = hit_blocks * bt
    bytes_read = hit_blocks * (self.store.layout.full_block_bytes if self.store else 0)

    # Prefill the miss tokens on top of the prefix KV.
    if hit_blocks:
      prefix_kv = self.store.layout.full_blocks_to_kv(np.stack(blocks))  # [L, hit, 2, H, D]
    else:
      prefix_kv = np.zeros((config.num_layers, 0, 2, config.num_kv_heads, config.head_dim),
                           config.jnp_dtype)
    tp = pow2_at_least(hit, bt) if hit else 0
    new = prompt[hit:]
    tn = pow2_at_least(new.shape[0], bt)
    logits, new_kv = prefill_jit(
        self.model, jnp.asarray(pad_axis(new, tn, 0))[None],
        jnp.asarray(pad_axis(prefix_kv, tp, 1))[:, None],
        jnp.array([hit], jnp.int32), jnp.array([new.shape[0]], jnp.int32), all_logits=False)
    generated = [int(jnp.argmax(logits[0]))]

    # Decode over the paged pool: prompt KV in, then G - 1 steps.
    table = paged.PageTable.create(self.max_pages + 1, bt).allocate(namespace, prompt.shape[0])
    pages = table.block_tables[namespace]
    prompt_kv = np.concatenate([prefix_kv, np.asarray(new_kv[:, 0, :new.shape[0]])], axis=1)
    self.pool = self._write_prompt(prompt_kv, pages)
    for _ in range(gen_tokens - 1):
      table, block_tables, seq_lens = table.prepare_decode([namespace], batch_size=1,
                                                           max_pages=self.max_pages)
      step_logits, self.pool = paged.decode_step_jit(
          self.model, self.pool, jnp.array([generated[-1]], jnp.int32), jnp.asarray(block_tables),
          jnp.asarray(seq_lens))
      generated.append(int(jnp.argmax(step_logits[0])))

    bytes_written = 0
    if self.store is not None:
      bytes_written = self._persist(namespace, np.concatenate([prompt, generated[:-1]]),
                                    table.block_tables[namespace], first_block=hit_blocks)
    return TurnResult(prompt_tokens=int(prompt.shape[0]), hit_tokens=hit,
                      generated=np.array(generated, np.int32), bytes_read=bytes_read,
                      bytes_written=bytes_written, elapsed_s=time.perf_counter() - start)

  def _write_prompt(self, prompt_kv: np.ndarray, pages: tuple[int, ...]) -> jax.Array:
    # Pad to a power-of-two page count (extra pages go to the scratch page) to bound compiles.
    n = pow2_at_least(len(pages))
    padded_pages = np.full((n,), paged.SCRATCH_PAGE, np.int32)
    padded_pages[:len(pages)] = pages
    kv = pad_axis(prompt_kv, n * self.block_tokens, 1)
    return paged.write_kv_to_pages(self.pool, jnp.asarray(kv), padded_pages)

  def _persist(self, namespace: str, tokens_with_kv: np.ndarray, pages: tuple[int, ...],
               first_block: int) -> int:
    """Writes the completed Full Blocks from `first_block` on; returns the bytes newly stored."""
    layout = self.store.layout
    hashes = chain_block_hashes(tokens_with_kv, layout.block_tokens)
    todo = hashes[first_block:]
    if not todo:
      return 0
    n = pow2_at_least(len(todo))
    page_ids = np.full((n,), paged.SCRATCH_PAGE, np.int32)
    page_ids[:len(todo)] = pages[first_block:len(hashes)]
    kv = np.asarray(paged.read_kv_from_pages(self.pool, page_ids, n * layout.block_tokens))
    blocks = layout.kv_to_full_blocks(kv[:, :len(todo) * layout.block_tokens])
    return self.store.write_blocks(namespace, todo, blocks) * layout.full_block_bytes
