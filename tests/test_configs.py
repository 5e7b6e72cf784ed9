"""Every config file in configs/ and every variant it declares; the ablation's runs and contract.

Config files are found by globbing configs/*.py: each declares VARIANTS, and get_config(variant)
returns a locked ConfigDict, get_config('nope') a ValueError naming 'nope'. The ablation runs once
(smoke, shrunk) in a subprocess, shared by the tests of its ablation.json, its figure and the
notebook's ablation table.
"""

import glob
import importlib.util
import json
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO

import ml_collections
import pytest

from dualpath_jax.runtime.offline_job import OfflineJob

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
ABLATION_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAPER = {"+layerwise": -0.1721, "+dual_path": -0.3819, "+scheduling": -0.4562}
# Each ablation run's switches as summary.json reports them.
SWITCHES = {
    "basic": dict(layerwise=False, dual_path=False, scheduler="roundrobin",
                  batching="token_budget", split_reads=False, skips_kv_io=False),
    "+layerwise": dict(layerwise=True, dual_path=False, scheduler="roundrobin",
                       batching="token_budget", split_reads=False, skips_kv_io=False),
    "+dual_path": dict(layerwise=True, dual_path=True, scheduler="roundrobin",
                       batching="token_budget", split_reads=False, skips_kv_io=False),
    "+scheduling": dict(layerwise=True, dual_path=True, scheduler="dualpath", batching="quota",
                        split_reads=False, skips_kv_io=False),
    "+split_reads": dict(layerwise=True, dual_path=True, scheduler="dualpath", batching="quota",
                         split_reads=True, skips_kv_io=False),
    "oracle": dict(layerwise=True, dual_path=True, scheduler="dualpath", batching="quota",
                   split_reads=False, skips_kv_io=True),
}
ABLATION_MODES = ("basic", "+layerwise", "+dual_path", "+scheduling")


def load_module(path: str):
  name = "_test_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_variants():
  for path in CONFIG_FILES:
    for variant in getattr(load_module(path), "VARIANTS", ()):
      yield pytest.param(path, variant, id=f"{os.path.basename(path)}:{variant}")


def test_config_files_found():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"offline.py", "ablation.py", "gpu_bench.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_declares_variants_and_has_a_default(path):
  module = load_module(path)
  variants = getattr(module, "VARIANTS", None)
  assert isinstance(variants, tuple) and variants, f"{path}: no VARIANTS tuple"
  assert all(isinstance(v, str) and v for v in variants)
  config = module.get_config()  # the default variant
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked


@pytest.mark.parametrize("path, variant", list(config_variants()))
def test_every_variant_is_a_locked_config(path, variant):
  config = load_module(path).get_config(variant)
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.no_such_field_added_by_a_typo = 1
  if "variant" in config:
    assert config.variant == variant


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("bad", ["no_such_variant", "Smoke"])
def test_bad_variant_is_named(path, bad):
  with pytest.raises(ValueError, match=bad):
    load_module(path).get_config(bad)


# ------------------------------------------------------------------------------ the ablation config


@pytest.fixture(scope="module")
def ablation_config():
  return load_module(os.path.join(REPO, "configs", "ablation.py"))


@pytest.mark.parametrize("variant", ["smoke", "cpu", "gpu"])
def test_ablation_runs_build_their_switches(ablation_config, variant, tmp_path):
  config = ablation_config.get_config(variant)
  assert tuple(config.modes) == tuple(SWITCHES)
  # The job validates the whole config (topology on the test's 8 CPU devices, no run).
  job = OfflineJob.from_config(config, str(tmp_path))
  assert job.run_names == tuple(SWITCHES)
  for name, runtime in zip(job.run_names, job.runtimes):
    assert runtime.switches() == SWITCHES[name], name
  if variant == "gpu":
    assert config.platform == "default"
    assert (job.model_config.name, job.model_config.dtype) == ("qwen2.5-7b", "bfloat16")


def test_ablation_switches_ignore_a_scheduler_override(ablation_config, tmp_path):
  config = ablation_config.get_config("smoke,scheduler=dualpath,agents=2")
  assert config.workload.agents == 2
  job = OfflineJob.from_config(config, str(tmp_path))
  assert [r.scheduler for r in job.runtimes] == [SWITCHES[n]["scheduler"] for n in SWITCHES]


