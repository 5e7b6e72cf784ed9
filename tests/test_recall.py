"""The recall task (tasks/recall.py) and its trained tiny checkpoint (tasks/trained.py).

Generator invariants: the answer really follows the query key's one earlier occurrence, far back;
streams are deterministic in the seed; agents never share a prefix. Checkpoint: it loads and
answers held-out prompts at the longest tiny context (1,024 tokens) through prefill with and
without a cached prefix. Mutation: corrupting the last layer's KV of the 64-token block that holds
the answer changes the greedy answer (and corrupting another block does not), so token equality
with a reference does prove that loaded KV is right.
"""

import numpy as np
import pytest

from dualpath_jax.kvstore import chain_block_hashes
from dualpath_jax.tasks import recall, trained

BT = 64
LONGEST = trained.LONGEST_CONTEXT["tiny"]  # 1024
A = recall.DEFAULT_ANSWER_TOKENS


def _examples(n, length, seed=123, vocab_size=256):
  rng = np.random.default_rng(seed)
  examples = [recall.make_example(rng, vocab_size=vocab_size, length=length) for _ in range(n)]
  return np.stack([p for p, _ in examples]), np.stack([a for _, a in examples])


@pytest.mark.parametrize("vocab_size,length", [(256, 256), (256, 1024), (512, 2048)])
def test_example_answer_follows_the_one_earlier_occurrence_of_the_key_far_back(vocab_size, length):
  prompts, answers = _examples(20, length, vocab_size=vocab_size)
  vocab = recall.RecallVocab(vocab_size=vocab_size)
  for prompt, answer in zip(prompts, answers):
    assert prompt.shape == (length,) and prompt.dtype == np.int32 and answer.shape == (A,)
    key = prompt[-1]
    assert vocab.keys[0] <= key < vocab.keys[1]
    assert (prompt[:-1] == key).sum() == 1  # one definition, never queried before
    pos = recall.answer_position(prompt)
    np.testing.assert_array_equal(prompt[pos:pos + A], answer)
    assert length - pos >= length // 2  # far back: at least half the prompt away
    assert recall.answer_block(prompt, BT) == pos // BT
    # Every value token occurs once (plus copies after the same key), so the answer is unique.
    assert ((answer >= vocab.values[0]) & (answer < vocab.values[1])).all()
    assert (prompt == answer[0]).sum() == 1


def test_stream_recall_tokens_are_fixed_by_earlier_context():
  tokens, is_recall = recall.make_stream(np.random.default_rng(5), vocab_size=256, length=2048)
  assert is_recall.sum() > 100
  for i in np.flatnonzero(is_recall):
    earlier = np.flatnonzero(tokens[:i - 1] == tokens[i - 1])
    assert earlier.size and all(tokens[j + 1] == tokens[i] for j in earlier)


def test_generator_is_deterministic_in_the_seed():
  a = recall.make_batch(np.random.default_rng(7), batch=3, vocab_size=256, length=300)
  b = recall.make_batch(np.random.default_rng(7), batch=3, vocab_size=256, length=300)
  c = recall.make_batch(np.random.default_rng(8), batch=3, vocab_size=256, length=300)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  kw = dict(agents=3, turns=4, first_append_tokens=400, append_tokens=64, gen_tokens=8,
            vocab_size=256)
  first, again = recall.recall_trajectories(seed=1, **kw), recall.recall_trajectories(seed=1, **kw)
  for x, y in zip(first, again):
    for tx, ty in zip(x.turns, y.turns):
      np.testing.assert_array_equal(tx.append_ids, ty.append_ids)
  other = recall.recall_trajectories(seed=2, **kw)
  assert not np.array_equal(other[0].turns[0].append_ids,
                            recall.recall_trajectories(seed=1, **kw)[0].turns[0].append_ids)


@pytest.mark.parametrize("gen_tokens", [2, 8, 16])
def test_each_turn_ends_with_a_query_answered_in_earlier_context(gen_tokens):
  kw = dict(agents=6, turns=8, first_append_tokens=400, append_tokens=64, gen_tokens=gen_tokens,
            vocab_size=256, seed=3)
  trajectories, answers = recall.recall_trajectories_with_answers(**kw)
  assert [t.agent_id for t in trajectories] == [t.agent_id
                                                for t in recall.recall_trajectories(**kw)]
  for trajectory, agent_answers in zip(trajectories, answers):
    assert len(trajectory.turns) == 8
    context = []
    for k, (turn, answer) in enumerate(zip(trajectory.turns, agent_answers)):
      n = 400 if k == 0 else 64
      assert turn.append_ids.shape == (n,) and turn.gen_tokens == gen_tokens
      prompt = np.array(context + turn.append_ids.tolist(), np.int32)
      pos = recall.answer_position(prompt)
      assert len(answer) == min(A, gen_tokens)
      np.testing.assert_array_equal(prompt[pos:pos + len(answer)], answer)
      # Turn 0: in the first half of its append; later turns: before the append, in the store.
      assert pos < (200 if k == 0 else len(context))
      # Stand-in for the model's generated tokens: the right answer, then filler.
      context = prompt.tolist() + answer.tolist() + [0] * (gen_tokens - len(answer))


