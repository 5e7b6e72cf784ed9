"""Trained recall checkpoints (checkpoints/<preset>-recall) and greedy answers through prefill.

`load_trained(preset)` restores the Transformer that scripts/train_recall.py trained on the recall
task (tasks/recall.py); it never falls back to random weights. `greedy_answers` runs the serving
path on a batch of prompts: prefill of the prompt, optionally on top of a cached prefix whose KV
was computed by an earlier prefill (and optionally corrupted on the way, `corrupt_block`), then
greedy decode, each step a one-token prefill over the KV so far. Same math as the runtime's
engines, batched, so that held-out accuracy is cheap to measure.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model import weights
from dualpath_jax.model.config import get_preset
from dualpath_jax.model.prefill import empty_prefix_kv, pad_axis, prefill_jit
from dualpath_jax.model.transformer import Transformer

CHECKPOINTS_DIR = pathlib.Path(__file__).resolve().parents[2] / "checkpoints"
"""The repository's checkpoints/ folder."""
TRAIN_COMMANDS = {
    # Two stages: the second fine-tunes the first on 1,024-token streams with far-back queries.
    "tiny": ("python scripts/train_recall.py --preset=tiny --out=/tmp/tiny-recall-stage1 && "
             "python scripts/train_recall.py --preset=tiny --init_from=/tmp/tiny-recall-stage1 "
             "--out=checkpoints/tiny-recall --steps=400 --curriculum= --seq_len=1024 "
             "--batch_tokens=4096 --example_fraction=0.75 --example_min_distance=768 --lr=5e-4 "
             "--warmup=20 --seed=1"),
    "small": "python scripts/train_recall.py --preset=small --out=checkpoints/small-recall",
}
"""The commands (run from the repository root) that wrote each preset's checkpoint
(docs/checkpoints.md says on which device)."""
LONGEST_CONTEXT = {"tiny": 1024, "small": 2048}
"""The longest context each preset is used with, where its accuracy is measured."""


def checkpoint_dir(preset: str) -> pathlib.Path:
  """Where `preset`'s trained recall checkpoint lives: checkpoints/<preset>-recall."""
  return CHECKPOINTS_DIR / f"{preset}-recall"


def load_trained(preset: str, *, dtype: str = "float32") -> Transformer:
  """The recall-trained Transformer of `preset` ('tiny' or 'small'), parameters cast to `dtype`.

  Raises FileNotFoundError naming the missing folder and the command that trains it.
  """
  if preset not in TRAIN_COMMANDS:
    raise ValueError(f"load_trained: no recall checkpoint for preset {preset!r}; "
                     f"choose one of {sorted(TRAIN_COMMANDS)}")
  path = checkpoint_dir(preset)
  if not path.is_dir():
    raise FileNotFoundError(
        f"load_trained: no trained {preset} recall checkpoint at {path}; train it from the "
        f"repository root with: {TRAIN_COMMANDS[preset]}")
  return weights.restore_weights(path, get_preset(preset, dtype=dtype))


def corrupt_block(kv: np.ndarray, *, layer: int, block: int, block_tokens: int = 64,
                  mode: str = "noise", seed: int = 0) -> np.ndarray:
  """A copy of prefix KV [L, B, T, 2, H, D] with tokens [block * bt, (block + 1) * bt) of one
  layer replaced: by zeros, or by Gaussian noise with the K and V scales of that layer.

  With the recall checkpoints, corrupt the last layer of `recall.answer_block`: that is where the
  induction head reads the answer. Layer 0's prefix KV hardly matters to a prefill on top of it
  (tiny's previous-token head reads the new tokens), so corrupting it changes no answer.
  """
  kv = np.array(kv)
  lo, hi = block * block_tokens, min((block + 1) * block_tokens, kv.shape[2])
  if not 0 <= layer < kv.shape[0] or not 0 <= lo < kv.shape[2]:
    raise ValueError(f"corrupt_block: layer {layer} / block {block} outside KV of shape "
                     f"{list(kv.shape)}")
  target = kv[layer, :, lo:hi]  # [B, bt, 2, H, D]
  if mode == "zeros":
    kv[layer, :, lo:hi] = 0
  elif mode == "noise":
    scale = kv[layer].std(axis=(0, 1, 3, 4)).reshape(1, 1, 2, 1, 1)  # K and V separately
    noise = np.random.default_rng(seed).standard_normal(target.shape)
    kv[layer, :, lo:hi] = (noise * scale).astype(kv.dtype)
  else:
    raise ValueError(f"corrupt_block: mode must be 'noise' or 'zeros', got {mode!r}")
  return kv


