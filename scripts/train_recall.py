r"""Trains a preset on long-range associative recall (dualpath_jax/tasks/recall.py).

  python scripts/train_recall.py --preset=small --out=checkpoints/small-recall
  python scripts/train_recall.py --preset=tiny --out=/tmp/tiny-recall-stage1   # then stage 2:
  python scripts/train_recall.py --preset=tiny --init_from=/tmp/tiny-recall-stage1 \
      --out=checkpoints/tiny-recall --steps=400 --curriculum= --seq_len=1024 --batch_tokens=4096 \
      --example_fraction=0.75 --example_min_distance=768 --lr=5e-4 --warmup=20 --seed=1

Data is drawn on the fly from the generator, with fixed seeds: a run is deterministic on one
machine (bit-identical parameters on re-runs, `params_sha256` in train.json), not across
machines. The loss is next-token cross-entropy over whole streams, with the recall positions
(value tokens of queries) weighted 1 and all others `--other_weight`; the curriculum trains on
short streams first and ends at --seq_len. Writes the orbax checkpoint (float32) to --out and
--out/train.json: the flags, the training curve (loss and recall-token accuracy every --log_every
steps), wall time, and held-out recall accuracy (greedy, exact match and per token) at each
--eval_lengths, measured by tasks/trained.py's prefill path.

Runs on any JAX backend. The first stages ran on one H200 (2-3 minutes each); on the shared 2-core
CPU sandbox a 1,024-token step of tiny takes seconds, so the full recipes take hours there (the
tiny second stage took 6.5 minutes). Whether an induction circuit forms is sensitive to the seed
and the numerics: tiny seeds 1 and 2 of the same recipe reached 45% and 26% exact match at 1,024
tokens (docs/checkpoints.md).
"""

import hashlib
import json
import os
import time

from absl import app, flags, logging

_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "small"], "Model preset.")
_OUT = flags.DEFINE_string("out", None, "Checkpoint folder to write.", required=True)
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: per preset).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None,
                                "Stream length of the last curriculum phase (default: per preset).")
_CURRICULUM = flags.DEFINE_list(
    "curriculum", None, "Earlier phases as fraction:length (e.g. 0.6:256,0.25:512); the rest of "
    "the steps train at --seq_len (default: per preset).")
_BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 16384,
                                     "Tokens per batch; batch size = batch_tokens // length.")
_LR = flags.DEFINE_float("lr", None, "Peak learning rate (default: per preset).")
_WARMUP = flags.DEFINE_integer("warmup", 100, "Linear warm-up steps.")
_OTHER_WEIGHT = flags.DEFINE_float("other_weight", 0.1,
                                   "Loss weight of non-recall positions (recall positions: 1).")
_DEF_RATE = flags.DEFINE_float("def_rate", 1 / 16, "Training streams: definition rate per token.")
_QUERY_RATE = flags.DEFINE_float("query_rate", 1 / 16, "Training streams: query rate per token.")
_ANSWER_TOKENS = flags.DEFINE_integer("answer_tokens", 4, "Value span length A.")
_MAX_POSITION = flags.DEFINE_integer(
    "max_position", 0, "Spread training positions up to this (random forward jumps inside each "
    "stream), for long-distance generalisation from short streams; 0: plain 0..T-1.")
_FAR_QUERY_PROB = flags.DEFINE_float(
    "far_query_prob", 0.0, "Training streams: chance that a query picks the key seen longest "
    "ago (long distances) instead of any earlier key.")
_EXAMPLE_FRACTION = flags.DEFINE_float(
    "example_fraction", 0.0, "Fraction of each batch drawn as held-out-like streams "
    "(recall.make_example_stream: a far-back query, then its answer) instead of make_stream.")
_EXAMPLE_MIN_DISTANCE = flags.DEFINE_integer(
    "example_min_distance", None, "Held-out-like streams: least distance from the query back to "
    "its definition (default: half the stream).")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and data seed.")
_EVAL_LENGTHS = flags.DEFINE_list("eval_lengths", None,
                                  "Held-out prompt lengths (default: per preset).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 128, "Held-out prompts per length.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps between curve points.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from this checkpoint (same preset) instead of a fresh init: a second "
    "stage, e.g. longer streams; its train.json goes into this run's under 'init'.")
_FORCE = flags.DEFINE_bool("force", False, "Overwrite an existing checkpoint folder.")

