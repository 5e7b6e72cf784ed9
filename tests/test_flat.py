"""model/flat.py: jitted calls take a module as its parameter arrays, split once per object."""

import gc
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model import flat, weights
from dualpath_jax.model.config import get_preset
from dualpath_jax.runtime.compile_events import CompileEvents

prefill_module = importlib.import_module("dualpath_jax.model.prefill")


def test_layers_share_one_structure_and_one_program_and_match_plain_jit():
  config = get_preset("tiny", num_layers=3)
  model = weights.init_random(config, seed=1)
  structures = {id(flat.split_module(layer)[0]) for layer in model.layers}
  assert len(structures) == 1  # equal layers: one static argument, so one compiled program
  assert flat.split_module(model.layers[0])[1] is flat.split_module(model.layers[0])[1]  # cached
  x = prefill_module.embed_tokens_jit(model, jnp.arange(8, dtype=jnp.int32)[None])
  prefix = jnp.zeros((1, 16, 2, config.num_kv_heads, config.head_dim), config.jnp_dtype)
  lens = (jnp.array([0], jnp.int32), jnp.array([8], jnp.int32))
  prefill_module.prefill_layer_jit(model.layers[0], x, prefix, *lens)
  events = CompileEvents().start()
  outs = [prefill_module.prefill_layer_jit(layer, x, prefix, *lens)[0] for layer in model.layers]
  assert events.stop()["compiles"] == 0
  plain = jax.jit(prefill_module.prefill_layer)
  for layer, out in zip(model.layers, outs):
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain(layer, x, prefix, *lens)[0]))
  # different layers' arrays: different results
  assert not np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


def test_a_new_module_object_is_split_anew_and_a_dead_one_is_forgotten():
  config = get_preset("tiny", num_layers=1)
  tokens = jnp.arange(4, dtype=jnp.int32)[None]
  a = weights.init_random(config, seed=1)
  b = weights.init_random(config, seed=2)  # same structure, other weights
  xa = prefill_module.embed_tokens_jit(a, tokens)
  xb = prefill_module.embed_tokens_jit(b, tokens)
  assert not np.array_equal(np.asarray(xa), np.asarray(xb))
  assert flat.split_module(a)[0] is flat.split_module(b)[0]
  key = id(b)
  del b
  gc.collect()
  assert key not in flat._SPLITS
