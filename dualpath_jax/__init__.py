"""dualpath_jax: DualPath (arXiv 2602.21548) in JAX/Flax.

Where a turn's KV travels, and which module moves it:

  workload/   agent trajectories (turn k+1 = context of turn k + a short append)
  kvstore/    layout.py   model KV <-> Full Blocks [L, B, W] <-> Layer Blocks [1, B, W]
              hashing.py  chained block hashes: equal hash <=> equal token prefix
              block_store.py  the tensorstore store of Full Blocks (zarr3, checksummed,
                          visible only once complete); a lookup gives the longest cached prefix
  model/      the Flax NNX transformer: prefill of new tokens given the prefix's KV, one layer at a
              time or whole; decode over a paged KV pool; KV bytes and FLOPs per request;
              orbax weights restored straight onto a mesh sharding
  runtime/    the engines that run a turn: read hit blocks from the store, prefill the append,
              decode, persist every completed Full Block for the next turn

Nothing in this package imports absl or holds global configuration: experiment scripts under
experiments/ turn config files (configs/) into the typed records these modules take.
"""

__version__ = "0.1.0"
