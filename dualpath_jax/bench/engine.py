"""One engine on one device: prefill MFU, decode step time vs the HBM roofline, PE peak memory.

All with the model's own code and random weights (init_random) of a preset's true geometry:

  prefill   `append_tokens` new tokens on top of C cached ones (prefix KV random on the device):
            'layerwise'       embed -> prefill_layer_jit per layer -> last_token_logits (the PE's
                              path, one compiled layer program reused for every layer)
            'whole'           prefill_jit: all layers under one jit
            'layerwise_sdpa'  the layerwise path with the model's einsum attention swapped, for
                              this measurement only, for jax.nn.dot_product_attention with a given
                              implementation ('cudnn' on GPUs); the model code is not changed
            'layerwise_split' the layerwise path under ModelConfig.prefill_kv_splits = k (one row
                              per k of `prefill_kv_splits`): split_attention, the prefix in k
                              chunks plus the new tokens merged by log-sum-exp, no mask; 'cudnn'
                              where sdpa_implementation is 'cudnn', else 'einsum'
            Every variant but 'layerwise' and 'whole' checks its first layer against the einsum
            layer (first_layer_rel_err_vs_einsum).
            MFU = cost.prefill_flops(last_token_logits_only) / median seconds / peak FLOP/s.
  decode    decode_step_jit on a paged pool (the DE runs greedy_decode_step_jit: the same step
            plus the argmax in one program), `batch` sequences of `context` tokens each, once per
            decode attention (ModelConfig.paged_attention: 'gather' copies the pages into a
            dense context, 'pallas' reads them in place; row key `paged_attention`). The
            roofline reads every weight but the embedding table once and the batch's KV once:
            (weights + batch * context * kv_bytes_per_token) / HBM bytes/s; fraction = roofline
            time / measured step time. 'step_s' syncs every step (as a DE that reads each
            step's tokens before the next did); 'pipelined_step_s' issues the steps back to back
            and divides; 'overlapped_step_s' runs the DE's loop (runtime/decode_worker.py)
            without its page-table work: greedy_decode_step_jit fed its last tokens and
            seq_lens on the device, the last step's tokens read right after the next is
            dispatched ('overlapped_met' judges it against the same target as 'met'). One
            diagnostic row per decode attention (`diagnostic: 'fixed_cost'`, batch 1, context
            0: the new token's page only, no target) shows the per-step cost that is not KV
            reading (weights, dispatch). 'pallas' rows record the kernel fields they ran with
            (PALLAS_FIELDS: `pallas_k_splits`, `pallas_block_tokens`, `pallas_num_warps`,
            `pallas_num_stages`, `pallas_kernel`; `pallas_blocking`: what
            paged.pallas_blocking made of them for this context). With `pallas_blockings`
            (tuples of those fields), 'pallas' decode is measured once more per point at the
            largest batch (rows with `sweep: 'pallas_blocking'`), to pick the fastest kernel
            and blocking.
  peak      a layerwise prefill of `append_tokens` on a `peak_context`-token prefix streamed from
            host Full Blocks layer by layer (layout.layer_kv -> transfer.host_to_device, layer l+1
            in flight while layer l computes, and layer l-1 held until then as the PE's sender
            thread holds it for its D2H: LAYERS_IN_FLIGHT layers, as the PE worker does), against
            weights + LAYERS_IN_FLIGHT layers of prefix KV + one layer's activations. Peak bytes
            come from device.memory_stats() (absent on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.bench import PALLAS_FIELDS, hardware
from dualpath_jax.bench.timing import median_seconds

PREFILL_VARIANTS = ("layerwise", "whole", "layerwise_sdpa", "layerwise_split")


def _tree_bytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes"))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def sdpa_attention(implementation: str | None):
  """transformer.attention's contract (q [B,T,N,D], kv [B,S,2,H,D], mask [B,T,S]) by
  jax.nn.dot_product_attention; query head n uses kv head n // (N / H), as the model does.

  The returned function counts how often it was traced (`.traces`), which shows that a swap took
  effect even where its outputs are bitwise those of the einsum (XLA on CPU).
  """
  def attention(q, kv, mask, *_):
    attention.traces += 1
    out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask=mask[:, None],
                                       implementation=implementation)
    return out.astype(q.dtype)
  attention.traces = 0
  return attention


@contextlib.contextmanager
def swapped_attention(fn):
  """Within the block, DecoderLayer calls `fn` instead of the einsum attention (traces only)."""
  from dualpath_jax.model import transformer
  saved = transformer.attention
  transformer.attention = fn
  try:
    yield
  finally:
    transformer.attention = saved


def _rel_err(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _stats(device) -> dict | None:
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (not implemented on some backends)
    return None
  return dict(stats) if stats else None


def activation_bytes(config, new_tokens: int, context_tokens: int) -> dict:
  """Estimated live bytes of one prefill layer's activations (einsum attention), by part.

  The einsum attention materialises float32 scores [N, Tn, S] (S = context + new), a masked
  copy and the probabilities; the layer concatenates the prefix with the new KV (a copy of the
  layer's KV) and the attention reads K and V as separate slices (another copy).
  """
  c = config
  item = c.itemsize
  s = context_tokens + new_tokens
  kv_layer = s * 2 * c.num_kv_heads * c.head_dim * item
  parts = dict(
      attention_scores=c.num_heads * new_tokens * s * (4 + 4 + item),
      mask=2 * new_tokens * s,
      kv_concat_and_split=2 * kv_layer,
      qkv_rope=new_tokens * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * (item + 4) * 2,
      mlp=3 * new_tokens * c.intermediate_size * item,
      hidden=6 * new_tokens * c.hidden_size * 4,
      logits=c.vocab_size * 4,
  )
  parts["total"] = sum(parts.values())
  return parts


def measure_engine(device: jax.Device, *, model_config, prefill_contexts: Sequence[int],
                   append_tokens: int, prefill_variants: Sequence[str],
                   sdpa_implementation: str | None, decode_batches: Sequence[int],
                   decode_context: int, peak_context: int, block_tokens: int, repeats: int,
                   warmup: int, decode_steps: int, card: hardware.CardSpec,
                   target_prefill_mfu: float, target_decode_roofline: float, seed: int = 0,
                   decode_attentions: Sequence[str] = ("gather",),
                   pallas_blockings: Sequence[tuple[int, ...]] = (),
                   prefill_kv_splits: Sequence[int] = (4,),
                   decode_profile_steps: int = 0, profile_dir: str = "",
                   log: Callable[[str], None] = print,
                   out_of_time: Callable[[], bool] = lambda: False,
                   on_update: Callable[[dict], None] | None = None) -> dict:
  """Prefill, decode and peak-memory numbers of `model_config` on `device`.

  decode_attentions: the ModelConfig.paged_attention values to measure decode with, each at
  every batch size (the model's own value is not used for decode).
  pallas_blockings: (pallas_k_splits, pallas_block_tokens) pairs, or 4-tuples that add
  (pallas_num_warps, pallas_num_stages), or 5-tuples that add pallas_kernel (ModelConfig fields,
  PALLAS_FIELDS; left-out fields keep the model config's values), under which 'pallas'
  decode is measured again at the largest of decode_batches, after the other decode rows; () =
  only the model config's own. A point equal to the model config's is not measured twice where
  'pallas' is among decode_attentions.
  prefill_kv_splits: the ModelConfig.prefill_kv_splits values 'layerwise_split' is measured at.
  decode_profile_steps > 0: last of all, a jax.profiler trace of that many steps of the DE's loop
  (bench/decode_profile.py) under the first decode attention ('pallas' where measured) at batch 1
  context 0 and at the largest batch, and under the fastest sweep point at the largest batch
  where that is not the model's own; written under `profile_dir`, split by kernel class into
  result['decode_profile'].
  """
  from dualpath_jax.model import cost, weights
  from dualpath_jax.model.config import PAGED_ATTENTION_IMPLEMENTATIONS, PALLAS_KERNELS

  unknown = set(prefill_variants) - set(PREFILL_VARIANTS)
  if unknown:
    raise ValueError(f"engine.prefill_variants: expected some of {PREFILL_VARIANTS}, "
                     f"got {prefill_variants}")
  decode_attentions = tuple(decode_attentions)
  if not set(decode_attentions) <= set(PAGED_ATTENTION_IMPLEMENTATIONS):
    raise ValueError(f"engine.decode_attentions: expected some of "
                     f"{PAGED_ATTENTION_IMPLEMENTATIONS}, got {decode_attentions}")
  config = model_config
  sweep = []  # the configs of the blocking sweep's points, in order, without repeats
  for pair in pallas_blockings:
    try:
      values = tuple(pair)
      if len(values) not in (2, 4, 5):
        raise ValueError(f"{len(values)} values")
      values = tuple(int(v) for v in values[:4]) + values[4:]
      point = config.replace(paged_attention="pallas", **dict(zip(PALLAS_FIELDS, values)))
    except (TypeError, ValueError) as e:
      raise ValueError(f"engine.pallas_blockings: expected (k_splits, block_tokens) pairs or "
                       f"(k_splits, block_tokens, num_warps, num_stages[, kernel]) of positive "
                       f"ints, block_tokens and num_warps powers of 2, kernel one of "
                       f"{PALLAS_KERNELS}; {pair!r}: {e}") from None
    default = point == config.replace(paged_attention="pallas")
    if point not in sweep and not (default and "pallas" in decode_attentions):
      sweep.append(point)
  prefill_kv_splits = tuple(prefill_kv_splits)
  if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0
             for k in prefill_kv_splits):
    raise ValueError(f"engine.prefill_kv_splits: expected positive ints (ModelConfig."
                     f"prefill_kv_splits values), got {prefill_kv_splits}")
  if sweep and not decode_batches:
    raise ValueError("engine.pallas_blockings: needs decode_batches (the sweep runs at the "
                     "largest)")
  if decode_profile_steps and not (decode_batches and decode_attentions and profile_dir):
    raise ValueError("engine.decode_profile_steps: needs decode_batches, decode_attentions and "
                     "a profile directory")
  result = dict(
      device=str(device), card=dict(name=card.name, peak_flops=card.peak_flops,
                                    hbm_bytes_per_s=card.hbm_bytes_per_s, source=card.source),
      model=dict(preset=config.name, dtype=config.dtype, num_layers=config.num_layers,
                 param_count=cost.param_count(config)),
      attention="model: einsum (dualpath_jax.model.transformer.attention, float32 scores); "
                f"layerwise_sdpa: jax.nn.dot_product_attention(implementation="
                f"{sdpa_implementation!r})",
      decode_attentions=list(decode_attentions),
      pallas_default_blocking=[getattr(config, f) for f in PALLAS_FIELDS],
      pallas_blockings=[[getattr(c, f) for f in PALLAS_FIELDS] for c in sweep],
      append_tokens=append_tokens, repeats=repeats, warmup=warmup,
      targets=dict(prefill_mfu=target_prefill_mfu, decode_roofline_fraction=target_decode_roofline,
                   peak_bytes="<= bound"),
      prefill=[], decode=[])

  def update():
    if on_update:
      on_update(result)

  with jax.default_device(device):
    t0 = time.perf_counter()
    model = weights.init_random(config, seed=seed)
    weights_bytes = _tree_bytes(model)
    jax.block_until_ready(jax.tree_util.tree_leaves(model))
    result["model"].update(weights_bytes=weights_bytes, init_s=time.perf_counter() - t0)
    log(f"engine: {config.name} {config.dtype} on {device}: "
        f"{weights_bytes / 2**30:.2f} GiB of weights in {time.perf_counter() - t0:.1f} s")
    update()
    key = jax.random.key(seed)
    tokens = jax.random.randint(jax.random.fold_in(key, 1), (1, append_tokens), 0,
                                config.vocab_size, jnp.int32)
    new_len = jnp.array([append_tokens], jnp.int32)

    # --- peak memory of a streamed layerwise prefill (first: memory_stats peaks never reset) --
    if peak_context and not out_of_time():
      try:
        result["peak_memory"] = _peak_memory(model, device, config, tokens, new_len,
                                             peak_context, block_tokens, weights_bytes, seed,
                                             log)
      except Exception as e:  # noqa: BLE001
        result["peak_memory"] = dict(error=repr(e))
        log(f"engine: peak memory FAILED: {e!r}")
      update()

    def prefill_at(variants):
      for context in prefill_contexts:
        if out_of_time():
          result.setdefault("skipped", []).append(f"prefill {variants} at {context}: time budget")
          continue
        try:
          rows = _prefill_rows(model, config, tokens, new_len, context, append_tokens, variants,
                               sdpa_implementation, repeats, warmup, card, target_prefill_mfu,
                               seed, log, out_of_time, prefill_kv_splits)
        except Exception as e:  # noqa: BLE001
          rows = [dict(context=context, error=repr(e))]
          log(f"engine: prefill at {context} FAILED: {e!r}")
        result["prefill"] += rows
        update()

    # Whole-model prefill compiles all layers into one program (slow to compile): last.
    prefill_at([v for v in prefill_variants if v != "whole"])

    # --- decode: the fixed-cost rows first, then each batch under every attention ------------
    # The same parameter arrays under each decode attention (weights.with_config: no copy).
    decode_configs = {name: config.replace(paged_attention=name) for name in decode_attentions}
    runs = ([(decode_configs[name], 1, 0, "fixed_cost") for name in decode_attentions]
            + [(decode_configs[name], batch, decode_context, None) for batch in decode_batches
               for name in decode_attentions]
            + [(point, max(decode_batches), decode_context, "sweep") for point in sweep])
    decode_models = {}  # a model per config: one decode-step trace each (paged.decode_step_jit)
    for run_config, batch, context, kind in runs:
      name = run_config.paged_attention
      blocking = {}
      if name == "pallas":
        blocking = {f: getattr(run_config, f) for f in PALLAS_FIELDS}
      what = f"decode {name} batch {batch} ctx {context}" + (
          f" {pallas_point_name(run_config)}" if kind == "sweep" else "")
      if out_of_time():
        result.setdefault("skipped", []).append(f"{what}: time budget")
        continue
      try:
        if run_config not in decode_models:
          decode_models[run_config] = weights.with_config(model, run_config)
        row = _decode_row(decode_models[run_config], config, batch, context, block_tokens,
                          decode_steps, warmup, weights_bytes, card, target_decode_roofline,
                          seed, log)
      except Exception as e:  # noqa: BLE001
        row = dict(batch=batch, context=context, error=repr(e))
        log(f"engine: {what} FAILED: {e!r}")
      row = dict(paged_attention=name, **blocking, **row)
      if kind == "fixed_cost":
        row["diagnostic"] = kind
        row.pop("met", None)  # no target: the step's cost besides reading KV
        row.pop("overlapped_met", None)
      elif kind == "sweep":
        row["sweep"] = "pallas_blocking"
      result["decode"].append(row)
      update()
    del decode_models

    if "whole" in prefill_variants:
      prefill_at(["whole"])

    if decode_profile_steps:
      if out_of_time():
        result.setdefault("skipped", []).append("decode profile: time budget")
      else:
        profiled = "pallas" if "pallas" in decode_attentions else decode_attentions[0]
        result["decode_profile"] = _profile(model, decode_configs[profiled], result["decode"],
                                            max(decode_batches), decode_context, block_tokens,
                                            decode_profile_steps, profile_dir, seed, log)
        update()
  return result


def pallas_point_name(config) -> str:
  """'k_splits K block_tokens B num_warps W num_stages S': a 'pallas' config's kernel fields."""
  return " ".join(f"{f.removeprefix('pallas_')} {getattr(config, f)}" for f in PALLAS_FIELDS)


def _profile(model, config, rows, batch, context, page_tokens, steps, profile_dir, seed, log):
  """decode_profile.profile_decode of `config` at batch 1 context 0 and at `batch`, and of the
  sweep point whose DE loop was fastest at `batch` where it beat `config`'s own row."""
  from dualpath_jax.bench.decode_profile import profile_decode
  runs = [("fixed_cost", config, 1, 0), (f"batch_{batch}", config, batch, context)]
  measured = [r for r in rows if r["batch"] == batch and r["context"] == context
              and "error" not in r and r["paged_attention"] == config.paged_attention]
  swept = [r for r in measured if r.get("sweep") == "pallas_blocking"]
  own = [r["overlapped_step_s"] for r in measured if "sweep" not in r]
  if swept:
    best = min(swept, key=lambda r: r["overlapped_step_s"])
    if not own or best["overlapped_step_s"] < min(own):
      point = config.replace(**{f: best[f] for f in PALLAS_FIELDS})
      runs.append((f"batch_{batch}_best_sweep", point, batch, context))
  try:
    return profile_decode(model, runs, page_tokens=page_tokens, steps=steps,
                          log_dir=profile_dir, seed=seed, log=log)
  except Exception as e:  # noqa: BLE001
    log(f"engine: decode profile FAILED: {e!r}")
    return dict(error=repr(e))


def _prefill_rows(model, config, tokens, new_len, context, append_tokens, variants,
                  sdpa_implementation, repeats, warmup, card, target, seed, log, out_of_time,
                  kv_splits=(4,)):
  from dualpath_jax.model import cost, weights
  from dualpath_jax.model.prefill import (embed_tokens_jit, last_token_logits_jit, prefill_jit,
                                          prefill_layer, prefill_layer_jit)

  key = jax.random.key(seed + context)
  kv_shape = (1, context, 2, config.num_kv_heads, config.head_dim)
  prefix = [_normal(jax.random.fold_in(key, layer), kv_shape, config.jnp_dtype)
            for layer in range(config.num_layers)]
  prefix_len = jnp.array([context], jnp.int32)
  flops = cost.prefill_flops(config, context, append_tokens, last_token_logits_only=True)

  def layerwise(layer_fn, run_model=model):
    x = embed_tokens_jit(run_model, tokens)
    for index, layer in enumerate(run_model.layers):
      x, _ = layer_fn(layer, x, prefix[index], prefix_len, new_len)
    return last_token_logits_jit(run_model, x, new_len)

  def einsum_first_layer():
    x0 = embed_tokens_jit(model, tokens)
    return x0, prefill_layer_jit(model.layers[0], x0, prefix[0], prefix_len, new_len)[0]

  runs = [(v, k) for v in variants for k in (kv_splits if v == "layerwise_split" else (None,))]
  rows = []
  for variant, splits in runs:
    if out_of_time():
      rows.append(dict(context=context, variant=variant, skipped="time budget"))
      continue
    row = dict(context=context, append=append_tokens, variant=variant, flops=flops)
    stack = contextlib.ExitStack()
    try:
      if variant == "layerwise":
        fn = functools.partial(layerwise, prefill_layer_jit)
      elif variant == "layerwise_split":
        implementation = "cudnn" if sdpa_implementation == "cudnn" else "einsum"
        split_model = weights.with_config(model, config.replace(
            attention=implementation, prefill_kv_splits=int(splits)))
        row.update(implementation=implementation, prefill_kv_splits=int(splits))
        x0, reference = einsum_first_layer()
        t0 = time.perf_counter()
        row["first_layer_rel_err_vs_einsum"] = _rel_err(
            prefill_layer_jit(split_model.layers[0], x0, prefix[0], prefix_len, new_len)[0],
            reference)
        row["check_call_s"] = time.perf_counter() - t0  # compiles the split layer
        del reference
        fn = functools.partial(layerwise, prefill_layer_jit, split_model)
      elif variant == "layerwise_sdpa":
        if not sdpa_implementation:
          continue
        # Reference first, outside the swap: the model's own jitted layer (einsum attention).
        x0, reference = einsum_first_layer()
        # A fresh jit of a fresh function (no trace cache shared with prefill_layer_jit): the
        # swap only takes effect while tracing, and must never reach the model's own jit.
        layer_fn = jax.jit(lambda *args: prefill_layer(*args))
        swapped = sdpa_attention(sdpa_implementation)
        stack.enter_context(swapped_attention(swapped))
        fn = functools.partial(layerwise, layer_fn)
        row["implementation"] = sdpa_implementation
        t0 = time.perf_counter()
        row["first_layer_rel_err_vs_einsum"] = _rel_err(
            layer_fn(model.layers[0], x0, prefix[0], prefix_len, new_len)[0], reference)
        row["check_call_s"] = time.perf_counter() - t0  # compiles the swapped layer
        row["sdpa_traced"] = swapped.traces > 0
        del reference
      else:
        stacked = jnp.stack(prefix)  # [L, 1, C, 2, H, D]
        stack.callback(stacked.delete)
        fn = functools.partial(lambda s: prefill_jit(model, tokens, s, prefix_len, new_len,
                                                     all_logits=False)[0], stacked)
      with stack:
        t0 = time.perf_counter()
        logits = jax.block_until_ready(fn())
        row["first_call_s"] = time.perf_counter() - t0
        row["logits_finite"] = bool(jnp.all(jnp.isfinite(logits)))
        s, times = median_seconds(fn, repeats, max(warmup - 1, 0))
      row.update(median_s=s, min_s=min(times), tflops_per_s=flops / s / 1e12)
      if card.peak_flops:
        row.update(mfu=flops / s / card.peak_flops, met=bool(flops / s / card.peak_flops >= target))
      log(f"engine: prefill {variant:14s}" + (f" k={splits}" if splits else "")
          + f" ctx {context:6d} +{append_tokens}: {s * 1e3:8.2f} ms "
          f"{flops / s / 1e12:7.1f} TFLOP/s"
          + (f" MFU {row['mfu']:.3f}" if "mfu" in row else "")
          + f" (first call {row['first_call_s']:.1f} s)")
    except Exception as e:  # noqa: BLE001  (e.g. cuDNN refusing a shape: report, go on)
      row["error"] = repr(e)
      log(f"engine: prefill {variant} ctx {context} FAILED: {e!r}")
    finally:
      stack.close()
    rows.append(row)
  for p in prefix:
    p.delete()
  return rows


class DecodeInputs:
  """A decode step's inputs on the device: a random pool whose `batch` rows hold `context`
  tokens each in their own pages (one page of room past the context), `spare_pages` more pages
  no row uses, the rows' block tables, lengths and tokens. `pool` is replaced by each step (it is
  donated)."""

  def __init__(self, config, batch: int, context: int, page_tokens: int, seed: int,
               spare_pages: int = 0):
    from dualpath_jax.model.paged import PagedPool
    self.pages_per_seq = context // page_tokens + 1  # room for the new token's slot
    num_pages = 1 + batch * self.pages_per_seq
    self.spare_page_ids = np.arange(num_pages, num_pages + spare_pages, dtype=np.int32)
    """Pages no row uses (e.g. for an admission's page write: bench/decode_interference.py)."""
    num_pages += spare_pages
    shape = (config.num_kv_heads, num_pages, page_tokens, config.head_dim)
    key = jax.random.key(seed + 7919 * batch)
    # Array by array (the pool's own layout): no pool-sized temporaries.
    self.pool = PagedPool(
        k=tuple(_normal(jax.random.fold_in(key, 2 * layer), shape, config.jnp_dtype)
                for layer in range(config.num_layers)),
        v=tuple(_normal(jax.random.fold_in(key, 2 * layer + 1), shape, config.jnp_dtype)
                for layer in range(config.num_layers)))
    self.block_tables = (1 + jnp.arange(batch * self.pages_per_seq, dtype=jnp.int32)).reshape(
        batch, self.pages_per_seq)
    self.seq_lens = jnp.full((batch,), context, jnp.int32)
    self.tokens = jax.random.randint(jax.random.fold_in(key, 1 << 20), (batch,), 0,
                                     config.vocab_size, jnp.int32)
    # The lengths grow a token a step into the free slots of each row's last page.
    self.room = self.pages_per_seq * page_tokens - context

  def de_loop(self, model, count: int, *, in_flight: int = 1,
              before_dispatch: Callable[[], None] = lambda: None,
              after_collect: Callable[[], None] = lambda: None,
              timings: list | None = None) -> None:
    """`count` steps of the DE's loop: each step's tokens and seq_lens are the last step's
    outputs on the device, and a step's tokens are read once `in_flight` more steps are
    dispatched (the runtime's decode_steps_in_flight; 1 as the runtime up to 2026-11-29).
    Every `room` steps the lengths start again from the context (the device array placed at
    construction, no host copy). Returns once the last step's tokens are on the host.
    before_dispatch / after_collect run before each step is dispatched and after its tokens are
    read (bench/decode_interference.py: the TrafficManager's model_step, the step periods).
    timings: if given, gets (period, dispatch, wait) host seconds for every read made right
    after a dispatch, from the second such read on: the wall since the previous read, the
    dispatch call before it, the read itself (scripts/bench_decode_host.py)."""
    import collections

    from dualpath_jax.model.paged import greedy_decode_step_jit
    clock = time.perf_counter
    next_tokens, lens, pending, last = self.tokens, self.seq_lens, collections.deque(), None
    for i in range(count):
      if i % self.room == 0:
        lens = self.seq_lens
      before_dispatch()
      t0 = clock()
      next_tokens, lens, self.pool = greedy_decode_step_jit(
          model, self.pool, next_tokens, self.block_tables, lens)
      dispatch = clock() - t0
      pending.append(next_tokens)
      if len(pending) > in_flight:
        t1 = clock()
        np.asarray(pending.popleft())
        end = clock()
        after_collect()
        if timings is not None and last is not None:
          timings.append((end - last, dispatch, end - t1))
        last = end
    while pending:
      np.asarray(pending.popleft())
      after_collect()

  def delete(self) -> None:
    for array in jax.tree_util.tree_leaves(self.pool):
      array.delete()


def _decode_row(model, config, batch, context, page_tokens, steps, warmup, weights_bytes, card,
                target, seed, log):
  from dualpath_jax.model import cost
  from dualpath_jax.model.paged import decode_step_jit, pallas_blocking

  inputs = DecodeInputs(config, batch, context, page_tokens, seed)
  pages_per_seq = inputs.pages_per_seq

  def step():
    logits, inputs.pool = decode_step_jit(model, inputs.pool, inputs.tokens, inputs.block_tables,
                                          inputs.seq_lens)
    return logits

  t0 = time.perf_counter()
  jax.block_until_ready(step())
  first_call_s = time.perf_counter() - t0
  step_s, times = median_seconds(step, steps, max(warmup - 1, 0))
  t0 = time.perf_counter()
  for _ in range(steps):
    logits = step()
  jax.block_until_ready(logits)
  pipelined_s = (time.perf_counter() - t0) / steps

  # The DE's loop (DecodeInputs.de_loop).
  inputs.de_loop(model, max(warmup, 1))  # compiles the greedy step
  t0 = time.perf_counter()
  inputs.de_loop(model, steps)
  overlapped_s = (time.perf_counter() - t0) / steps
  embed_bytes = config.vocab_size * config.hidden_size * config.itemsize
  kv_bytes = batch * context * cost.kv_bytes_per_token(config)
  read_bytes = weights_bytes - embed_bytes + kv_bytes
  row = dict(batch=batch, context=context, first_call_s=first_call_s, step_s=step_s,
             min_step_s=min(times), pipelined_step_s=pipelined_s,
             overlapped_step_s=overlapped_s, bytes_read=read_bytes,
             weight_bytes_read=weights_bytes - embed_bytes, kv_bytes_read=kv_bytes,
             pool_bytes=inputs.pool.nbytes, tokens_per_s=batch / step_s,
             logits_finite=bool(jnp.all(jnp.isfinite(logits))))
  blocking = ""
  if model.config.paged_attention == "pallas":
    k_splits, per_block, padded = pallas_blocking(
        pages_per_seq, page_tokens, max_k_splits=model.config.pallas_k_splits,
        block_tokens=model.config.pallas_block_tokens)
    row["pallas_blocking"] = dict(k_splits=k_splits, pages_per_compute_block=per_block,
                                  padded_pages=padded)
    blocking = (f" [{model.config.pallas_kernel} kernel, {k_splits} splits x "
                f"{padded // k_splits} pages, {per_block} a block]")
  if card.hbm_bytes_per_s:
    roofline_s = read_bytes / card.hbm_bytes_per_s
    row.update(roofline_s=roofline_s, roofline_fraction=roofline_s / step_s,
               pipelined_roofline_fraction=roofline_s / pipelined_s,
               overlapped_roofline_fraction=roofline_s / overlapped_s,
               met=bool(roofline_s / step_s >= target),
               overlapped_met=bool(roofline_s / overlapped_s >= target))
  log(f"engine: decode {model.config.paged_attention:6s} batch {batch:3d} ctx {context}"
      f"{blocking}: "
      f"{step_s * 1e3:8.3f} ms/step "
      f"(pipelined {pipelined_s * 1e3:.3f}, overlapped {overlapped_s * 1e3:.3f})"
      + (f" roofline {row['roofline_s'] * 1e3:.3f} ms -> {row['roofline_fraction']:.3f}"
         if "roofline_s" in row else "") + f" (first call {first_call_s:.1f} s)")
  inputs.delete()
  return row


def _peak_memory(model, device, config, tokens, new_len, context, block_tokens, weights_bytes,
                 seed, log) -> dict:
  from dualpath_jax.kvstore.layout import KVLayout
  from dualpath_jax.model.prefill import (embed_tokens_jit, last_token_logits_jit,
                                          prefill_layer_jit)
  from dualpath_jax.runtime.prefill_shard import LAYERS_IN_FLIGHT
  from dualpath_jax.transfer import host_to_device

  layout = KVLayout.for_model(config, block_tokens)
  num_blocks = layout.num_full_blocks(context)
  context = num_blocks * block_tokens
  blocks = hardware.random_normal_bits(num_blocks * layout.full_block_bytes, layout.dtype,
                                       seed).reshape(num_blocks, *layout.full_block_shape)
  append = tokens.shape[1]
  prefix_len = jnp.array([context], jnp.int32)
  dst = jax.sharding.SingleDeviceSharding(device)
  # Compile first, from shapes only, so that compilation (autotuning scratch) is not in the run.
  x_spec = jax.ShapeDtypeStruct((1, append, config.hidden_size), config.jnp_dtype)
  kv_spec = jax.ShapeDtypeStruct((1, context, 2, config.num_kv_heads, config.head_dim),
                                 config.jnp_dtype)
  t0 = time.perf_counter()
  prefill_layer_jit.lower(model.layers[0], x_spec, kv_spec, prefix_len, new_len).compile()
  compile_s = time.perf_counter() - t0

  def run():
    x = embed_tokens_jit(model, tokens)
    current = host_to_device(layout.layer_kv(blocks, 0), dst, copy=False)
    sending = []  # layers the PE's sender thread still holds for their D2H
    for index, layer in enumerate(model.layers):
      following = (host_to_device(layout.layer_kv(blocks, index + 1), dst, copy=False)
                   if index + 1 < config.num_layers else None)
      x, _ = prefill_layer_jit(layer, x, current[None], prefix_len, new_len)
      sending.append(current)
      while len(sending) > LAYERS_IN_FLIGHT - 2:  # its send done: the PE frees the layer
        sending.pop(0).delete()
      current = following
    for held in sending:
      held.delete()
    return last_token_logits_jit(model, x, new_len)

  before = _stats(device)
  t0 = time.perf_counter()
  logits = jax.block_until_ready(run())
  run_s = time.perf_counter() - t0
  after = _stats(device)
  kv_layer_bytes = context * layout.token_layer_bytes
  activations = activation_bytes(config, append, context)
  bound = weights_bytes + LAYERS_IN_FLIGHT * kv_layer_bytes + activations["total"]
  out = dict(context=context, append=append, host_bytes=int(blocks.nbytes),
             weights_bytes=weights_bytes, kv_layer_bytes=kv_layer_bytes,
             activation_bytes=activations, bound_bytes=bound, compile_s=compile_s,
             streamed_prefill_s=run_s, logits_finite=bool(jnp.all(jnp.isfinite(logits))),
             layers_in_flight=LAYERS_IN_FLIGHT,
             bound_formula=f"weights + {LAYERS_IN_FLIGHT} layers of prefix KV (LAYERS_IN_FLIGHT) "
                           "+ one layer's activations (activation_bytes: einsum attention "
                           "estimate)")
  if before and after and "peak_bytes_in_use" in after:
    extra_peak = after["peak_bytes_in_use"] - before["bytes_in_use"]
    exact = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0)
    measured = weights_bytes + extra_peak
    out.update(memory_stats_before={k: before.get(k) for k in ("bytes_in_use",
                                                               "peak_bytes_in_use")},
               memory_stats_after={k: after.get(k) for k in ("bytes_in_use",
                                                             "peak_bytes_in_use")},
               peak_bytes=measured, exact=bool(exact),
               peak_over_bound=measured / bound, met=bool(measured <= bound),
               note=("peak_bytes = weights + (peak_bytes_in_use after the run - bytes_in_use "
                     "before it); exact when the device's peak rose during the run, else an "
                     "upper bound"))
    log(f"engine: peak memory, {context}-token streamed layerwise prefill: "
        f"{measured / 2**30:.2f} GiB vs bound {bound / 2**30:.2f} GiB "
        f"({'exact' if exact else 'upper bound'}), run {run_s:.2f} s")
  else:
    out.update(peak_bytes=None, note="device.memory_stats() has no peak_bytes_in_use here")
    log(f"engine: peak memory unavailable on {device}; bound {bound / 2**30:.3f} GiB, "
        f"run {run_s:.2f} s")
  return out
