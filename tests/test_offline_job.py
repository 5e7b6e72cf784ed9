"""The offline experiment as configured from configs/offline.py: the scheduler override, the
balance metrics every run reports, named variants, and config errors that name the field."""

import json
import os

import pytest

from dualpath_jax.config_files import load_config
from dualpath_jax.runtime.offline_job import OfflineJob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def offline_config(arg: str):
  return load_config(os.path.join(ROOT, "configs", "offline.py"), arg)


def small(arg: str, modes=("dualpath",)):
  config = offline_config(arg + ",agents=3,turns=2,first_append_tokens=200,append_tokens=40")
  config.unlock()
  config.modes = modes
  config.warmup = False
  config.check_reference = False
  config.store.driver = "memory"
  config.store.path = "store"
  return config


@pytest.fixture(scope="module", params=["roundrobin", "dualpath"])
def summary(request, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(request.param))
  job = OfflineJob.from_config(small(f"smoke,scheduler={request.param}"), workdir)
  job.run()
  with open(os.path.join(workdir, "summary.json")) as f:
    return request.param, json.load(f), workdir


def test_scheduler_override_reaches_the_run_and_balance_metrics_are_reported(summary):
  scheduler, s, workdir = summary
  (run,) = s["runs"]
  assert run["switches"]["scheduler"] == scheduler
  assert run["switches"]["batching"] == "quota"
  for key in ("mean", "p50", "p90", "windows", "window_s", "links"):
    assert key in run["snic_balance"]
  assert run["snic_balance"]["links"] == 2  # 2P2D, two engines per node: one PE, one DE node
  if run["snic_balance"]["windows"]:
    assert 1.0 <= run["snic_balance"]["mean"] <= 2.0  # max/avg over two links
  attn = run["attn_balance"]
  for key in ("predicted_mean", "measured_mean", "forwards", "forwards_all_busy", "all_forwards"):
    assert key in attn
  assert attn["all_forwards"]["forwards"] == run["prefill_forwards"] > 0
  for value in (attn["predicted_mean"], attn["all_forwards"]["predicted_mean"]):
    assert value is None or 1.0 <= value <= 2.0  # max/avg over two shards
  for name in ("config.json", "summary.json", "turns.jsonl", "links.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  # Steady decode feeds the last step's tokens and lengths back on the device.
  placements = run["decode_input_placements"]
  assert placements["tokens_reused"] > 0 and placements["seq_lens_reused"] > 0
  assert placements["tokens"] > 0  # each admission places them from the host


def test_round_robin_alternates_read_sides(summary):
  scheduler, _, workdir = summary
  with open(os.path.join(workdir, "turns.jsonl")) as f:
    turns = [json.loads(line) for line in f if line.strip()]
  sides = [t["read_side"] for t in turns if t["hit_tokens"]]
  assert set(sides) <= {"pe", "de"}
  if scheduler == "roundrobin":
    assert abs(sides.count("pe") - sides.count("de")) <= 1 + sum(t["turn"] == 0 for t in turns)


def test_variants_name_runs_with_their_own_switches(tmp_path):
  config = small("smoke", modes=("basic", "split"))
  config.variants = {"split": {"mode": "dualpath", "split_reads": True}}
  job = OfflineJob.from_config(config, str(tmp_path))
  assert job.run_names == ("basic", "split")
  assert [r.split_reads for r in job.runtimes] == [False, True]
  assert [r.scheduler for r in job.runtimes] == ["roundrobin", "dualpath"]


@pytest.mark.parametrize("arg, message", [
    ("smoke,scheduler=fifo", "scheduler='fifo'"),
    ("smoke,agents=x", "agents='x' is not an integer"),
    ("smoke,colour=3", "bad override 'colour=3'"),
    ("warp", "unknown variant 'warp'"),
])
def test_bad_config_arguments_name_the_problem(arg, message):
  with pytest.raises(ValueError, match=message):
    offline_config(arg)


@pytest.mark.parametrize("section, key, value, message", [
    ("runtime", "batching", "fifo", "runtime.batching"),
    ("runtime", "compute_quota_s", 0.0, "runtime.compute_quota_s"),
    ("workload", "kind", "movies", "workload.kind"),
    ("workload", "length_jitter", 1.5, "workload.length_jitter"),
])
def test_bad_fields_fail_before_any_run(tmp_path, section, key, value, message):
  config = small("smoke")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    OfflineJob.from_config(config, str(tmp_path))


def test_unknown_variant_mode_and_run_name_are_reported(tmp_path):
  config = small("smoke", modes=("nonesuch",))
  with pytest.raises(ValueError, match="modes: 'nonesuch'"):
    OfflineJob.from_config(config, str(tmp_path))
  config.variants = {"nonesuch": {"mode": "fast"}}
  with pytest.raises(ValueError, match="variants.nonesuch.mode"):
    OfflineJob.from_config(config, str(tmp_path))


def _session_trace(path):
  lines = []
  for sid, lengths in (("a", (300, 420)), ("b", (250, 330))):
    ids_so_far = []
    for turn, n in enumerate(lengths):
      count = -(-n // 64)
      ids_so_far = ids_so_far + [hash((sid, k)) % 10**9 for k in range(len(ids_so_far), count)]
      lines.append(json.dumps(dict(session_id=sid, turn=turn, input_length=n, output_length=5,
                                   hash_ids=ids_so_far[:count], block_size=64)))
  path.write_text("\n".join(lines) + "\n")


def test_a_session_trace_replays_through_the_offline_job(tmp_path):
  trace = tmp_path / "sessions.jsonl"
  _session_trace(trace)
  config = small("smoke", modes=("dualpath",))
  config.workload.kind = "trace"
  config.workload.path = str(trace)
  config.workload.trace_scale = 1
  config.check_reference = True
  job = OfflineJob.from_config(config, str(tmp_path / "out"))
  assert job.workload_report.trajectories == 2 and job.workload_report.turns == 4
  summary = job.run()
  (run,) = summary["runs"]
  assert run["turns"] == 4 and run["outputs_match_reference"] is True
  assert run["tokens_hit"] > 0  # the second turn of each session hits the first turn's blocks


def test_a_malformed_trace_line_is_reported_with_file_and_line(tmp_path):
  trace = tmp_path / "bad.jsonl"
  trace.write_text('{"session_id": "a", "turn": 0}\n')
  config = small("smoke")
  config.workload.kind = "trace"
  config.workload.path = str(trace)
  with pytest.raises(ValueError, match=rf"{trace}:1:"):
    OfflineJob.from_config(config, str(tmp_path / "out"))


def test_a_device_trace_window_records_the_timed_run_and_names_its_streams(tmp_path):
  """device_trace records a jax.profiler window of the named run: the trace file is written
  under WORKDIR/device_trace/<run>, and summary.json summarizes it per process and thread, with
  the runtime's own spans (the PE's stages) among the host events."""
  config = small("smoke", modes=("basic", "dualpath"))
  config.device_trace.modes = ("dualpath",)
  config.device_trace.start_s = 0.0
  config.device_trace.seconds = 30.0  # longer than the run: end() stops it
  OfflineJob.from_config(config, str(tmp_path)).run()
  with open(tmp_path / "summary.json") as f:
    runs = {r["mode"]: r for r in json.load(f)["runs"]}
  assert "device_trace" not in runs["basic"]
  trace = runs["dualpath"]["device_trace"]
  assert "error" not in trace, trace.get("error")
  assert trace["path"].startswith(str(tmp_path / "device_trace" / "dualpath"))
  assert os.path.exists(trace["path"])
  summary = trace["summary"]
  assert 0 < summary["window_s"] < 30
  events = [name for p in summary["processes"] for t in p["threads"] for name, _, _ in t["top"]]
  assert any(name.startswith("pe0 ") for name in events), events[:20]
  assert all(0 <= t["busy_fraction"] <= 1 + 1e-9 for p in summary["processes"]
             for t in p["threads"])


@pytest.mark.parametrize("trace, message", [
    (dict(modes=("oracle",)), "device_trace.modes"),
    (dict(modes=("dualpath",), seconds=0.0), "device_trace.seconds"),
    (dict(modes=("dualpath",), colour=1), "device_trace: unknown key"),
    (dict(modes=("dualpath",), start_s="soon"), "device_trace.start_s: expected a number"),
])
def test_a_bad_device_trace_window_is_named_before_any_run(tmp_path, trace, message):
  config = small("smoke")
  config.device_trace = trace
  with pytest.raises(ValueError, match=message):
    OfflineJob.from_config(config, str(tmp_path))


def test_gc_freeze_reaches_the_runs_and_their_collections_are_reported(tmp_path):
  config = small("smoke")
  config.gc_freeze = True
  job = OfflineJob.from_config(config, str(tmp_path))
  assert job.gc_freeze
  job.run()
  with open(tmp_path / "summary.json") as f:
    (run,) = json.load(f)["runs"]
  assert run["gc_pauses"]["freeze"] and run["gc_pauses"]["frozen_objects"] > 0
  assert run["gc_pauses"]["seconds"] >= 0
  compiles = run["compiles_in_timed_part"]  # every run reports them (runtime/compile_events.py)
  assert compiles["compiles"] == sum(t["compiles"] for t in compiles["by_thread"].values())
  assert compiles["compiles"] == sum(f["compiles"] for f in compiles["by_function"].values())
  bad = dict(config.to_dict(), gc_freeze="yes")  # a ConfigDict would refuse the str itself
  with pytest.raises(ValueError, match="gc_freeze: expected True or False"):
    OfflineJob.from_config(bad, str(tmp_path))


def test_the_precompile_leaves_nothing_to_compile_in_the_timed_part(tmp_path):
  # Compiled inside the timed runs until 2026-11-29: the oracle's prefix zeros, and the DE's read
  # of a finished turn's pages (persist). First turns (no hit) are outside prefill_shapes: they
  # are primed, untimed, as on the GPU.
  config = small("smoke", modes=("basic", "dualpath", "oracle"))
  config.primed_turns = 1
  OfflineJob.from_config(config, str(tmp_path)).run()
  with open(tmp_path / "summary.json") as f:
    runs = json.load(f)["runs"]
  assert [run["mode"] for run in runs] == ["basic", "dualpath", "oracle"]
  for run in runs:
    compiles = run["compiles_in_timed_part"]
    assert compiles["compiles"] == 0, (run["mode"], {
        name: f["compiles"] for name, f in compiles["by_function"].items()})
