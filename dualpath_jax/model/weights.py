"""Model weights on disk with orbax-checkpoint, restored straight onto a mesh sharding.

A checkpoint folder holds two orbax items: `params` (the model's nnx.Param state as a pure dict of
arrays) and `model_config` (the ModelConfig as JSON, so that a restore with another geometry fails
with a clear message instead of a shape error deep inside orbax).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Union

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dualpath_jax.model.config import EXECUTION_FIELDS, ModelConfig
from dualpath_jax.model.transformer import Transformer

# A Sharding for every leaf, or a function (path tuple, abstract leaf) -> Sharding.
ShardingSpec = Union[jax.sharding.Sharding, Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding]]


# ModelConfig fields a restore may change freely: they do not describe the weights.
_NOT_GEOMETRY = ("name", "dtype") + EXECUTION_FIELDS


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_weights(path: str | os.PathLike, model: Transformer, *, force: bool = False) -> None:
  """Writes `model`'s parameters and config to the folder `path` (absolute or relative)."""
  path = os.path.abspath(os.fspath(path))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  config = dataclasses.asdict(model.config)
  _checkpointer().save(path, ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                model_config=ocp.args.JsonSave(config)),
                       force=force)


def read_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig stored with the checkpoint at `path`."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint: no checkpoint folder at {path}")
  restored = _checkpointer().restore(path, ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  # Fields added after a checkpoint was written (e.g. paged_attention, pallas_k_splits) take
  # their defaults.
  return ModelConfig(**restored["model_config"])


def restore_weights(path: str | os.PathLike, config: ModelConfig | None = None,
                    sharding: ShardingSpec | None = None) -> Transformer:
  """Restores a Transformer from `path`, placing every parameter directly with `sharding`.

  `config` defaults to the stored one; if given, it must describe the same geometry (its dtype
  may differ: parameters are cast on restore; so may its name and the fields that only choose how
  attention is computed, config.EXECUTION_FIELDS: `attention`, `prefill_kv_splits`,
  `paged_attention` and the Pallas kernel's `pallas_*` fields). `sharding` defaults to the first
  device.
  """
  path = os.path.abspath(os.fspath(path))
  stored = read_config(path)
  if config is None:
    config = stored
  for field in dataclasses.fields(ModelConfig):
    if field.name in _NOT_GEOMETRY:
      continue
    if getattr(config, field.name) != getattr(stored, field.name):
      raise ValueError(f"checkpoint {path}: model.{field.name} is {getattr(stored, field.name)!r} "
                       f"in the checkpoint but {getattr(config, field.name)!r} was asked for")
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
  pure = nnx.to_pure_dict(abstract_params)

  def target(keypath, leaf):
    leaf_sharding = sharding(keypath, leaf) if callable(sharding) else sharding
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding)

  target_tree = jax.tree_util.tree_map_with_path(target, pure)
  restored = _checkpointer().restore(
      path, ocp.args.Composite(params=ocp.args.StandardRestore(target_tree)))
  nnx.replace_by_pure_dict(abstract_params, restored["params"])
  return nnx.merge(graphdef, abstract_params, rest)


def with_config(model: Transformer, config: ModelConfig) -> Transformer:
  """`model`'s parameters (the same arrays, not copied) under `config`, which may differ from
  model.config only in how attention is computed (config.EXECUTION_FIELDS: `attention`,
  `prefill_kv_splits`, `paged_attention`, the Pallas kernel's `pallas_*` fields) and its name."""
  for field in dataclasses.fields(ModelConfig):
    if field.name == "name" or field.name in EXECUTION_FIELDS:
      continue
    if getattr(config, field.name) != getattr(model.config, field.name):
      raise ValueError(f"with_config: model.{field.name} is {getattr(model.config, field.name)!r} "
                       f"but {getattr(config, field.name)!r} was asked for")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def init_random(config: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model (deterministic in `seed`)."""
  return Transformer(config, rngs=nnx.Rngs(seed))
