"""Topology: engines on disjoint devices, Auto-axis role meshes, nodes of one role."""

import jax
import pytest
from jax.sharding import AxisType

from dualpath_jax import sharding
from dualpath_jax.engines import TopologyConfig, build_topology


@pytest.mark.parametrize("p,d,per_node", [(1, 1, 1), (2, 2, 2), (1, 3, 1), (2, 6, 2), (2, 6, 3)])
def test_split_on_8_devices(p, d, per_node):
  if p % per_node or d % per_node:
    with pytest.raises(ValueError, match="topology.engines_per_node"):
      TopologyConfig(num_prefill_engines=p, num_decode_engines=d, engines_per_node=per_node)
    return
  topo = build_topology(TopologyConfig(num_prefill_engines=p, num_decode_engines=d,
                                       engines_per_node=per_node))
  assert topo.prefill_mesh.axis_names == (sharding.ENGINE_AXIS, sharding.TP_AXIS)
  assert topo.prefill_mesh.devices.shape == (p, 1) and topo.decode_mesh.devices.shape == (d, 1)
  for mesh in (topo.prefill_mesh, topo.decode_mesh, topo.global_mesh):
    assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert topo.global_mesh.axis_names == (sharding.DEVICE_AXIS,)
  # Prefill engines come first, every engine on its own device, nothing shared.
  devices = jax.devices()
  assert [e.devices[0] for e in topo.engines] == devices[:p + d]
  assert [e.role for e in topo.engines] == ["prefill"] * p + ["decode"] * d
  assert list(topo.global_mesh.devices.flat) == devices[:p + d]
  for engine in topo.engines:
    assert engine.replicated_sharding.device_set == set(engine.devices)
    assert topo.node_of(engine).role == engine.role
    assert engine in topo.node_of(engine).engines
  assert len(topo.nodes) == (p + d) // per_node
  assert all(len({e.role for e in n.engines}) == 1 for n in topo.nodes)
  assert topo.engine("decode", d - 1) is topo.decode_engines[-1]


def test_tensor_parallel_engines():
  topo = build_topology(TopologyConfig(num_prefill_engines=2, num_decode_engines=2,
                                       devices_per_engine=2))
  assert topo.decode_mesh.devices.shape == (2, 2)
  assert topo.prefill_engines[1].devices == tuple(jax.devices()[2:4])
  assert topo.decode_engines[0].mesh.devices.shape == (1, 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_prefill_engines=1, num_decode_engines=8),
     "topology.num_decode_engines: 1P8D needs 9 devices, 8 present"),
    (dict(num_prefill_engines=9, num_decode_engines=1), "topology.num_prefill_engines"),
    (dict(num_prefill_engines=2, num_decode_engines=4, devices_per_engine=2),
     "topology.devices_per_engine: 2P4D x 2 devices per engine needs 12 devices, 8 present"),
])
def test_split_that_does_not_fit(kwargs, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    build_topology(TopologyConfig(**kwargs))


@pytest.mark.parametrize("field", ["num_prefill_engines", "num_decode_engines",
                                   "devices_per_engine", "engines_per_node"])
def test_non_positive_counts(field):
  kwargs = dict(num_prefill_engines=1, num_decode_engines=1)
  kwargs[field] = 0
  with pytest.raises(ValueError, match=f"topology.{field}"):
    TopologyConfig(**kwargs)


def test_logical_rules():
  spec = sharding.logical_to_mesh(("tokens", "kv_heads", None), "decode")
  assert tuple(spec) == (None, sharding.TP_AXIS, None)
  with pytest.raises(ValueError, match="role"):
    sharding.logical_to_mesh(("tokens",), "both")
