"""Primed turns (run untimed before the clock starts), the cheaper warm-up pass, and the decode
step-time inflation metric that the GPU benchmark's end-to-end jobs report."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualpath_jax.runtime.cluster import ADMIT_BUCKETS_PER_OCTAVE, admit_tokens
from dualpath_jax.runtime.metrics import decode_inflation
from dualpath_jax.runtime.offline_job import OfflineJob
from test_offline_job import small


def _config(**top):
  config = small("smoke", modes=("dualpath", "oracle"))
  config.workload.turns = 3
  config.check_reference = True
  for key, value in top.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def primed(tmp_path_factory):
  job = OfflineJob.from_config(_config(primed_turns=1), str(tmp_path_factory.mktemp("primed")))
  return job, job.run()


def test_primed_turns_are_left_out_of_the_timed_run(primed):
  job, summary = primed
  agents = len(job.trajectories)
  assert summary["primed_turns"] == 1
  for run in summary["runs"]:
    assert run["turns"] == agents * 2  # turns 1 and 2 of every agent
    # The primed turn stored each agent's KV in the run's own namespaces: every timed turn hits.
    assert run["tokens_hit"] > 0
  dualpath = summary["runs"][0]
  assert dualpath["outputs_match_reference"] is True  # primed turns included in the comparison
  # Reads happen only for timed turns here (turn 0 has nothing to read), and every read record
  # lies inside the timed run.
  assert dualpath["bytes"]["store_read_pe_side"] + dualpath["bytes"]["store_read_de_side"] > 0


def test_primed_turns_records_start_after_the_clock(primed):
  job, summary = primed
  import json
  import os
  with open(os.path.join(job.workdir, "turns.jsonl")) as f:
    turns = [json.loads(line) for line in f]
  assert {t["turn"] for t in turns} == {1, 2}
  assert all(t["hit_tokens"] > 0 for t in turns)
  assert all(v >= 0 for t in turns for v in t["times_s"].values())
  with open(os.path.join(job.workdir, "links.json")) as f:
    links = json.load(f)
  for run in links["runs"]:
    for node in run["nodes"].values():
      assert all(t0 >= 0 for t0, _, _ in node["reads"] + node["writes"])


def test_engine_stage_times_cover_the_timed_forwards(primed):
  _, summary = primed
  for run in summary["runs"]:
    pe, de = run["engine_time_s"]["prefill"], run["engine_time_s"]["decode"]
    assert set(pe["total"]) >= {"compute", "logits"} and pe["total"]["compute"] > 0
    assert de["total"]["step"] > 0 and de["total"]["admit"] >= 0
    # Stages are disjoint slices of a PE thread's forwards: their sum is at most the run's
    # length per PE (primed turns excluded).
    for stages in pe["per_engine"].values():
      assert sum(stages.values()) <= run["jct_s"] + 1e-6
    if run["mode"] == "oracle":
      # the oracle reads, moves and sends no KV: its prefix is zeros on the PE
      assert not {"send", "gather", "h2d", "de_path"} & set(pe["total"])
    else:
      # reads land layer-major in 'begin' (one copy), so loading gathers nothing on the host
      assert pe["total"]["begin"] > 0 and pe["total"]["send"] > 0
      assert "gather" not in pe["total"]
      assert pe["total"].get("h2d", 0) + pe["total"].get("de_path", 0) > 0


def test_decode_inflation_is_reported_per_run(primed):
  _, summary = primed
  for run in summary["runs"]:
    d = run["decode_inflation"]
    assert d["steps"] > 0 and d["steps_with_kv"] <= d["steps"]
    assert set(d["inflation_by_path"]) == {"h2d", "d2h", "d2d"}


def test_warmup_pass_takes_the_first_agents_and_turns(tmp_path):
  job = OfflineJob.from_config(_config(warmup_agents=2, warmup_turns=1), str(tmp_path))
  warm = job.warmup_trajectories()
  assert [t.agent_id for t in warm] == [t.agent_id for t in job.trajectories[:2]]
  assert all(len(t.turns) == 1 for t in warm)
  assert len(OfflineJob.from_config(_config(), str(tmp_path)).warmup_trajectories()) == \
      len(job.trajectories)


@pytest.mark.parametrize("key, value", [("primed_turns", -1), ("warmup_agents", 1.5),
                                        ("warmup_turns", True)])
def test_bad_counts_are_reported_by_name(tmp_path, key, value):
  config = dict(_config().to_dict(), **{key: value})  # a plain dict: no ConfigDict type check
  with pytest.raises(ValueError, match=key):
    OfflineJob.from_config(config, str(tmp_path))


def test_decode_inflation_compares_steps_of_the_same_de_and_batch():
  steps = {"de0": [(0.0, 0.010, 4), (0.1, 0.112, 4), (0.2, 0.210, 4), (0.3, 0.330, 2),
                   (0.4, 0.415, 2)],
           "de1": [(0.0, 0.020, 4)]}
  moves = [(0.105, 0.106, "d2d", "pe0", "de0"),  # inside de0's second step
           (0.305, 0.31, "h2d", "host", "pe0"),  # touches no DE: ignored
           (0.0, 0.05, "h2d", "host", "de1")]  # de1 has no clean step to compare with
  result = decode_inflation(steps, moves)
  assert result["steps"] == 6 and result["steps_with_kv"] == 2
  assert result["compared_steps_with_kv"] == 1 and result["compared_steps_without"] == 2
  assert result["inflation"] == pytest.approx(0.012 / 0.010 - 1)
  assert result["inflation_by_path"]["d2d"] == pytest.approx(0.2)
  assert result["inflation_by_path"]["h2d"] is None
  assert decode_inflation({"de0": []}, [])["inflation"] is None


def test_a_run_leaves_no_model_copy_or_page_pool_alive(tmp_path):
  """Workers, shards and the cluster refer to each other; close() drops their device arrays so
  that a job's next run does not stack new copies on top (cycle collection switched off here,
  as it may not run in time on a GPU)."""
  import gc

  import jax
  job = OfflineJob.from_config(small("smoke", modes=("dualpath",)), str(tmp_path))
  pool_shape = None
  gc.disable()
  try:
    job.run()
    runtime = job.runtimes[0]
    max_pages = -(-runtime.max_context_tokens // 64)
    pool_shape = (job.model_config.num_kv_heads, runtime.decode_batch_size * max_pages + 1, 64,
                  job.model_config.head_dim)
    alive = [a.shape for a in jax.live_arrays()]
  finally:
    gc.enable()
  assert pool_shape not in alive
  embed = (job.model_config.vocab_size, job.model_config.hidden_size)
  # At most the job's own model (the trained checkpoint may stay cached); no engine's copy.
  assert alive.count(embed) <= 1


@given(tokens=st.integers(1, 1 << 20), block=st.sampled_from([16, 64]))
def test_admitted_prompt_rows_are_whole_pages_with_at_most_an_eighth_more(tokens, block):
  rows = admit_tokens(tokens, block)
  pages = -(-tokens // block)
  assert rows % block == 0 and rows >= tokens and rows // block <= pages * 9 // 8 + 1


def test_admitted_prompt_sizes_are_few_per_power_of_two():
  for octave in range(1, 12):
    sizes = {admit_tokens(p * 64, 64) for p in range(2 ** (octave - 1) + 1, 2 ** octave + 1)}
    assert len(sizes) <= ADMIT_BUCKETS_PER_OCTAVE


@given(steps=st.lists(st.tuples(st.floats(0, 10), st.floats(0.001, 1)), min_size=1, max_size=20),
       moves=st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1)), max_size=20))
def test_decode_inflation_counts_a_step_with_kv_iff_a_move_overlaps_it(steps, moves):
  records = {"de0": [(t0, t0 + d, 1) for t0, d in steps]}
  kv = [(m0, m0 + d, "d2d", "pe0", "de0") for m0, d in moves]
  expected = sum(any(m0 < t1 and m1 > t0 for m0, m1, *_ in kv) for t0, t1, _ in records["de0"])
  assert decode_inflation(records, kv)["steps_with_kv"] == expected


def test_decode_inflation_splits_the_excess_by_the_step_parts():
  """Records with parts (decode_worker.StepRecord): the steps with KV are 4 ms longer, 3 ms of
  it in the dispatch call and 1 ms nowhere named ('other')."""
  from dualpath_jax.runtime.decode_worker import StepRecord
  clean = [StepRecord(t, t + 0.010, 4, dispatch_s=0.002, wait_s=0.007, admit_s=0.0)
           for t in (0.0, 0.1, 0.2)]
  loaded = [StepRecord(t, t + 0.014, 4, dispatch_s=0.005, wait_s=0.007, admit_s=0.0)
            for t in (0.3, 0.4)]
  moves = [(0.305, 0.306, "h2d", "host", "de0"), (0.405, 0.406, "d2d", "de0", "pe0")]
  result = decode_inflation({"de0": clean + loaded}, moves)
  assert result["inflation"] == pytest.approx(0.4)
  excess = result["excess_s_by_part"]
  assert excess["period"] == pytest.approx(0.004) and excess["dispatch_s"] == pytest.approx(0.003)
  assert excess["wait_s"] == pytest.approx(0.0) and excess["admit_s"] == pytest.approx(0.0)
  assert excess["other"] == pytest.approx(0.001)
  assert result["median_part_s"]["with_kv"]["dispatch_s"] == pytest.approx(0.005)
  assert result["median_part_s"]["without"]["wait_s"] == pytest.approx(0.007)
  # Plain (start, end, active) records carry no parts.
  plain = decode_inflation({"de0": [tuple(r[:3]) for r in clean + loaded]}, moves)
  assert plain["excess_s_by_part"] is None and plain["median_part_s"] is None
  assert plain["inflation"] == pytest.approx(0.4)
