"""runtime/offline.prefill_shapes: the PE batch shapes a run precompiles before its clock starts."""

import numpy as np


def test_prefill_shapes_cover_the_timed_turns_batches():
  from dualpath_jax.runtime.offline import prefill_shapes
  from dualpath_jax.workload.synthetic import AgentTrajectory, Turn

  def turn(append, gen):
    return Turn(append_ids=np.zeros(append, np.int32), gen_tokens=gen)

  # Turn 1: context 1000 + 150 generated, 1149 with KV -> hit 1088 (17 blocks of 64); prompt
  # 1150 + 100 = 1250: tp pow2(1088) = 2048 (and pow2(1249) = 2048), new 162 -> tn 256.
  agent = AgentTrajectory(agent_id="a", turns=(turn(1000, 150), turn(100, 10)))
  assert prefill_shapes([agent], first_turn=1, block_tokens=64, max_batch_requests=3) == [
      (1, 2048, 256), (2, 2048, 256), (4, 2048, 256)]
  # First turns have no hit: nothing to precompile.
  assert prefill_shapes([agent], first_turn=0, block_tokens=64, max_batch_requests=1) == [
      (1, 2048, 256)]
  assert prefill_shapes([AgentTrajectory(agent_id="b", turns=(turn(500, 5),))], first_turn=0,
                        block_tokens=64, max_batch_requests=4) == []


def test_persisted_block_counts_follow_the_decode_workers_arithmetic():
  from dualpath_jax.runtime.offline import persisted_block_counts
  from dualpath_jax.workload.synthetic import AgentTrajectory, Turn

  def turn(append, gen):
    return Turn(append_ids=np.zeros(append, np.int32), gen_tokens=gen)

  # Turn 0: prompt 1000 + 150 generated: 1149 tokens with KV, 17 blocks of 64, no hit -> 32.
  # Turn 1: prompt 1250 (hit 1088: 17 blocks) + 10 generated: 1259 with KV, 19 blocks, 2 new;
  # turn 2: prompt 1260 + 300 = 1560 (hit 1216: 19 blocks) + 5: 1564, 24 blocks, 5 new -> 8.
  agent = AgentTrajectory(agent_id="a", turns=(turn(1000, 150), turn(100, 10), turn(300, 5)))
  assert persisted_block_counts([agent], first_turn=1, block_tokens=64) == [2, 8]
  assert persisted_block_counts([agent], first_turn=0, block_tokens=64) == [2, 8, 32]
  # a turn that completes no new block persists nothing
  short = AgentTrajectory(agent_id="b", turns=(turn(10, 2),))
  assert persisted_block_counts([short], first_turn=0, block_tokens=64) == []


def test_precompiled_shapes_cover_every_hit_batch_of_a_run(tmp_path, monkeypatch):
  """Every PE batch with a hit in a timed run has a shape prefill_shapes listed (so nothing of
  the forward compiles on the clock), under both batchings: basic's token budget and
  dualpath's compute quota."""
  import os

  from dualpath_jax.config_files import load_config
  from dualpath_jax.model.prefill import pow2_at_least
  from dualpath_jax.runtime.offline import prefill_shapes
  from dualpath_jax.runtime.offline_job import OfflineJob
  from dualpath_jax.runtime.prefill_shard import PrefillShard

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(root, "configs", "offline.py"),
                       "smoke,agents=4,turns=3,first_append_tokens=200,append_tokens=40")
  config.unlock()
  config.modes = ("basic", "dualpath")
  config.warmup = False
  config.check_reference = False
  config.primed_turns = 1
  config.store.driver = "memory"
  job = OfflineJob.from_config(config, str(tmp_path))
  seen, precompiled = set(), []
  run_batch, precompile = PrefillShard.run_batch, PrefillShard.precompile

  def recording_run_batch(self, chunks):
    if all(cached for _, cached, _ in chunks):
      bt = self.cluster.layout.block_tokens
      seen.add((pow2_at_least(len(chunks)), pow2_at_least(max(c for _, c, _ in chunks), bt),
                pow2_at_least(max(n for _, _, n in chunks), bt)))
    return run_batch(self, chunks)

  def recording_precompile(self, shapes):
    precompiled.append(list(shapes))
    return precompile(self, shapes)

  monkeypatch.setattr(PrefillShard, "run_batch", recording_run_batch)
  monkeypatch.setattr(PrefillShard, "precompile", recording_precompile)
  summary = job.run()
  expected = prefill_shapes(job.trajectories, first_turn=1, block_tokens=64,
                            max_batch_requests=job.runtimes[0].max_batch_requests)
  assert expected and all(shapes == expected for shapes in precompiled)
  # once per PE and timed run: 2 PEs (smoke is 2P2D) x 2 modes
  assert len(precompiled) == 2 * job.runtimes[0].topology.num_prefill_engines
  assert seen and seen <= set(expected), sorted(seen - set(expected))
  assert all(run["precompiled"]["shapes"] == [list(s) for s in expected]
             and run["precompiled"]["skipped"] == [] for run in summary["runs"])