def test_ablation_gpu_keeps_overrides(ablation_config):
  config = ablation_config.get_config("gpu,agents=2")
  assert config.workload.agents == 2
  assert config.workload.turns == ablation_config.GPU_WORKLOAD["turns"]
  with pytest.raises(ValueError, match="nope"):
    ablation_config.get_config("gpu,nope=1")


# ---------------------------------------------------------------------------- the ablation contract


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ablation")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["MPLBACKEND"] = "Agg"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "ablation.py"),
       "--config=" + os.path.join(REPO, "configs", "ablation.py") + ":smoke,agents=2,turns=2",
       "--config.warmup=False", "--config.check_reference=False",
       "--config.modes=" + repr(ABLATION_MODES), f"--workdir={workdir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=ABLATION_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "ablation.json") as f:
    return workdir, json.load(f), proc


def test_ablation_json(ablation):
  workdir, doc, _ = ablation
  rows = doc["rows"]
  assert [r["variant"] for r in rows] == list(ABLATION_MODES)
  basic = rows[0]
  assert basic["reduction_vs_basic"] == 0.0 and basic["speedup_vs_basic"] == 1.0
  for row in rows:
    assert row["switches"] == SWITCHES[row["variant"]]
    assert row["jct_s"] > 0
    assert row["reduction_vs_basic"] == pytest.approx(row["jct_s"] / basic["jct_s"] - 1)
    assert row["speedup_vs_basic"] == pytest.approx(basic["jct_s"] / row["jct_s"])
    assert row["snic_balance_mean"] is None or row["snic_balance_mean"] >= 1.0
    assert "attn_balance_predicted_mean" in row
  assert {k: v for k, v in doc["paper"].items() if k != "basic"} == PAPER
  assert doc["config"]["workload"]["agents"] == 2
  assert tuple(doc["config"]["modes"]) == ABLATION_MODES
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert [r["jct_s"] for r in summary["runs"]] == [r["jct_s"] for r in rows]


def test_ablation_figures(ablation):
  workdir, _, proc = ablation
  for name in ("ablation.png", "jct.png", "ttft_breakdown.png", "timeline.png",
               "links_basic.png", "links_plus_layerwise.png"):
    with open(workdir / name, "rb") as f:
      assert f.read(8) == PNG_MAGIC, name
  assert f"figure: {workdir / 'ablation.png'}" in proc.stdout


def test_notebook_shows_the_ablation(ablation, tmp_path, monkeypatch):
  workdir = ablation[0]
  monkeypatch.setenv("DUALPATH_WORKDIR", str(workdir))
  monkeypatch.setenv("DUALPATH_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  printed = StringIO()
  with redirect_stdout(printed):
    namespace = runpy.run_path(os.path.join(REPO, "experiments", "notebooks", "explore_run.py"),
                               run_name="__main__")
  assert str(tmp_path / "ablation.png") in namespace["FIGURES"]
  assert "+scheduling" in printed.getvalue() and "-45.62%" in printed.getvalue()


def test_a_missing_config_file_is_named_with_its_field(tmp_path):
  from dualpath_jax.config_files import load_config, load_config_spec
  with pytest.raises(ValueError, match="end_to_end.base_config: no config file at"):
    load_config_spec("configs/nonesuch.py:smoke", str(tmp_path), field="end_to_end.base_config")
  with pytest.raises(ValueError, match="config: no config file at"):
    load_config(str(tmp_path / "missing.py"))


@pytest.mark.parametrize("override, message", [
    ("--config.runtim.kv_max_wait_s=1",
     "--config.runtim.kv_max_wait_s: the config has no field 'runtim' (Did you mean"),
    ("--config.runtime.nonexistent=1", "--config.runtime.nonexistent: the config has no field"),
    ("--config.runtime.kv_max_wait_s=abc", "could not convert string to float"),
])
def test_a_bad_config_flag_is_one_error_line(override, message, tmp_path):
  """The flags fail before main runs (platform.parse_flags), so no job starts."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "experiments/offline.py", "--config=configs/offline.py:smoke", override,
       f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
  assert result.stderr.startswith("error: ") and message in result.stderr
  assert not os.listdir(tmp_path)
