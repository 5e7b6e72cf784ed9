"""Profiles a PE's forward time on this device kind and fits the batch selector's cost model.

What is timed is what a PE shard runs for a batch without any KV movement: the embedding, every
layer's `prefill_layer` over a padded prefix, and the last token's logits, for batches of equal
(cached, new) rows. `fit_cost_model` (scheduler/quota.py) turns the samples into a CostModel;
its error on the samples is reported with it.

The fitted model is a JSON file per (device kind, model preset, dtype); `default_path` names it
under configs/cost_models/, and `scripts/profile_prefill.py` writes it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model.prefill import (embed_tokens_jit, last_token_logits_jit, pow2_at_least,
                                        prefill_layer_jit)
from dualpath_jax.scheduler.quota import CostModel, fit_cost_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_slug(device: jax.Device | None = None) -> str:
  """'cpu' or the device kind in lowercase with dashes, e.g. 'nvidia-h100-80gb-hbm3'."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return "cpu"
  return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")


def default_path(preset: str, dtype: str, device: jax.Device | None = None) -> str:
  return os.path.join(REPO_ROOT, "configs", "cost_models",
                      f"{device_slug(device)}-{preset}-{dtype}.json")


def time_forward(model, sharding, *, batch: int, cached: int, new: int, block_tokens: int,
                 reps: int = 3) -> float:
  """Median wall time of one forward over `batch` rows of (cached, new), compiled beforehand."""
  config = model.config
  tp = pow2_at_least(cached, block_tokens) if cached else 0
  tn = pow2_at_least(new, block_tokens)
  put = lambda a: jax.device_put(a, sharding)  # noqa: E731
  tokens = put(np.ones((batch, tn), np.int32))
  prefix = put(jnp.zeros((batch, tp, 2, config.num_kv_heads, config.head_dim),
                         config.jnp_dtype))
  prefix_len = put(np.full((batch,), cached, np.int32))
  new_len = put(np.full((batch,), new, np.int32))

  def forward():
    x = embed_tokens_jit(model, tokens)
    for layer in model.layers:
      x, _ = prefill_layer_jit(layer, x, prefix, prefix_len, new_len)
    return last_token_logits_jit(model, x, new_len).block_until_ready()

  forward()  # compile
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    forward()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def profile(model, sharding, *, cached: Sequence[int], new: Sequence[int],
            batches: Sequence[int], block_tokens: int, reps: int = 3,
            progress: Callable[[str], None] | None = None
            ) -> tuple[CostModel, dict, list[dict]]:
  """Times every (batch, cached, new) combination; returns the fit, its error and the samples."""
  samples, rows = [], []
  combos = [(b, c, n) for b in batches for c in cached for n in new]
  for i, (b, c, n) in enumerate(combos):
    seconds = time_forward(model, sharding, batch=b, cached=c, new=n, block_tokens=block_tokens,
                           reps=reps)
    samples.append(([(c, n)] * b, seconds))
    rows.append(dict(batch=b, cached=c, new=n, seconds=seconds))
    if progress:
      progress(f"profile {i + 1}/{len(combos)}: batch {b} cached {c} new {n}: "
               f"{seconds * 1e3:.2f} ms")
  model_fit, error = fit_cost_model(samples)
  return model_fit, error, rows


def save(path: str, cost: CostModel, error: dict, rows: list[dict], about: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(cost_model=cost.to_dict(), fit_error=error, about=about, samples=rows), f,
              indent=2)


def load(path: str) -> CostModel:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"runtime.cost_model: cannot read {path}: {e}") from e
  if "cost_model" not in data:
    raise ValueError(f"runtime.cost_model: {path} has no 'cost_model' entry")
  return CostModel.from_dict(data["cost_model"])