def prefix_kv(model: Transformer, tokens: np.ndarray) -> np.ndarray:
  """KV [L, B, T, 2, H, D] of tokens [B, T] from a prefill with nothing cached: what the store
  would hold for them."""
  batch, length = tokens.shape
  _, kv = prefill_jit(model, jnp.asarray(tokens, jnp.int32), empty_prefix_kv(model.config, batch),
                      jnp.zeros(batch, jnp.int32), jnp.full(batch, length, jnp.int32))
  return np.array(kv)  # a writable copy


def greedy_answers(model: Transformer, prompts: np.ndarray, num_tokens: int, *,
                   cached_tokens: int = 0, cached_kv: np.ndarray | None = None,
                   corrupt=None) -> np.ndarray:
  """Greedy continuations int32 [B, num_tokens] of equal-length prompts [B, T].

  cached_tokens > 0: the first cached_tokens tokens come as prefix KV (`cached_kv`
  [L, B, cached_tokens, 2, H, D], computed by `prefix_kv` when None), passed through `corrupt`
  (a function KV -> KV) when given, and only the rest of the prompt is prefilled on top of it.
  """
  prompts = np.asarray(prompts, np.int32)
  batch, length = prompts.shape
  config = model.config
  if not 0 <= cached_tokens < length:
    raise ValueError(f"greedy_answers: cached_tokens must be in [0, {length}), got {cached_tokens}")
  if cached_tokens:
    kv = prefix_kv(model, prompts[:, :cached_tokens]) if cached_kv is None else cached_kv
    if corrupt is not None:
      kv = corrupt(kv)
    kv = jnp.asarray(kv, config.jnp_dtype)
  else:
    kv = empty_prefix_kv(config, batch)
  new = prompts[:, cached_tokens:]
  logits, new_kv = prefill_jit(model, jnp.asarray(new), kv,
                               jnp.full(batch, cached_tokens, jnp.int32),
                               jnp.full(batch, new.shape[1], jnp.int32), all_logits=False)
  generated = [np.asarray(jnp.argmax(logits, -1), np.int32)]
  total = length + num_tokens - 1
  context = pad_axis(jnp.concatenate([kv, new_kv], axis=2), total, 2)
  for step in range(num_tokens - 1):
    position = length + step
    logits, step_kv = prefill_jit(model, jnp.asarray(generated[-1])[:, None], context,
                                  jnp.full(batch, position, jnp.int32), jnp.ones(batch, jnp.int32),
                                  all_logits=False)
    context = jax.lax.dynamic_update_slice_in_dim(context, step_kv, position, axis=2)
    generated.append(np.asarray(jnp.argmax(logits, -1), np.int32))
  return np.stack(generated, axis=1)


def eval_batch_size(config, length: int) -> int:
  """Prompts per prefill that keep the [B, heads, T, T] float32 attention scores near 256 MiB."""
  return max(1, (256 << 20) // (4 * config.num_heads * length ** 2))


def recall_accuracy(model: Transformer, prompts: np.ndarray, answers: np.ndarray, *,
                    cached_tokens: int = 0, batch_size: int | None = None) -> dict[str, float]:
  """Exact-match and per-token accuracy of greedy answers to prompts [N, T] (answers [N, A])."""
  prompts, answers = np.asarray(prompts), np.asarray(answers)
  batch_size = batch_size or eval_batch_size(model.config, prompts.shape[1])
  got = np.concatenate([
      greedy_answers(model, prompts[i:i + batch_size], answers.shape[1],
                     cached_tokens=cached_tokens)
      for i in range(0, len(prompts), batch_size)])
  correct = got == answers
  return dict(exact_match=float(correct.all(axis=1).mean()), token_accuracy=float(correct.mean()),
              token_accuracy_by_position=[round(float(c), 4) for c in correct.mean(axis=0)],
              examples=int(len(prompts)))