def test_a_batch_outside_the_compiled_shapes_runs_in_the_smallest_that_holds_it():
  """A chunked prefill's remainder (few new tokens) runs padded in a compiled shape of the same
  prefix bucket instead of compiling on the clock; with no such shape it compiles its own."""
  from types import SimpleNamespace

  from dualpath_jax.runtime.prefill_shard import PrefillShard

  shard = PrefillShard.__new__(PrefillShard)  # batch_shape needs only the layout and the sets
  shard.cluster = SimpleNamespace(layout=SimpleNamespace(block_tokens=64))
  shard.compiled_shapes = {(1, 2048, 512), (2, 2048, 512), (4, 2048, 1024), (1, 4096, 256)}
  shard.rounded_batches = 0
  request = object()
  assert shard.batch_shape([(request, 1500, 400)]) == (1, 2048, 512)  # its own, compiled
  assert shard.rounded_batches == 0
  assert shard.batch_shape([(request, 1500, 100)]) == (1, 2048, 512)  # tn 128 -> 512
  assert shard.batch_shape([(request, 1500, 100)] * 3) == (4, 2048, 1024)  # rows 4, tn 128
  assert shard.rounded_batches == 2
  # Never a longer prefix: (1, 4096, 256) is too small and nothing else has tp 4096.
  assert shard.batch_shape([(request, 3000, 600)]) == (1, 4096, 1024)
  assert (1, 4096, 1024) in shard.compiled_shapes  # compiled by this batch, a holder from now on
  assert shard.batch_shape([(request, 3000, 300)]) == (1, 4096, 1024)
  assert shard.batch_shape([(request, 0, 100)]) == (1, 0, 128)  # no prefix stays no prefix
  assert shard.rounded_batches == 3


def test_chunked_prefills_run_in_rounded_shapes_and_still_match_the_reference(tmp_path):
  """A compute quota far below one request's prefill splits requests into chunks whose shapes
  the precompile did not list; they run in larger compiled shapes (padding masked) and every
  generated token still equals the no-cache recompute's."""
  import os

  from dualpath_jax.config_files import load_config
  from dualpath_jax.runtime.offline_job import OfflineJob

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(root, "configs", "offline.py"),
                       "smoke,agents=3,turns=3,first_append_tokens=200,append_tokens=100")
  config.unlock()
  config.modes = ("dualpath",)
  config.warmup = False
  config.check_reference = True
  config.primed_turns = 1
  config.store.driver = "memory"
  config.runtime.compute_quota_s = 1e-4
  (run,) = OfflineJob.from_config(config, str(tmp_path)).run()["runs"]
  assert run["chunked_turns"] > 0 and run["rounded_prefill_batches"] > 0
  assert run["outputs_match_reference"] is True
