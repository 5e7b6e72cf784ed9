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
