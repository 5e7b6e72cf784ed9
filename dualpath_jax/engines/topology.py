"""Which device belongs to which engine, and which engines share a node.

DESIGN.md: an engine is one JAX device (or a small tensor-parallel submesh of `devices_per_engine`
devices); prefill engines (PEs) and decode engines (DEs) live on two separate meshes with axes
(ENGINE_AXIS, TP_AXIS). A node groups `engines_per_node` engines of one role; it is the unit that
owns a storage link and a host buffer (the paper's PE / DE node with its SNIC and DRAM buffer).

Devices are taken in order, prefill engines first:

  devices   d0 d1 | d2 d3 d4 d5 d6 d7          2P6D, devices_per_engine=1, engines_per_node=2
  engines   pe0 pe1 | de0 de1 de2 de3 de4 de5
  nodes     node0   | node1   node2   node3

A third, flat mesh over every used device (axis DEVICE_AXIS) is what shard_map transfers between
the two role meshes run on; arrays never cross meshes any other way than through transfer/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dualpath_jax.sharding import DEVICE_AXIS, ROLE_MESH_AXES

ROLES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopologyConfig:
  """How many engines of each role, and how they are packed onto devices and nodes."""

  num_prefill_engines: int
  """Prefill engines (P in "xPyD")."""
  num_decode_engines: int
  """Decode engines (D in "xPyD")."""
  devices_per_engine: int = 1
  """Devices of one engine, joined by tensor parallelism (the TP_AXIS size)."""
  engines_per_node: int = 1
  """Engines that share one node (one storage link, one host buffer); must divide both counts."""

  def __post_init__(self):
    for field in ("num_prefill_engines", "num_decode_engines", "devices_per_engine",
                  "engines_per_node"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"topology.{field} must be a positive int, got {value!r}")
    for count in ("num_prefill_engines", "num_decode_engines"):
      if getattr(self, count) % self.engines_per_node:
        raise ValueError(
            f"topology.engines_per_node: {self.engines_per_node} does not divide {count}="
            f"{getattr(self, count)} (a node holds engines of one role only)")

  @property
  def name(self) -> str:
    return f"{self.num_prefill_engines}P{self.num_decode_engines}D"

  @property
  def num_devices(self) -> int:
    return (self.num_prefill_engines + self.num_decode_engines) * self.devices_per_engine


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Engine:
  """One prefill or decode engine: its devices and where it sits."""

  role: str
  """'prefill' or 'decode'."""
  index: int
  """Position among the engines of its role (its ENGINE_AXIS coordinate in the role mesh)."""
  node_id: int
  """The node (storage link, host buffer) it belongs to."""
  devices: tuple[jax.Device, ...]
  """Its devices, in TP_AXIS order."""
  mesh: Mesh
  """This engine's slice of its role mesh: shape (1, devices_per_engine)."""
  replicated_sharding: NamedSharding
  """An array held whole on every device of this engine (the default destination of a move)."""

  @property
  def name(self) -> str:
    return f"{'pe' if self.role == 'prefill' else 'de'}{self.index}"

  def __repr__(self) -> str:
    return f"Engine({self.name}, node={self.node_id}, devices={[d.id for d in self.devices]})"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Node:
  """Engines of one role that share a storage link and a host buffer."""

  node_id: int
  """Position among all nodes (prefill nodes first)."""
  role: str
  """'prefill' or 'decode'; a node never mixes roles."""
  engines: tuple[Engine, ...]
  """Its engines, in index order."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Topology:
  """The built meshes and the engine / node records of one TopologyConfig."""

  config: TopologyConfig
  """What was asked for."""
  prefill_mesh: Mesh
  """Axes (ENGINE_AXIS, TP_AXIS), shape (num_prefill_engines, devices_per_engine)."""
  decode_mesh: Mesh
  """Axes (ENGINE_AXIS, TP_AXIS), shape (num_decode_engines, devices_per_engine)."""
  global_mesh: Mesh
  """Axis (DEVICE_AXIS,) over every used device, prefill devices first; for shard_map transfers."""
  prefill_engines: tuple[Engine, ...]
  """PEs in index order."""
  decode_engines: tuple[Engine, ...]
  """DEs in index order."""
  nodes: tuple[Node, ...]
  """All nodes, prefill nodes first."""

  @property
  def engines(self) -> tuple[Engine, ...]:
    return self.prefill_engines + self.decode_engines

  def engine(self, role: str, index: int) -> Engine:
    return {"prefill": self.prefill_engines, "decode": self.decode_engines}[role][index]

  def node_of(self, engine: Engine) -> Node:
    return self.nodes[engine.node_id]

  def mesh(self, role: str) -> Mesh:
    return {"prefill": self.prefill_mesh, "decode": self.decode_mesh}[role]


def _auto_mesh(devices: np.ndarray, axis_names: tuple[str, ...]) -> Mesh:
  # jax.make_mesh defaults to Explicit axes; the model code relies on Auto (sharding propagation).
  return Mesh(devices, axis_names, axis_types=(AxisType.Auto,) * len(axis_names))


def _check_fits(config: TopologyConfig, present: int) -> None:
  p, d, tp = config.num_prefill_engines, config.num_decode_engines, config.devices_per_engine
  if config.num_devices <= present:
    return
  if p * tp > present:
    field = "num_prefill_engines"
  elif p + d <= present:
    field = "devices_per_engine"
  else:
    field = "num_decode_engines"
  per_engine = f" x {tp} devices per engine" if tp > 1 else ""
  raise ValueError(f"topology.{field}: {config.name}{per_engine} needs {config.num_devices} "
                   f"devices, {present} present")


def build_topology(config: TopologyConfig, devices: Sequence[jax.Device] | None = None
                   ) -> Topology:
  """Splits `devices` (default: jax.devices()) into a prefill and a decode mesh.

  Uses the first `config.num_devices` devices; the rest stay idle.
  """
  devices = list(jax.devices() if devices is None else devices)
  _check_fits(config, len(devices))
  tp = config.devices_per_engine
  used = np.array(devices[:config.num_devices], dtype=object)
  n_pe_devices = config.num_prefill_engines * tp
  role_devices = {"prefill": used[:n_pe_devices].reshape(-1, tp),
                  "decode": used[n_pe_devices:].reshape(-1, tp)}
  meshes = {role: _auto_mesh(grid, ROLE_MESH_AXES) for role, grid in role_devices.items()}

  engines: dict[str, list[Engine]] = {role: [] for role in ROLES}
  nodes: list[Node] = []
  for role in ROLES:
    grid = role_devices[role]
    for first in range(0, grid.shape[0], config.engines_per_node):
      node_id = len(nodes)
      members = []
      for index in range(first, first + config.engines_per_node):
        engine_mesh = _auto_mesh(grid[index:index + 1], ROLE_MESH_AXES)
        members.append(Engine(role=role, index=index, node_id=node_id,
                              devices=tuple(grid[index]), mesh=engine_mesh,
                              replicated_sharding=NamedSharding(engine_mesh, PartitionSpec())))
      engines[role].extend(members)
      nodes.append(Node(node_id=node_id, role=role, engines=tuple(members)))

  return Topology(config=config, prefill_mesh=meshes["prefill"], decode_mesh=meshes["decode"],
                  global_mesh=_auto_mesh(used, (DEVICE_AXIS,)),
                  prefill_engines=tuple(engines["prefill"]),
                  decode_engines=tuple(engines["decode"]), nodes=tuple(nodes))


def single_engine(device: jax.Device, role: str = "decode") -> Engine:
  """One engine of `role` on `device` alone, outside any topology (benchmarks that measure one
  engine's own work, e.g. bench/decode_interference.py)."""
  if role not in ROLES:
    raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
  mesh = _auto_mesh(np.array([[device]], dtype=object), ROLE_MESH_AXES)
  return Engine(role=role, index=0, node_id=0, devices=(device,), mesh=mesh,
                replicated_sharding=NamedSharding(mesh, PartitionSpec()))
