"""The offline figures and the exploration notebook on a real smoke run, and their arithmetic.

One smoke offline job (2 agents x 2 turns, basic and dualpath) in a subprocess (the script sets
its own device count before jax starts), shared by the tests: the script's figures, the plot
functions on its output, and experiments/notebooks/explore_run.py run on it with runpy.
"""

import io
import json
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from dualpath_jax.analysis import offline_plots as op

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "explore_run.py")
SMOKE_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODES = ("basic", "dualpath")
OFFLINE_FIGURES = {"jct.png", "ttft_breakdown.png", "timeline.png", "links_basic.png",
                   "links_dualpath.png"}


def script_env() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["MPLBACKEND"] = "Agg"
  return env


def is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC


def run_notebook(workdir, out, monkeypatch) -> tuple[dict, str]:
  """Runs the notebook as a script on `workdir`; returns its globals and what it printed."""
  monkeypatch.setenv("DUALPATH_WORKDIR", str(workdir))
  monkeypatch.setenv("DUALPATH_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  printed = io.StringIO()
  with redirect_stdout(printed):
    namespace = runpy.run_path(NOTEBOOK, run_name="__main__")
  return namespace, printed.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("offline_smoke")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "offline.py"),
       "--config=" + os.path.join(REPO, "configs", "offline.py") + ":smoke,agents=2,turns=2",
       "--config.modes=" + repr(MODES), f"--workdir={workdir}"],
      cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


def test_offline_script_writes_figures(smoke):
  workdir, proc = smoke
  printed = [line.split("figure: ", 1)[1] for line in proc.stdout.splitlines()
             if line.startswith("figure: ")]
  assert {os.path.basename(p) for p in printed} == OFFLINE_FIGURES
  for path in printed:
    assert os.path.dirname(path) == str(workdir)
    assert is_png(path), path


def test_load_run_and_tables(smoke):
  workdir, _ = smoke
  run = op.load_run(workdir)
  assert [r["mode"] for r in op.offline_runs(run["summary"])] == list(MODES)
  assert len(run["turns"]) == 2 * 2 * len(MODES)
  assert [r["mode"] for r in run["links"]["runs"]] == list(MODES)
  assert run["config"]["variant"] == "smoke" and run["ablation"] is None
  table = op.summary_table(run["summary"]).splitlines()
  assert table[0].startswith("mode") and len(table) == 2 + len(MODES)
  rows = op.ablation_rows(run["summary"])
  assert rows[0]["variant"] == "basic"
  assert rows[0]["reduction_vs_basic"] == 0.0 and rows[0]["speedup_vs_basic"] == 1.0
  assert rows[1]["speedup_vs_basic"] == pytest.approx(rows[0]["jct_s"] / rows[1]["jct_s"])


def test_ttft_breakdown_on_smoke(smoke):
  run = op.load_run(smoke[0])
  breakdown = op.ttft_breakdown(run["turns"])
  assert list(breakdown) == list(MODES)
  for mode, b in breakdown.items():
    assert b["turns"] == 4
    assert all(b[s] >= 0 for s in op.TTFT_SEGMENTS)
    # The segments cover ready -> first token (more only where a read overlapped the prefill).
    assert sum(b[s] for s in op.TTFT_SEGMENTS) >= b["ttft"] - 1e-9
    summary_ttft = next(r["ttft_mean_s"] for r in run["summary"]["runs"] if r["mode"] == mode)
    assert b["ttft"] == pytest.approx(summary_ttft)


def test_link_utilisation_keeps_every_byte(smoke):
  run = op.load_run(smoke[0])
  for link_run in run["links"]["runs"]:
    u = op.link_utilisation(link_run, bins=50)
    assert u["cap"] == run["summary"]["link_bytes_per_s"]
    for node, n in link_run["nodes"].items():
      for key in ("reads", "writes"):
        total = sum(r[2] for r in n[key])
        assert u["nodes"][node][key].sum() * u["bin_s"] == pytest.approx(total, rel=1e-9, abs=1)
    assert {n["role"] for n in u["nodes"].values()} == {"prefill", "decode"}


