"""Engines: which devices form each prefill / decode engine, and which engines share a node.

`build_topology(TopologyConfig(...))` splits the devices into a prefill mesh and a decode mesh
(axes from dualpath_jax.sharding), groups engines into nodes of one role (a node owns one storage
link and one host buffer, see dualpath_jax.runtime), and builds the flat global mesh that
shard_map transfers between the two meshes use (see dualpath_jax.transfer).
"""

from dualpath_jax.engines.topology import (Engine, Node, Topology, TopologyConfig,
                                           build_topology)

__all__ = ["Engine", "Node", "Topology", "TopologyConfig", "build_topology"]
