"""Jitted calls that take an NNX module as its parameter arrays, split from it once.

An NNX Module is a pytree, so jax.jit takes one as an argument, but flattening it walks its
graph in Python on every call: a whole 28-layer model cost 1.1 ms a call on the 2-core sandbox
(2026-11-27), and the PE's embed and last-token logits took ~3.6 ms each a forward on an H200
host, a layer's dispatch ~0.6 ms (docs/perf/gpu_bench.md record 14). `module_jit(fn)` compiles
fn(module, ...) as a function of the module's structure (static) and its parameter leaves: the
module is split once per module object (nnx.split, then flattened) and the split is reused
while the object lives. Modules of equal structure (the layers of a model) share one structure
object, so they share one compiled program.

A module whose parameters are replaced in place after its first call would keep its old arrays
here: the runtime's models are not changed after they are loaded (training works on a
parameter pytree, scripts/train_recall.py).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable

import jax
from flax import nnx


class ModuleStructure:
  """A module's graphdef and parameter treedef as one static jit argument, hashed and compared
  by identity (hashing the graphdef walks it); equal structures are one object (_structure)."""

  def __init__(self, graphdef, treedef):
    self.graphdef, self.treedef = graphdef, treedef

  def merge(self, leaves) -> nnx.Module:
    return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))


_lock = threading.Lock()
_STRUCTURES: dict[tuple, ModuleStructure] = {}
_SPLITS: dict[int, tuple] = {}


def _structure(graphdef, treedef) -> ModuleStructure:
  key = (graphdef, treedef)
  with _lock:
    return _STRUCTURES.setdefault(key, ModuleStructure(graphdef, treedef))


def split_module(module: nnx.Module) -> tuple[ModuleStructure, list]:
  """(structure, parameter leaves) of `module`, split once per module object."""
  entry = _SPLITS.get(id(module))
  if entry is None or entry[0]() is not module:
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    entry = (weakref.ref(module), _structure(graphdef, treedef), leaves)
    with _lock:
      _SPLITS[id(module)] = entry
    weakref.finalize(module, _SPLITS.pop, id(module), None)
  return entry[1], entry[2]


def module_jit(fn: Callable, **jit_kwargs) -> Callable:
  """jax.jit of fn(module, *args, **kwargs) with the module passed as split_module's leaves.
  jit_kwargs: jax.jit's, naming fn's other arguments by name (static_argnames, donate_argnames);
  positional indices would count the structure and the leaves."""

  @functools.partial(jax.jit, static_argnums=(0,), **jit_kwargs)
  def flat(structure: ModuleStructure, leaves, *args, **kwargs):
    return fn(structure.merge(leaves), *args, **kwargs)

  @functools.wraps(fn)
  def call(module, *args, **kwargs):
    structure, leaves = split_module(module)
    return flat(structure, leaves, *args, **kwargs)

  call.lower = lambda module, *args, **kwargs: flat.lower(*split_module(module), *args, **kwargs)
  return call
