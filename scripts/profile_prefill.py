r"""Profiles a PE's forward time on this device kind and writes the batch selector's cost model.

  python scripts/profile_prefill.py --preset=tiny --dtype=float32          # CPU, ~1 min
  python scripts/profile_prefill.py --platform=default --preset=qwen2.5-7b --dtype=bfloat16 \
      --attention=cudnn --kv_splits=4 --cached=0,4096,16384,32768 --new=128,512,2048 \
      --batches=1,2 --reps=3                                               # one GPU

Writes configs/cost_models/<device>-<preset>-<dtype>.json (or --out): the fitted coefficients,
the fit's error on the samples (mean and max relative error) and every timed sample. Random
weights: the time of a forward does not depend on their values. The offline and online jobs load
this file for their device kind, model and dtype (runtime.cost_model='' means exactly this path).
"""

import datetime
import os
import sys

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Model dtype.")
_ATTENTION = flags.DEFINE_enum("attention", "einsum", ["einsum", "xla", "cudnn"],
                               "Attention implementation (ModelConfig.attention).")
_KV_SPLITS = flags.DEFINE_integer("kv_splits", 0, "ModelConfig.prefill_kv_splits (0: one "
                                  "attention call; the GPU end-to-end preset's is 4).")
_CACHED = flags.DEFINE_list("cached", ["0", "256", "1024"], "Cached (prefix) lengths to time.")
_NEW = flags.DEFINE_list("new", ["64", "256", "512"], "New-token counts to time.")
_BATCHES = flags.DEFINE_list("batches", ["1", "2", "4"], "Rows per forward to time.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per shape (median).")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "default"],
                              "'cpu' forces the CPU backend; 'default' takes jax's.")
_OUT = flags.DEFINE_string("out", "", "Output JSON ('' = the default path for this device).")


def main(argv):
  del argv
  if _PLATFORM.value == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: E402  (after the platform choice)
  jax.config.update("jax_default_matmul_precision", "highest")
  from dualpath_jax.kvstore.layout import KVLayout  # noqa: E402
  from dualpath_jax.model import config as model_config  # noqa: E402
  from dualpath_jax.model import weights  # noqa: E402
  from dualpath_jax.runtime import cost_profile  # noqa: E402

  try:
    config = model_config.get_preset(_PRESET.value, dtype=_DTYPE.value,
                                     attention=_ATTENTION.value,
                                     prefill_kv_splits=_KV_SPLITS.value)
  except (TypeError, ValueError) as e:
    sys.exit(f"error: --preset/--dtype/--attention/--kv_splits: {e}")
  device = jax.devices()[0]
  model = jax.device_put(weights.init_random(config, seed=0), device)
  layout = KVLayout.for_model(config)
  cost, error, rows = cost_profile.profile(
      model, device, cached=[int(c) for c in _CACHED.value], new=[int(n) for n in _NEW.value],
      batches=[int(b) for b in _BATCHES.value], block_tokens=layout.block_tokens,
      reps=_REPS.value, progress=lambda line: print(line, file=sys.stderr, flush=True))
  path = _OUT.value or cost_profile.default_path(config.name, config.dtype, device)
  about = dict(device_kind=device.device_kind, platform=device.platform, preset=config.name,
               dtype=config.dtype, attention=config.attention,
               prefill_kv_splits=config.prefill_kv_splits, jax=jax.__version__,
               date=datetime.date.today().isoformat(),
               command="python " + " ".join(sys.argv),
               what=("median wall time of one PE forward (embedding, every layer's prefill_layer "
                     "over a zero prefix, last-token logits), no KV movement, random weights"))
  cost_profile.save(path, cost, error, rows, about)
  print(f"wrote {path}: {cost.to_dict()}; fit error mean "
        f"{error['mean_abs_rel_error']:.1%}, max {error['max_abs_rel_error']:.1%}")


if __name__ == "__main__":
  app.run(main)
