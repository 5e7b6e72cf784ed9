r"""Held-out recall accuracy of a trained checkpoint through the inference path.

  python scripts/eval_recall.py --preset=tiny --out=/tmp/eval_tiny.json
  python scripts/eval_recall.py --preset=small --out=/tmp/eval_small.json

Three measurements, each greedy, exact match over the answer's tokens and per token:
  prompts   make_example prompts of each --lengths, answered by prefill with nothing cached, by
            prefill on top of a cached prefix (every whole 64-token block but the last prompt
            token's, KV from an earlier prefill), and by the same with the answer's block
            corrupted in the last layer (noise): accuracy must collapse there
  agents    recall_trajectories replayed by the ColocatedEngine (the runtime's reference flow:
            store lookup, prefix read, prefill of the append, paged decode, persist) against a
            file store, and by the no-cache engine: per-turn answer accuracy and whether every
            generated token of the cached run equals the no-cache run
The checkpoint is checkpoints/<preset>-recall (tasks/trained.load_trained), in float32.
"""

import json
import os
import tempfile
import time

from absl import app, flags, logging

_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "small"], "Model preset.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Prompt lengths (default: per preset).")
_EXAMPLES = flags.DEFINE_integer("examples", 200, "Held-out prompts per length.")
_AGENTS = flags.DEFINE_integer("agents", 8, "Agents of the multi-turn replay (0: skip it).")
_SEED = flags.DEFINE_integer("seed", 2_000_003, "Held-out seed (training uses 0 and 1_000_003).")
_OUT = flags.DEFINE_string("out", None, "JSON file to write (default: print only).")

DEFAULTS = {
    # Lengths, and the agent workload: its last turn's prompt is just under the longest context.
    "tiny": dict(lengths=["256", "512", "1024"],
                 workload=dict(turns=8, first_append_tokens=448, append_tokens=64, gen_tokens=8)),
    "small": dict(lengths=["512", "1024", "2048"],
                  workload=dict(turns=8, first_append_tokens=896, append_tokens=128,
                                gen_tokens=16)),
}
BT = 64


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np

  from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec
  from dualpath_jax.runtime.colocated import ColocatedEngine
  from dualpath_jax.tasks import recall, trained

  preset = _PRESET.value
  model = trained.load_trained(preset)
  config = model.config
  lengths = [int(n) for n in (_LENGTHS.value or DEFAULTS[preset]["lengths"])]
  a = recall.DEFAULT_ANSWER_TOKENS
  result = dict(preset=preset, checkpoint=str(trained.checkpoint_dir(preset)), seed=_SEED.value,
                device=str(jax.devices()[0].device_kind), prompts=[], agents=None)

  for length in lengths:
    start = time.perf_counter()
    rng = np.random.default_rng([_SEED.value, length])
    examples = [recall.make_example(rng, vocab_size=config.vocab_size, length=length)
                for _ in range(_EXAMPLES.value)]
    prompts = np.stack([p for p, _ in examples])
    answers = np.stack([x for _, x in examples])
    cached = (length - 1) // BT * BT
    row = dict(length=length, examples=len(examples), cached_tokens=cached)
    row["no_cache"] = trained.recall_accuracy(model, prompts, answers)
    row["cached_prefix"] = trained.recall_accuracy(model, prompts, answers, cached_tokens=cached)
    # Corrupt each prompt's own answer block in a batch's prefix KV.
    got, batch = [], trained.eval_batch_size(config, length)
    for i in range(0, len(prompts), batch):
      rows = prompts[i:i + batch]
      kv = trained.prefix_kv(model, rows[:, :cached])
      for r, prompt in enumerate(rows):
        kv[:, r:r + 1] = trained.corrupt_block(kv[:, r:r + 1], layer=config.num_layers - 1,
                                               block=recall.answer_block(prompt, BT),
                                               block_tokens=BT, seed=i + r)
      got.append(trained.greedy_answers(model, rows, a, cached_tokens=cached, cached_kv=kv))
    correct = np.concatenate(got) == answers
    row["answer_block_corrupted"] = dict(exact_match=float(correct.all(axis=1).mean()),
                                         token_accuracy=float(correct.mean()))
    row["elapsed_s"] = round(time.perf_counter() - start, 1)
    result["prompts"].append(row)
    print(f"length {length}: exact match no cache {row['no_cache']['exact_match']:.3f}, cached "
          f"{row['cached_prefix']['exact_match']:.3f}, answer block corrupted "
          f"{row['answer_block_corrupted']['exact_match']:.3f}; per token no cache "
          f"{row['no_cache']['token_accuracy']:.3f}  ({row['elapsed_s']}s)", flush=True)

  if _AGENTS.value:
    start = time.perf_counter()
    workload = dict(DEFAULTS[preset]["workload"], agents=_AGENTS.value,
                    vocab_size=config.vocab_size, seed=_SEED.value)
    trajectories, answers = recall.recall_trajectories_with_answers(**workload)
    max_context = (workload["first_append_tokens"] + workload["turns"]
                   * (workload["append_tokens"] + workload["gen_tokens"]))
    layout = KVLayout.for_model(config, BT)
    turns, equal, hit_tokens = [], True, 0
    with tempfile.TemporaryDirectory() as tmp:
      store = KVBlockStore.open(StoreSpec(driver="file", path=os.path.join(tmp, "store")), layout)
      engine = ColocatedEngine(model, store, max_context_tokens=max_context)
      reference = ColocatedEngine(model, None, use_cache=False, max_context_tokens=max_context)
      for trajectory, agent_answers in zip(trajectories, answers):
        context = []
        for k, (turn, answer) in enumerate(zip(trajectory.turns, agent_answers)):
          prompt = context + turn.append_ids.tolist()
          got = engine.run_turn(trajectory.agent_id, prompt, turn.gen_tokens)
          want = reference.run_turn(trajectory.agent_id, prompt, turn.gen_tokens)
          equal &= bool(np.array_equal(got.generated, want.generated))
          hit_tokens += got.hit_tokens
          n = len(answer)
          turns.append(dict(turn=k, prompt_tokens=len(prompt),
                            distance=len(prompt) - recall.answer_position(np.array(prompt)),
                            correct=int((got.generated[:n] == answer).sum()), answer_tokens=n))
          context = prompt + got.generated.tolist()
      store.close()
    exact = [t["correct"] == t["answer_tokens"] for t in turns]
    last = [e for e, t in zip(exact, turns) if t["turn"] == workload["turns"] - 1]
    result["agents"] = dict(
        workload=workload, turns=len(turns), exact_match=float(np.mean(exact)),
        token_accuracy=float(sum(t["correct"] for t in turns)
                             / sum(t["answer_tokens"] for t in turns)),
        last_turn_exact_match=float(np.mean(last)),
        longest_prompt=max(t["prompt_tokens"] for t in turns),
        median_distance=float(np.median([t["distance"] for t in turns])),
        hit_tokens=hit_tokens, cached_equals_no_cache=equal,
        elapsed_s=round(time.perf_counter() - start, 1))
    ag = result["agents"]
    print(f"agents: {ag['turns']} turns, answer exact match {ag['exact_match']:.3f} (last turn "
          f"{ag['last_turn_exact_match']:.3f}, prompts up to {ag['longest_prompt']} tokens, median "
          f"distance {ag['median_distance']:.0f}), cached == no-cache: {equal}  "
          f"({ag['elapsed_s']}s)", flush=True)

  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
