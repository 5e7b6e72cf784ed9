"""Chained block hashes: the address of a Full Block in the store (PAPER.md section 2.4).

hash_0 = H(parent || tokens of block 0), hash_i = H(hash_{i-1} || tokens of block i), where the
tokens of a block are its `block_tokens` ids as little-endian int32 and H is blake2b with a 16-byte
digest, written as 32 hex characters. Because each hash covers its parent, two sequences have equal
i-th hashes exactly when their first (i + 1) * block_tokens tokens are equal (up to a 2^-128
collision), so the KV trie of the paper becomes a flat key space: the longest cached prefix of a
prompt is the number of its leading hashes present in the store.

Only complete blocks are hashed: a partial tail is not a Full Block and is never stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

HASH_DIGEST_BYTES = 16
# Domain separation: a KV block hash can never equal a blake2b digest made for another purpose.
_PERSON = b"dualpath-kv-v1"
_INT32_MIN, _INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


def chain_block_hashes(tokens: Sequence[int] | np.ndarray, block_tokens: int,
                       parent: str | None = None) -> list[str]:
  """Hex hashes of the complete blocks of `tokens`, each chained on the one before.

  Args:
    tokens: token ids, a sequence of ints or a 1-D integer array; ids must fit in int32.
    block_tokens: tokens per block (B).
    parent: hash of the block just before `tokens[0]` (to extend a chain), or None at the start of
      a sequence.

  Returns:
    len(tokens) // block_tokens hex strings; a partial tail has no hash.
  """
  if isinstance(block_tokens, bool) or not isinstance(block_tokens, (int, np.integer)) \
      or block_tokens <= 0:
    raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
  ids = np.asarray(tokens)
  if ids.size == 0:
    return []
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"tokens: expected a 1-D sequence of integer ids, got {ids.dtype} "
                     f"{list(ids.shape)}")
  if ids.min() < _INT32_MIN or ids.max() > _INT32_MAX:
    raise ValueError("tokens: ids must fit in int32")
  previous = b"" if parent is None else _parent_digest(parent)
  num_blocks = ids.shape[0] // block_tokens
  block_bytes = ids[:num_blocks * block_tokens].astype("<i4").reshape(num_blocks, block_tokens)
  hashes = []
  for block in block_bytes:
    digest = hashlib.blake2b(previous, digest_size=HASH_DIGEST_BYTES, person=_PERSON)
    digest.update(block.tobytes())
    previous = digest.digest()
    hashes.append(digest.hexdigest())
  return hashes


def _parent_digest(parent: str) -> bytes:
  try:
    digest = bytes.fromhex(parent)
  except (TypeError, ValueError) as e:
    raise ValueError(f"parent: expected a hex block hash, got {parent!r}") from e
  if len(digest) != HASH_DIGEST_BYTES:
    raise ValueError(f"parent: expected {2 * HASH_DIGEST_BYTES} hex characters, got {parent!r}")
  return digest
