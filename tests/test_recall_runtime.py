"""End to end with the trained recall checkpoint: the disaggregated runtime's tokens equal a
no-cache recompute and answer far-back queries, and corrupting ONE loaded KV block (one layer,
the block holding the answer) on either read path makes that comparison fail.

The corruption happens where the bytes leave the storage link (TrafficManager.read's result), so
it reaches the PE (layerwise loads) and the DE buffer exactly as a bad read would.
"""


import numpy as np
import pytest
import tensorstore as ts

from dualpath_jax.engines.topology import TopologyConfig
from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec, chain_block_hashes
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.offline import run_offline, run_reference
from dualpath_jax.runtime.traffic import TrafficManager
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.tasks.recall import answer_block, recall_trajectories_with_answers
from dualpath_jax.tasks.trained import load_trained
from test_runtime import prompts_of  # noqa: I001  (a sibling test module, on the path)

COST = CostModel(fixed_s=1e-3, per_token_s=2e-6, per_attention_s=3e-9)
MAX_CONTEXT = 1024


@pytest.fixture(scope="module")
def model():
  return load_trained("tiny")  # fails clearly (with the training command) if it is missing


@pytest.fixture(scope="module")
def workload(model):
  trajs, answers = recall_trajectories_with_answers(
      agents=2, turns=3, first_append_tokens=300, append_tokens=90, gen_tokens=4,
      vocab_size=model.config.vocab_size, seed=5)
  return trajs, answers


@pytest.fixture(scope="module")
def reference(model, workload):
  return run_reference(model, workload[0], MAX_CONTEXT)


def _hit(prompts, agent, turn, bt, gen_tokens=4):
  """Blocks turn `turn` of `agent` reads: what its previous turn persisted, at most all but the
  last prompt token (runtime/offline.py's rule)."""
  with_kv = len(prompts[agent, turn - 1]) + gen_tokens - 1
  return min(with_kv // bt, (len(prompts[agent, turn]) - 1) // bt)


def _run(model, trajs, *, side=None, layer=0, prompts=None, prefix="run-"):
  """run_offline with the dual path and round-robin sides (reads alternate PE, DE); with `side`,
  the first hit read on that side gets one layer of its answer block replaced by noise."""
  layout = KVLayout.for_model(model.config)
  store = KVBlockStore.open(StoreSpec(driver="memory", path="x"), layout, context=ts.Context())
  rc = RuntimeConfig(mode="dualpath", scheduler="roundrobin",
                     topology=TopologyConfig(num_prefill_engines=2, num_decode_engines=2),
                     max_context_tokens=MAX_CONTEXT)
  corrupted = {}
  bt = layout.block_tokens
  original = TrafficManager.read

  def read(self, link, namespace, hashes, tokens, *, side: str, into=None, then=None):
    if side != target_side or corrupted:
      return original(self, link, namespace, hashes, tokens, side=side, into=into, then=then)
    agent = namespace[len(prefix):]
    turn, prompt = next((k, p) for (a, k), p in prompts.items()
                        if a == agent and k > 0 and _hit(prompts, a, k, bt) == len(hashes)
                        and chain_block_hashes(np.array(p, np.int32), bt)[:len(hashes)]
                        == list(hashes))
    block = answer_block(np.array(prompt, np.int32), layout.block_tokens)
    assert block < len(hashes)  # the answer lies in the hit part, read from the store
    corrupted.update(agent=agent, turn=turn, block=block)

    def corrupt(blocks):  # where the link delivered them (in place: the landing buffer's views)
      blocks = list(blocks) if into is not None else [np.array(b) for b in blocks]
      rng = np.random.default_rng(0)
      blocks[block][layer] = rng.integers(0, 256, blocks[block][layer].shape, dtype=np.uint8)
      return blocks if then is None else then(blocks)

    return original(self, link, namespace, hashes, tokens, side=side, into=into, then=corrupt)

  target_side = side
  with pytest.MonkeyPatch.context() as mp:
    if side is not None:
      mp.setattr(TrafficManager, "read", read)
    run = run_offline(rc, model, store, layout, trajs, cost_model=COST, namespace_prefix=prefix)
  return run, corrupted


def test_trained_runtime_matches_the_recompute_and_answers_far_back_queries(model, workload,
                                                                            reference):
  trajs, answers = workload
  run, _ = _run(model, trajs)
  assert run.generated == reference
  sides = {r["read_side"] for r in run.turns}
  assert {"pe", "de"} <= sides  # both read paths carried hits
  correct = [run.generated[t.agent_id, k][:len(answers[a][k])] == answers[a][k].tolist()
             for a, t in enumerate(trajs) for k in range(len(t.turns))]
  assert np.mean(correct) >= 0.8, correct  # the outputs depend on far-back context


@pytest.mark.parametrize("side", ["pe", "de"])
@pytest.mark.parametrize("layer", [0, 1])
def test_one_corrupt_block_on_either_read_path_breaks_token_equality(model, workload, reference,
                                                                     side, layer):
  trajs, _ = workload
  prompts = prompts_of(trajs, reference)
  run, corrupted = _run(model, trajs, side=side, layer=layer, prompts=prompts,
                        prefix=f"bad-{side}-{layer}-")
  assert corrupted, f"no hit read went to the {side} side"
  key = (corrupted["agent"], corrupted["turn"])
  assert run.generated[key] != reference[key], corrupted
  assert run.generated != reference
