"""Online serving (configs/online.py, experiments/online.py): the summary contract of the CLI, every
turn recorded once with TTFT = the sum of its breakdown, seeded Poisson arrivals, think times
honoured, and config errors that name the field. No timing is asserted."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from dualpath_jax.config_files import load_config
from dualpath_jax.engines.topology import TopologyConfig
from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec
from dualpath_jax.model import get_preset, weights
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.metrics import TTFT_SEGMENTS
from dualpath_jax.runtime.online import Slo, arrival_times, run_online, turn_metrics
from dualpath_jax.runtime.online_job import OnlineJob
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.workload import simple_trajectories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COST = CostModel(fixed_s=1e-3, per_token_s=2e-6, per_attention_s=3e-9)
EPS = 1e-5  # records round times to microseconds


def online_config(arg: str):
  return load_config(os.path.join(ROOT, "configs", "online.py"), arg)


# --- the CLI contract --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """experiments/online.py on the smoke config, shrunk: 3 agents x 2 turns, two APS points, no
  warm-up, the store in memory, an SLO loose enough that both points run."""
  workdir = str(tmp_path_factory.mktemp("online"))
  command = [sys.executable, os.path.join(ROOT, "experiments", "online.py"),
             "--config=configs/online.py:smoke,agents=3,turns=2", f"--workdir={workdir}",
             "--config.aps_list=(2.0, 8.0)", "--config.warmup=False",
             "--config.store.driver=memory", "--config.store.path=store",
             "--config.slo.scale=100.0"]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "turns.jsonl")) as f:
    turns = [json.loads(line) for line in f if line.strip()]
  return workdir, summary, turns, result.stdout


def test_cli_writes_the_summary_contract(cli_run):
  workdir, summary, _, stdout = cli_run
  assert [r["mode"] for r in summary["runs"]] == ["basic", "dualpath"]
  for run in summary["runs"]:
    points = run["points"]
    assert points and [p["aps"] for p in points] == sorted(p["aps"] for p in points)
    for p in points:
      for key in ("aps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "ttst_p50_s",
                  "ttst_p99_s", "jct_mean_s", "slo_ok", "stop_reason", "turns", "duration_s",
                  "agents_arrived", "agents_finished"):
        assert key in p, key
      assert set(p["ttft_breakdown_s"]) >= {"queueing", "read", "prefill", "handoff"}
      assert p["ttft_p50_s"] <= p["ttft_p99_s"]
      assert p["stop_reason"] in ("slo_violated", "steady_state", "all_finished", "max_duration")
    # The sweep stops after the first point that breaks the SLO; max_aps_slo is the largest
    # compliant rate.
    assert all(p["slo_ok"] for p in points[:-1])
    compliant = [p["aps"] for p in points if p["slo_ok"]]
    assert run["max_aps_slo"] == (max(compliant) if compliant else None)
  assert summary["slo"]["scale"] == 100.0
  assert summary["slo"]["ttft_s"] == pytest.approx(400.0)
  for name in ("config.json", "summary.json", "turns.jsonl", "online_latency.png",
               "online_ttft_breakdown.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "max APS within SLO" in stdout


def test_every_turn_of_every_finished_agent_is_recorded_once(cli_run):
  _, summary, turns, _ = cli_run
  for run in summary["runs"]:
    for point in run["points"]:
      mine = [t for t in turns if t["mode"] == run["mode"] and t["aps"] == point["aps"]]
      assert len(mine) == point["turns"]
      keys = [(t["agent"], t["turn"]) for t in mine]
      assert len(keys) == len(set(keys))
      per_agent = {}
      for agent, turn in keys:
        per_agent.setdefault(agent, set()).add(turn)
      finished = [a for a, ts_ in per_agent.items() if ts_ == {0, 1}]
      assert len(finished) == point["agents_finished"]
      for t in mine:
        _check_turn(t)


def _check_turn(t: dict) -> None:
  parts = t["ttft_breakdown_s"]
  assert set(parts) == set(TTFT_SEGMENTS)
  assert all(v >= 0 for v in parts.values())
  assert t["ttft_s"] == pytest.approx(sum(parts.values()), abs=EPS)
  assert t["ttft_s"] + EPS >= parts["queueing"] + parts["read"] + parts["prefill"]
  assert t["ttft_s"] == pytest.approx(t["times_s"]["first_token"] - t["arrival_s"], abs=2 * EPS)
  assert t["submit_lag_s"] >= 0
  assert t["arrival_s"] <= t["times_s"]["ready"] + EPS
  if t["gen_tokens"] >= 2:
    assert t["ttst_s"] >= 0 and t["tpot_s"] >= 0


# --- run_online in process: arrivals, think times ---------------------------------------------


def test_poisson_arrivals_are_seeded_and_ordered():
  trajectories = simple_trajectories(agents=20, turns=1, first_append_tokens=8, append_tokens=8,
                                     gen_tokens=1, vocab_size=16)
  a = arrival_times(trajectories, aps=2.0, seed=3)
  assert a == arrival_times(trajectories, aps=2.0, seed=3)
  assert a != arrival_times(trajectories, aps=2.0, seed=4)
  assert all(x < y for x, y in itertools.pairwise(a)) and a[0] > 0
  # Twice the rate, the same seed: the same exponential draws, half the gaps.
  np.testing.assert_allclose(arrival_times(trajectories, aps=4.0, seed=3), np.array(a) / 2)
  with pytest.raises(ValueError, match="aps must be positive"):
    arrival_times(trajectories, aps=0.0, seed=3)
  with pytest.raises(ValueError, match="arrival_s"):
    arrival_times(trajectories, aps=1.0, seed=3, arrivals="trace")
  traced = [dataclasses.replace(t, arrival_s=10.0 + i) for i, t in enumerate(trajectories[:3])]
  assert arrival_times(traced, aps=1.0, seed=0, arrivals="trace",
                       trace_time_scale=0.5) == [0.0, 0.5, 1.0]


def test_turn_metrics_breakdown_adds_up_without_a_read():
  times = dict(ready=1.0, placed=1.0, prefill_start=1.2, prefill_done=1.5, decode_start=1.5,
               first_token=1.6, second_token=1.7, done=2.0)
  m = turn_metrics(times, arrival=0.9, gen_tokens=4)
  assert m["ttft_s"] == pytest.approx(0.7)
  assert m["ttft_breakdown_s"] == pytest.approx(dict(queueing=0.3, read=0.0, read_to_prefill=0.0,
                                                     prefill=0.3, handoff=0.1))
  assert m["tpot_s"] == pytest.approx(0.4 / 3) and m["tpot_source"] == "done"
  assert turn_metrics(dict(times, last_token=1.9), 0.9, 4)["tpot_s"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def think_run():
  """3 agents x 3 turns with 0.2 s think times on 2P2D (dualpath), Poisson arrivals at 4/s."""
  cfg = get_preset("tiny", dtype="float32")
  model = weights.init_random(cfg, 0)
  layout = KVLayout.for_model(cfg)
  store = KVBlockStore.open(StoreSpec(driver="memory", path="online"), layout,
                            context=ts.Context())
  trajectories = [
      dataclasses.replace(t, turns=tuple(dataclasses.replace(turn, think_s=0.2 if k else 0.0)
                                         for k, turn in enumerate(t.turns)))
      for t in simple_trajectories(agents=3, turns=3, first_append_tokens=150, append_tokens=40,
                                   gen_tokens=4, vocab_size=cfg.vocab_size)]
  rc = RuntimeConfig(mode="dualpath", topology=TopologyConfig(
      num_prefill_engines=2, num_decode_engines=2, engines_per_node=2), link_bytes_per_s=2e6,
      max_context_tokens=512)
  run = run_online(rc, model, store, layout, trajectories, cost_model=COST, aps=4.0, seed=7,
                   slo=Slo(ttft_s=1e3, tpot_s=1e3), steady_window_s=1e3, steady_tolerance=0.05,
                   namespace_prefix="think-")
  return trajectories, run


def test_think_times_and_arrivals_are_honoured(think_run):
  trajectories, run = think_run
  assert run.stop_reason == "all_finished"
  assert run.agents_arrived == run.agents_finished == 3 and not run.unfinished_turns
  assert run.arrivals_s == arrival_times(trajectories, aps=4.0, seed=7)
  by_key = {(t["agent"], t["turn"]): t for t in run.turns}
  assert len(by_key) == len(run.turns) == 9
  for i, trajectory in enumerate(trajectories):
    first = by_key[trajectory.agent_id, 0]
    assert first["arrival_s"] == pytest.approx(run.arrivals_s[i], abs=EPS)
    for k in range(1, len(trajectory.turns)):
      before, turn = by_key[trajectory.agent_id, k - 1], by_key[trajectory.agent_id, k]
      # A later turn never arrives before the previous one ended plus its think time.
      assert turn["arrival_s"] + EPS >= before["times_s"]["done"] + trajectory.turns[k].think_s
      assert turn["hit_tokens"] > 0
  for t in run.turns:
    _check_turn(t)
  assert set(run.jct_s) == {t.agent_id for t in trajectories}


# --- config errors -----------------------------------------------------------------------------


def small(arg: str = "smoke"):
  config = online_config(arg + ",agents=2,turns=2")
  config.unlock()
  config.store.driver = "memory"
  config.store.path = "store"
  return config


@pytest.mark.parametrize("arg, message", [
    ("warp", "unknown variant 'warp'"),
    ("smoke,agents=x", "agents='x' is not an integer"),
    ("smoke,colour=3", "bad override 'colour=3'"),
    ("smoke,scheduler=fifo", "scheduler='fifo'"),
])
def test_bad_config_arguments_name_the_problem(arg, message):
  with pytest.raises(ValueError, match=message):
    online_config(arg)


@pytest.mark.parametrize("key, value, message", [
    ("aps_list", (1.0, 0.0), "aps_list"),
    ("aps_list", (-2.0,), "aps_list"),
    ("aps_list", (), "aps_list"),
    ("arrivals", "uniform", "arrivals"),
    ("steady_window_s", 0.0, "steady_window_s"),
    ("steady_tolerance", -0.1, "steady_tolerance"),
    ("max_point_duration_s", 0.0, "max_point_duration_s"),
])
def test_bad_online_fields_fail_before_any_run(tmp_path, key, value, message):
  config = small()
  config[key] = value
  with pytest.raises(ValueError, match=message):
    OnlineJob.from_config(config, str(tmp_path))


@pytest.mark.parametrize("key, value, message", [
    ("stat", "p42", "slo.stat"), ("scale", 0.0, "slo.scale"), ("ttft_s", -1.0, "slo.ttft_s")])
def test_bad_slo_fails(tmp_path, key, value, message):
  config = small()
  config.slo[key] = value
  with pytest.raises(ValueError, match=message):
    OnlineJob.from_config(config, str(tmp_path))


def test_shared_sections_are_validated_and_variants_parse(tmp_path):
  config = small()
  config.modes = ("nonesuch",)
  with pytest.raises(ValueError, match="modes: 'nonesuch'"):
    OnlineJob.from_config(config, str(tmp_path))
  config = small()
  config.arrivals = "trace"  # synthetic trajectories carry no arrival_s
  with pytest.raises(ValueError, match="arrivals: 'trace'"):
    OnlineJob.from_config(config, str(tmp_path))
  job = OnlineJob.from_config(small(), str(tmp_path))
  assert job.aps_list == tuple(sorted(job.aps_list))
  assert job.slo.ttft_s == pytest.approx(4.0 * 0.5)
  for variant in ("cpu", "gpu"):
    c = online_config(variant)
    assert c.slo.scale > 0 and all(a > 0 for a in c.aps_list)
  assert online_config("gpu").slo.scale == 1.0
