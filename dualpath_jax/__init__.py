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
  engines/    topology: the prefill mesh and the decode mesh, engines and the nodes they share
  scheduler/  placement policies as pure functions: PE, DE and the read side of each turn
  transfer/   the only place arrays cross meshes (D2D: device_put or shard_map) or host/device
  runtime/    storage links and host buffers per node, a traffic manager per engine, PE and DE
              workers: read hit blocks on the chosen node, stream them layer by layer into the
              PE (H2D, or H2D on the DE then D2D), prefill the append, hand the KV to the DE,
              decode, persist every completed Full Block for the next turn; the offline job

Nothing in this package imports absl or holds global configuration: experiment scripts under
experiments/ turn config files (configs/) into the typed records these modules take.
"""

__version__ = "0.1.0"
