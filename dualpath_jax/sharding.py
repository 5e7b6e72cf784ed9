"""Mesh axis names, in one place (STYLE.md rule 3).

Every mesh in this package is built from these names; model code speaks logical axis names and
maps them to mesh axes through `logical_to_mesh`, with one small rule table per engine role.

  ENGINE_AXIS  data-parallel axis over the engines of one role (the prefill or the decode mesh)
  TP_AXIS      tensor-parallel axis inside one engine (size `devices_per_engine`)
  DEVICE_AXIS  the flat axis of the global mesh and of the transfer submeshes: one entry a device
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

ENGINE_AXIS = "engine"
TP_AXIS = "tp"
DEVICE_AXIS = "device"

ROLE_MESH_AXES = (ENGINE_AXIS, TP_AXIS)
"""Axis names of the prefill mesh and the decode mesh, in mesh-shape order."""

# Logical axis -> mesh axis (None = replicated). Prefill batches are split over engines by the
# scheduler, not by the mesh, so inside one engine only heads are split; decode is the same for
# now. Kept per role because the two may diverge (e.g. decode splitting its page pool).
PREFILL_RULES: Mapping[str, str | None] = {
    "batch": None, "tokens": None, "layers": None, "kv_heads": TP_AXIS, "heads": TP_AXIS,
    "head_dim": None, "embed": None, "mlp": TP_AXIS, "vocab": TP_AXIS,
}
DECODE_RULES: Mapping[str, str | None] = dict(PREFILL_RULES)
RULES_BY_ROLE: Mapping[str, Mapping[str, str | None]] = {
    "prefill": PREFILL_RULES, "decode": DECODE_RULES}


def logical_to_mesh(logical_axes: Sequence[str | None], role: str) -> PartitionSpec:
  """PartitionSpec over a role mesh for an array whose axes have these logical names."""
  try:
    rules = RULES_BY_ROLE[role]
  except KeyError:
    raise ValueError(f"role: expected one of {sorted(RULES_BY_ROLE)}, got {role!r}") from None
  unknown = [a for a in logical_axes if a is not None and a not in rules]
  if unknown:
    raise ValueError(f"logical_axes: no {role} rule for {unknown}; known: {sorted(rules)}")
  return PartitionSpec(*(None if a is None else rules[a] for a in logical_axes))