def test_agents_never_share_a_prefix():
  trajectories = recall.recall_trajectories(agents=32, turns=2, first_append_tokens=130,
                                            append_tokens=64, gen_tokens=4, vocab_size=256)
  first_blocks = {chain_block_hashes(t.turns[0].append_ids, BT)[0] for t in trajectories}
  assert len(first_blocks) == 32
  assert len({t.agent_id for t in trajectories}) == 32


def test_bad_arguments_fail_with_the_field_name():
  with pytest.raises(ValueError, match="workload.turns"):
    recall.recall_trajectories(agents=1, turns=0, first_append_tokens=400, append_tokens=64,
                               gen_tokens=8, vocab_size=256)
  with pytest.raises(ValueError, match="vocab_size"):
    recall.make_example(np.random.default_rng(0), vocab_size=30, length=100)
  with pytest.raises(ValueError, match="no room"):
    recall.make_example(np.random.default_rng(0), vocab_size=256, length=8)
  with pytest.raises(ValueError, match="does not occur"):
    recall.answer_position(np.array([1, 2, 3]))


def test_missing_checkpoint_names_the_folder_and_the_training_command(tmp_path, monkeypatch):
  monkeypatch.setattr(trained, "CHECKPOINTS_DIR", tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    trained.load_trained("small")
  assert str(tmp_path / "small-recall") in str(e.value)
  assert "python scripts/train_recall.py --preset=small" in str(e.value)
  with pytest.raises(ValueError, match="no recall checkpoint"):
    trained.load_trained("qwen2.5-7b")


@pytest.fixture(scope="module")
def model():
  return trained.load_trained("tiny")


@pytest.fixture(scope="module")
def held_out():
  # The eval script's held-out stream (scripts/eval_recall.py --seed), first prompts.
  return _examples(8, LONGEST, seed=2_000_003)


def test_trained_tiny_answers_far_back_queries_with_and_without_a_cached_prefix(model, held_out):
  prompts, answers = held_out
  cached = (LONGEST - 1) // BT * BT
  full = trained.greedy_answers(model, prompts, A)
  with_prefix = trained.greedy_answers(model, prompts, A, cached_tokens=cached)
  np.testing.assert_array_equal(with_prefix, full)
  # docs/checkpoints.md records >= 95% exact match on 200 prompts; allow one miss in 8.
  assert (full == answers).all(axis=1).sum() >= 7


def test_corrupting_the_answer_block_changes_the_answer(model, held_out):
  """Data-plane mutation: prefix KV from a prefill, one layer of one 64-token block corrupted.

  The last layer's: there the induction head reads the answer block's K and V. Layer 0's prefix
  KV does not decide tiny's answers (its previous-token head reads the new tokens), so a runtime
  mutation test must corrupt the last layer (or all) to be detected by token equality.
  The control: corrupting another block leaves the answer unchanged.
  """
  prompts, answers = held_out
  cached = (LONGEST - 1) // BT * BT
  checked = 0
  for prompt, answer in zip(prompts, answers):
    prefix = trained.prefix_kv(model, prompt[None, :cached])
    clean = trained.greedy_answers(model, prompt[None], A, cached_tokens=cached, cached_kv=prefix)
    if not np.array_equal(clean[0], answer):
      continue  # a miss of the model itself proves nothing either way
    block = recall.answer_block(prompt, BT)
    other = (block + 5) % (cached // BT)  # a block that holds neither the key nor the answer
    assert block * BT < cached
    for mode in ("noise", "zeros"):
      for corrupted, changes in ((block, True), (other, False)):
        corrupt = lambda kv, b=corrupted, mode=mode: trained.corrupt_block(  # noqa: E731
            kv, layer=model.config.num_layers - 1, block=b, block_tokens=BT, mode=mode)
        got = trained.greedy_answers(model, prompt[None], A, cached_tokens=cached,
                                     cached_kv=prefix, corrupt=corrupt)
        assert np.array_equal(got[0], answer) != changes, (mode, corrupted, block)
    checked += 1
  assert checked >= 6
