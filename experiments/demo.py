r"""Short demo of the KV store loop: agents run turns, each turn's KV is persisted and read back.

A few agents each run a few turns. Every turn's completed Full Blocks go to a tensorstore store in
`--workdir/store` (zarr3 on the local file system); the agent's next turn finds its prefix there,
reads it back and prefills only the append. The same turns are then run without the store (full
recompute) and the greedy tokens compared. Prints hit rates and bytes moved; writes
`--workdir/summary.json`.

  python experiments/demo.py --workdir=/tmp/dualpath-demo
  python experiments/demo.py --workdir=/tmp/d --preset=tiny --agents=2 --turns=3
"""

import json
import os
import sys
import time

# The embedded default: 8 simulated CPU devices (must be set before jax is imported).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec  # noqa: E402
from dualpath_jax.model import config as model_config  # noqa: E402
from dualpath_jax.model import weights  # noqa: E402
from dualpath_jax.runtime.colocated import ColocatedEngine  # noqa: E402
from dualpath_jax.workload import simple_trajectories  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (the store goes in workdir/store).",
                               required=True)
_PRESET = flags.DEFINE_enum("preset", "small", sorted(model_config.PRESETS), "Model preset.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Orbax checkpoint folder (scripts/init_checkpoint.py); "
                                  "default: random weights from --seed.")
_SEED = flags.DEFINE_integer("seed", 0, "Weight and workload seed.")
_AGENTS = flags.DEFINE_integer("agents", 3, "Agents.")
_TURNS = flags.DEFINE_integer("turns", 4, "Turns per agent.")
_FIRST = flags.DEFINE_integer("first_append_tokens", 300, "Tokens of each agent's first turn.")
_APPEND = flags.DEFINE_integer("append_tokens", 100, "Tokens appended by each later turn.")
_GEN = flags.DEFINE_integer("gen_tokens", 24, "Tokens generated per turn (forced length).")


def main(argv):
  del argv
  config = model_config.get_preset(_PRESET.value, dtype="float32")
  if _CHECKPOINT.value:
    model = weights.restore_weights(_CHECKPOINT.value, config)
  else:
    model = weights.init_random(config, seed=_SEED.value)
  layout = KVLayout.for_model(config)
  store_path = os.path.join(os.path.abspath(_WORKDIR.value), "store")
  store = KVBlockStore.open(StoreSpec(driver="file", path=store_path), layout)
  trajectories = simple_trajectories(
      agents=_AGENTS.value, turns=_TURNS.value, first_append_tokens=_FIRST.value,
      append_tokens=_APPEND.value, gen_tokens=_GEN.value, vocab_size=config.vocab_size,
      seed=_SEED.value)
  context_tokens = _FIRST.value + _TURNS.value * (_APPEND.value + _GEN.value)
  cached = ColocatedEngine(model, store, max_context_tokens=context_tokens)
  reference = ColocatedEngine(model, None, use_cache=False, max_context_tokens=context_tokens)
  print(f"model {config.name} ({config.dtype}), KV {layout.kv_bytes_per_token} B/token, "
        f"Full Block {layout.full_block_bytes / 2**20:.2f} MiB; store {store_path}")

  records, start = [], time.perf_counter()
  trajectory_context: dict[str, list[int]] = {}  # agent -> tokens so far
  total_turns = _AGENTS.value * _TURNS.value
  for t in range(_TURNS.value):  # round by round, as agents would progress together
    for trajectory in trajectories:
      context = trajectory_context[trajectory.agent_id] if t else []
      turn = trajectory.turns[t]
      prompt = list(context) + list(turn.append_ids)
      got = cached.run_turn(trajectory.agent_id, prompt, turn.gen_tokens)
      want = reference.run_turn(trajectory.agent_id, prompt, turn.gen_tokens)
      trajectory_context[trajectory.agent_id] = prompt + got.generated.tolist()
      records.append(dict(agent=trajectory.agent_id, turn=t, prompt_tokens=got.prompt_tokens,
                          hit_tokens=got.hit_tokens, bytes_read=got.bytes_read,
                          bytes_written=got.bytes_written, elapsed_s=round(got.elapsed_s, 4),
                          matches_recompute=bool((got.generated == want.generated).all())))
      r = records[-1]
      print(f"[{len(records)}/{total_turns} {time.perf_counter() - start:6.1f}s] {r['agent']} "
            f"turn {t}: prompt {r['prompt_tokens']:5d}  hit {r['hit_tokens']:5d} "
            f"({r['hit_tokens'] / r['prompt_tokens']:5.1%})  read {r['bytes_read'] / 1e6:7.2f} MB"
            f"  wrote {r['bytes_written'] / 1e6:6.2f} MB  tokens==recompute: "
            f"{r['matches_recompute']}")
      sys.stdout.flush()

  later = [r for r in records if r["turn"] > 0]
  summary = dict(
      preset=config.name, agents=_AGENTS.value, turns=_TURNS.value,
      hit_rate_after_first_turn=sum(r["hit_tokens"] for r in later)
      / max(1, sum(r["prompt_tokens"] for r in later)),
      bytes_read=sum(r["bytes_read"] for r in records),
      bytes_written=sum(r["bytes_written"] for r in records),
      store_stats=store.stats.__dict__,
      outputs_match_recompute=all(r["matches_recompute"] for r in records),
      elapsed_s=time.perf_counter() - start, turns_detail=records)
  with open(os.path.join(_WORKDIR.value, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"hit rate (turns after the first): {summary['hit_rate_after_first_turn']:.1%}; "
        f"read {summary['bytes_read'] / 1e6:.1f} MB, wrote {summary['bytes_written'] / 1e6:.1f} MB;"
        f" every turn's tokens equal the no-cache recompute: {summary['outputs_match_recompute']}")
  store.close()
  if not summary["outputs_match_recompute"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