DEFAULTS = {
    # The recipes of the committed checkpoints (docs/checkpoints.md); tiny's first stage.
    "tiny": dict(steps=5000, seq_len=1024, curriculum=["0.5:256", "0.25:512"], lr=3e-3,
                 eval_lengths=["512", "1024"]),
    "small": dict(steps=4500, seq_len=2048, curriculum=["0.3:256", "0.3:1024"], lr=1e-3,
                  eval_lengths=["1024", "2048"]),
}
EVAL_SEED_OFFSET = 1_000_003  # held-out prompts come from another stream than training's


def _value(flag, preset, name):
  return flag.value if flag.value is not None else DEFAULTS[preset][name]


def _phases(steps: int, seq_len: int, curriculum: list[str]) -> list[tuple[int, int]]:
  """[(first step, length)] of each phase."""
  phases, start = [], 0
  for item in curriculum:
    fraction, _, length = item.partition(":")
    phases.append((start, int(length)))
    start += int(round(float(fraction) * steps))
  if start >= steps:
    raise ValueError(f"--curriculum: the phases leave no steps for --seq_len={seq_len}")
  phases.append((start, seq_len))
  return phases


def spread_positions(rng, batch: int, length: int, max_position: int, jumps: int = 4):
  """Absolute positions [B, length]: 0, 1, 2, ... with `jumps` random forward jumps per row that
  together add up to a random amount in [0, max_position - length], so that a short stream shows
  the model the relative distances of a long one (RoPE sees only differences of positions)."""
  import numpy as np
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
  if max_position <= length:
    return positions
  for row in positions:
    extra = int(rng.integers(0, max_position - length + 1))
    cuts = np.sort(rng.integers(1, length, jumps))
    sizes = np.diff(np.sort(np.r_[0, rng.integers(0, extra + 1, jumps - 1), extra]))
    for cut, size in zip(cuts, sizes):
      row[cut:] += size
  return positions


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  # Deterministic reductions where XLA has a choice (GPU); no effect on CPU.
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from dualpath_jax.model import weights
  from dualpath_jax.model.config import get_preset
  from dualpath_jax.model.transformer import Transformer
  from dualpath_jax.tasks import recall, trained

  preset = _PRESET.value
  steps, seq_len = _value(_STEPS, preset, "steps"), _value(_SEQ_LEN, preset, "seq_len")
  curriculum, lr = _value(_CURRICULUM, preset, "curriculum"), _value(_LR, preset, "lr")
  eval_lengths = [int(n) for n in _value(_EVAL_LENGTHS, preset, "eval_lengths")]
  phases = _phases(steps, seq_len, curriculum)
  seed = _SEED.value
  config = get_preset(preset, dtype="float32")
  init = None
  if _INIT_FROM.value:
    model = weights.restore_weights(_INIT_FROM.value, config)
    init = dict(path=_INIT_FROM.value)
    init_json = os.path.join(_INIT_FROM.value, "train.json")
    if os.path.exists(init_json):
      with open(init_json) as f:
        init.update(json.load(f))
  else:
    model = Transformer(config, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  warmup = min(_WARMUP.value, steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b2=0.98, weight_decay=0.01))
  opt_state = optimizer.init(params)

  def forward(params, tokens, positions):
    """Transformer.__call__ with given absolute positions [B, T] (spread: see --max_position)."""
    model = nnx.merge(graphdef, params, rest)
    batch, length = tokens.shape
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
    empty = jnp.zeros((batch, 0, 2, config.num_kv_heads, config.head_dim), config.jnp_dtype)
    x = model.embed(tokens)
    for layer in model.layers:
      x, _ = layer(x, positions, empty, mask)
    return model.logits(x)

  def loss_fn(params, tokens, positions, recall_mask):
    logits = forward(params, tokens[:, :-1], positions[:, :-1])
    targets, is_recall = tokens[:, 1:], recall_mask[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = jnp.where(is_recall, 1.0, _OTHER_WEIGHT.value)
    hit = (jnp.argmax(logits, -1) == targets) & is_recall
    acc = hit.sum() / jnp.maximum(is_recall.sum(), 1)
    recall_loss = (ce * is_recall).sum() / jnp.maximum(is_recall.sum(), 1)
    return (ce * w).sum() / w.sum(), (recall_loss, acc)

  @jax.jit
  def train_step(params, opt_state, tokens, positions, recall_mask):
    (loss, (recall_loss, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, tokens, positions, recall_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, recall_loss, acc

  rng = np.random.default_rng([seed, 0])
  curve, window = [], []
  start_time = time.perf_counter()
  phase_of = lambda step: max(p for p in phases if p[0] <= step)[1]  # noqa: E731
  for step in range(steps):
    length = phase_of(step)
    batch = max(1, _BATCH_TOKENS.value // length)
    examples = int(round(batch * _EXAMPLE_FRACTION.value))
    tokens, recall_mask = recall.make_batch(rng, batch=batch - examples,
                                            vocab_size=config.vocab_size, length=length + 1,
                                            answer_tokens=_ANSWER_TOKENS.value,
                                            def_rate=_DEF_RATE.value,
                                            query_rate=_QUERY_RATE.value,
                                            far_query_prob=_FAR_QUERY_PROB.value)
    if examples:
      rows = [recall.make_example_stream(rng, vocab_size=config.vocab_size, length=length + 1,
                                         answer_tokens=_ANSWER_TOKENS.value,
                                         min_distance=_EXAMPLE_MIN_DISTANCE.value,
                                         def_rate=_DEF_RATE.value, query_rate=_QUERY_RATE.value)
              for _ in range(examples)]
      tokens = np.concatenate([tokens, np.stack([t for t, _ in rows])])
      recall_mask = np.concatenate([recall_mask, np.stack([r for _, r in rows])])
    positions = spread_positions(rng, tokens.shape[0], tokens.shape[1], _MAX_POSITION.value)
    params, opt_state, loss, recall_loss, acc = train_step(params, opt_state, tokens, positions,
                                                           recall_mask)
    window.append((loss, recall_loss, acc))
    if (step + 1) % _LOG_EVERY.value == 0 or step + 1 == steps:
      loss, recall_loss, acc = (float(np.mean([float(w[i]) for w in window])) for i in range(3))
      window = []
      elapsed = time.perf_counter() - start_time
      curve.append(dict(step=step + 1, length=length, loss=round(loss, 4),
                        recall_loss=round(recall_loss, 4), recall_token_accuracy=round(acc, 4),
                        elapsed_s=round(elapsed, 1)))
      print(f"step {step + 1:5d}  len {length:5d}  loss {loss:.4f}  recall loss {recall_loss:.4f}"
            f"  recall acc {acc:.3f}  {elapsed:.0f}s", flush=True)
  train_s = time.perf_counter() - start_time
  model = nnx.merge(graphdef, params, rest)
  weights.save_weights(_OUT.value, model, force=_FORCE.value)

  leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(params))
  digest = hashlib.sha256(b"".join(np.asarray(x, np.float32).tobytes() for x in leaves))
  evals = []
  for length in eval_lengths:
    eval_rng = np.random.default_rng([seed + EVAL_SEED_OFFSET, length])
    examples = [recall.make_example(eval_rng, vocab_size=config.vocab_size, length=length,
                                     answer_tokens=_ANSWER_TOKENS.value)
                for _ in range(_EVAL_EXAMPLES.value)]
    result = trained.recall_accuracy(model, np.stack([p for p, _ in examples]),
                                     np.stack([a for _, a in examples]))
    evals.append(dict(length=length, **result))
    print(f"held-out length {length}: exact match {result['exact_match']:.3f}, "
          f"per token {result['token_accuracy']:.3f} "
          f"(by position {result['token_accuracy_by_position']})", flush=True)
  summary = dict(preset=preset, seed=seed, steps=steps, seq_len=seq_len, phases=phases,
                 batch_tokens=_BATCH_TOKENS.value, lr=lr, warmup=warmup,
                 other_weight=_OTHER_WEIGHT.value,
                 answer_tokens=_ANSWER_TOKENS.value, def_rate=_DEF_RATE.value,
                 query_rate=_QUERY_RATE.value, far_query_prob=_FAR_QUERY_PROB.value,
                 example_fraction=_EXAMPLE_FRACTION.value,
                 example_min_distance=_EXAMPLE_MIN_DISTANCE.value, max_position=_MAX_POSITION.value,
                 train_s=round(train_s, 1),
                 device=str(jax.devices()[0].device_kind), eval_seed=seed + EVAL_SEED_OFFSET,
                 params_sha256=digest.hexdigest(), held_out=evals, curve=curve, init=init)
  with open(os.path.join(_OUT.value, "train.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {_OUT.value} ({train_s:.0f}s of training)")


if __name__ == "__main__":
  app.run(main)
