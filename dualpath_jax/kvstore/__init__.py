"""The KV store: where every turn's KV-cache lives between turns (DESIGN.md, "3FS -> tensorstore").

  layout       KVLayout: the byte geometry of Full Blocks [L, B, W] uint8 and Layer Blocks
               [1, B, W], and the free views between them and model KV [L, T, 2, H, D]
  hashing      chain_block_hashes: the address of each complete block of a token sequence, chained
               so that equal hashes mean equal prefixes
  spec         StoreSpec: where the store lives (a local folder, memory, any tensorstore kvstore),
               built once from the `store` section of a config
  block_store  KVBlockStore: Full Blocks by (namespace, hash) on zarr3; verified batched reads that
               return None for a missing or corrupt block, idempotent writes visible only once
               committed, longest cached prefix
  host_copy    large host-memory copies (stack, gather, transpose) split over a shared pool of
               threads
A storage link (transfer/) reads a turn's hit blocks with `read_blocks_async` into a node's host
buffer; a decode engine persists each completed block with `write_blocks`.
"""

from dualpath_jax.kvstore.block_store import KVBlockStore, StoreStats
from dualpath_jax.kvstore.hashing import chain_block_hashes
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.kvstore.spec import StoreSpec

__all__ = ["KVBlockStore", "KVLayout", "StoreSpec", "StoreStats", "chain_block_hashes"]
