"""Writes a random-init checkpoint of a model preset with orbax-checkpoint.

  python scripts/init_checkpoint.py --preset=small --out=checkpoints/small-random
  python scripts/init_checkpoint.py --preset=tiny --dtype=float32 --seed=1 --out=/tmp/tiny
"""

from absl import app, flags

from dualpath_jax.model import config as model_config
from dualpath_jax.model import weights

_PRESET = flags.DEFINE_enum("preset", "small", sorted(model_config.PRESETS), "Model preset.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"],
                           "Override the preset's dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation seed.")
_OUT = flags.DEFINE_string("out", None, "Checkpoint folder to write.", required=True)
_FORCE = flags.DEFINE_bool("force", False, "Overwrite an existing checkpoint folder.")


def main(argv):
  del argv
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  config = model_config.get_preset(_PRESET.value, **overrides)
  model = weights.init_random(config, seed=_SEED.value)
  weights.save_weights(_OUT.value, model, force=_FORCE.value)
  print(f"wrote {config.name} ({config.dtype}, seed {_SEED.value}) to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
