"""End to end over the real store: prefix KV read back from a zarr3 folder equals a recompute."""

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec, chain_block_hashes
from dualpath_jax.model import get_preset, prefill_jit, weights
from dualpath_jax.model.prefill import empty_prefix_kv, pad_axis
from dualpath_jax.runtime.colocated import ColocatedEngine
from dualpath_jax.workload import simple_trajectories

BT = 64


@pytest.fixture(scope="module")
def config():
  return get_preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def model(config):
  return weights.init_random(config, seed=3)


def _full_forward(model, tokens, bucket=512):
  """No-cache prefill of the whole sequence: logits [T, V], KV [L, T, 2, H, D]."""
  n = len(tokens)
  logits, kv = prefill_jit(model, jnp.asarray(pad_axis(np.asarray(tokens, np.int32), bucket, 0))[None],
                           empty_prefix_kv(model.config, 1), jnp.zeros(1, jnp.int32),
                           jnp.array([n], jnp.int32))
  return np.asarray(logits[0, :n]), np.asarray(kv[:, 0, :n])


# (prompt tokens, cached whole blocks): block-aligned prompts and not, short and long prefixes.
CASES = [(128, 1), (130, 2), (200, 1), (256, 3), (321, 5), (447, 2), (64 * 6, 5)]


@pytest.mark.parametrize("prompt_tokens,cached_blocks", CASES)
def test_prefill_with_prefix_from_file_store_equals_recompute(tmp_path, config, model,
                                                             prompt_tokens, cached_blocks):
  rng = np.random.default_rng(prompt_tokens)
  tokens = rng.integers(0, config.vocab_size, prompt_tokens, dtype=np.int32)
  want_logits, want_kv = _full_forward(model, tokens)
  layout = KVLayout.for_model(config, BT)
  hashes = chain_block_hashes(tokens, BT)
  spec = StoreSpec(driver="file", path=str(tmp_path / "store"))
  with KVBlockStore.open(spec, layout) as writer:
    writer.write_blocks("agent", hashes[:cached_blocks],
                        layout.kv_to_full_blocks(want_kv[:, :cached_blocks * BT]))
  with KVBlockStore.open(spec, layout) as reader:  # a fresh open sees what was committed
    hit = reader.longest_prefix("agent", hashes)
    assert hit == cached_blocks
    blocks = reader.read_blocks("agent", hashes[:hit])
  prefix_kv = layout.full_blocks_to_kv(np.stack(blocks))
  cached = hit * BT
  new = tokens[cached:]
  logits, new_kv = prefill_jit(model, jnp.asarray(pad_axis(new, 512, 0))[None],
                               jnp.asarray(pad_axis(prefix_kv, 512, 1))[:, None],
                               jnp.array([cached], jnp.int32), jnp.array([len(new)], jnp.int32))
  got = np.asarray(logits[0, :len(new)])
  np.testing.assert_allclose(got, want_logits[cached:], atol=1e-5, rtol=0)
  assert (got.argmax(-1) == want_logits[cached:].argmax(-1)).all()
  np.testing.assert_allclose(np.asarray(new_kv[:, 0, :len(new)]), want_kv[:, cached:], atol=1e-5)


def test_turns_hit_what_earlier_turns_persisted_and_match_recompute(tmp_path, config, model):
  layout = KVLayout.for_model(config, BT)
  store = KVBlockStore.open(StoreSpec(driver="file", path=str(tmp_path / "s")), layout)
  cached = ColocatedEngine(model, store, max_context_tokens=1024)
  reference = ColocatedEngine(model, None, use_cache=False, max_context_tokens=1024)
  (trajectory,) = simple_trajectories(agents=1, turns=4, first_append_tokens=150,
                                      append_tokens=70, gen_tokens=12,
                                      vocab_size=config.vocab_size, seed=1)
  context, previous_with_kv = [], 0
  for k, turn in enumerate(trajectory.turns):
    prompt = context + turn.append_ids.tolist()
    got = cached.run_turn("a", prompt, turn.gen_tokens)
    want = reference.run_turn("a", prompt, turn.gen_tokens)
    np.testing.assert_array_equal(got.generated, want.generated)
    # Turn k+1 hits every whole block that turn k had KV for (its prompt + all but the last token).
    assert got.hit_tokens == (min(previous_with_kv, len(prompt) - 1) // BT) * BT
    assert got.bytes_read == got.hit_tokens // BT * layout.full_block_bytes
    if k:
      assert got.hit_tokens > 0
    context = prompt + got.generated.tolist()
    previous_with_kv = len(context) - 1
  store.close()


def test_weights_round_trip_onto_a_mesh_sharding(tmp_path, config, model):
  import jax
  from flax import nnx
  path = tmp_path / "ckpt"
  weights.save_weights(path, model)
  assert weights.read_config(path) == config
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4), ("engine",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  restored = weights.restore_weights(path, config, sharding=replicated)
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = nnx.to_pure_dict(nnx.state(restored, nnx.Param))
  for (_, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree_util.tree_leaves_with_path(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding == replicated
  with pytest.raises(ValueError, match="model.num_layers"):
    weights.restore_weights(path, config.replace(num_layers=3))
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    weights.read_config(tmp_path / "absent")


def test_init_checkpoint_script_writes_a_restorable_checkpoint(tmp_path):
  out = tmp_path / "tiny"
  subprocess.run([sys.executable, "scripts/init_checkpoint.py", "--preset=tiny",
                  "--dtype=float32", f"--out={out}"], check=True, capture_output=True)
  code = textwrap.dedent(f"""
      from dualpath_jax.model import weights
      m = weights.restore_weights({str(out)!r})
      assert m.config.name == 'tiny' and m.config.dtype == 'float32'
  """)
  subprocess.run([sys.executable, "-c", code], check=True)