def test_write_offline_plots(smoke, tmp_path):
  workdir, _ = smoke
  run = dict(op.load_run(workdir), workdir=str(tmp_path))  # write elsewhere, same data
  paths = op.write_offline_plots(str(tmp_path), run=run)
  assert {os.path.basename(p) for p in paths} == OFFLINE_FIGURES
  assert all(os.path.dirname(p) == str(tmp_path) and is_png(p) for p in paths)
  rows = op.ablation_rows(run["summary"])
  path = tmp_path / "ablation.png"
  op.ablation_figure(rows).savefig(path)
  assert is_png(path)


def test_notebook_runs_on_smoke(smoke, tmp_path, monkeypatch):
  namespace, printed = run_notebook(smoke[0], tmp_path, monkeypatch)
  names = {os.path.basename(p) for p in namespace["FIGURES"]}
  assert names == OFFLINE_FIGURES
  assert all(is_png(p) for p in namespace["FIGURES"])
  assert "JCT s" in printed and "no ablation.json" in printed and "no online run" in printed
  for mode in MODES:
    assert f"\n{mode}: 4 turns" in printed


def test_turn_segments():
  times = dict(ready=1.0, placed=1.0, read_start=1.5, read_done=2.5, prefill_start=3.0,
               prefill_done=3.25, first_token=3.5)
  assert op.turn_segments(times) == dict(queueing=0.5, read=1.0, read_to_prefill=0.5,
                                         prefill=0.25, handoff=0.25)
  no_read = dict(ready=0.0, prefill_start=0.5, prefill_done=1.0, first_token=1.25)
  assert op.turn_segments(no_read) == dict(queueing=0.5, read=0.0, read_to_prefill=0.0,
                                           prefill=0.5, handoff=0.25)
  assert op.turn_segments(dict(ready=0.0, prefill_start=0.5)) is None


def test_capped_link_delivers_transfers_in_turn():
  # Two 1 MB reads started together on a 1 MB/s link: the second pays after the first.
  link_run = dict(mode="m", link_bytes_per_s=1e6, nodes={"0": dict(
      role="prefill", reads=[[0.0, 1.0, 1e6], [0.0, 2.0, 1e6]], writes=[])})
  u = op.link_utilisation(link_run, bins=4)
  assert u["nodes"]["0"]["reads"].tolist() == pytest.approx([1e6] * 4)
  link_run["link_bytes_per_s"] = None  # uncapped: overlapping transfers really overlap
  u = op.link_utilisation(link_run, bins=4)
  assert u["nodes"]["0"]["reads"].tolist() == pytest.approx([1.5e6, 1.5e6, 0.5e6, 0.5e6])


def test_format_table():
  table = op.format_table(("name", "x"), [("a", 1.5), ("bb", None)]).splitlines()
  assert table == ["name    x", "----  ---", "a     1.5", "bb      -"]


def test_notebook_runs_on_an_online_workdir(tmp_path, monkeypatch):
  workdir = tmp_path / "online"
  workdir.mkdir()
  point = dict(aps=0.5, agents=4, agents_finished=4, turns=12, slo_ok=True, stop_reason="done",
               ttft_p50_s=0.2, ttft_p99_s=0.4, ttft_mean_s=0.25, ttst_p50_s=0.02,
               ttst_p99_s=0.03, tpot_p50_s=0.01, tpot_p99_s=0.02, jct_mean_s=3.0,
               ttft_breakdown_s=dict(queueing=0.05, read=0.1, read_to_prefill=0.0, prefill=0.05,
                                     handoff=0.05))
  summary = dict(runs=[dict(mode="dualpath", max_aps_slo=0.5, points=[point])], model="tiny",
                 topology="2P2D", arrivals="poisson",
                 slo=dict(ttft_s=4.0, tpot_s=0.05, stat="p90", scale=1.0))
  (workdir / "summary.json").write_text(json.dumps(summary))
  turn = dict(mode="dualpath", aps=0.5, agent="a", turn=0, times_s=dict(
      ready=0.0, prefill_start=0.1, prefill_done=0.2, first_token=0.3, done=0.5))
  (workdir / "turns.jsonl").write_text(json.dumps(turn) + "\n")
  namespace, printed = run_notebook(workdir, tmp_path / "out", monkeypatch)
  assert {os.path.basename(p) for p in namespace["FIGURES"]} == {
      "online_latency.png", "online_ttft_breakdown.png"}
  assert all(is_png(p) for p in namespace["FIGURES"])
  assert "max APS within SLO: 0.5" in printed and "no offline runs" in printed
  assert op.write_offline_plots(str(workdir)) == []
