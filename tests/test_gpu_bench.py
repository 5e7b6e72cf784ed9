"""The GPU benchmark's smoke variant runs end to end on CPU and leaves sane, complete JSON.

No timing asserts: only that every section ran and its numbers are positive and of the right
kind (bandwidths > 0, ratios in (0, 2), JCTs > 0, the speedup bound within its formula). One
subprocess (the script sets its own device count before jax starts), shared by the tests.
"""

import json
import os
import subprocess
import sys

import pytest

from dualpath_jax.bench import SECTIONS, data_plane, end_to_end, hardware, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_bench")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "gpu_bench.py"),
       "--config=" + os.path.join(REPO, "configs", "gpu_bench.py") + ":smoke", f"--out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / report.JSON_NAME) as f:
    doc = json.load(f)
  return doc, (out / report.MD_NAME).read_text(), proc


def positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_meta_and_every_section(smoke):
  doc, md, _ = smoke
  meta = doc["meta"]
  assert meta["complete"] is True
  assert meta["platform"] == "cpu" and meta["num_devices"] == 4
  assert meta["jax"] and meta["date"] and meta["config"]["variant"] == "smoke"
  for section in SECTIONS:
    assert section in doc, section
    assert "error" not in doc[section], doc[section].get("traceback")
    assert "running" not in doc[section]
  assert "| section | measurement | value | target | status |" in md
  assert "error" not in md


def test_ceilings(smoke):
  c = smoke[0]["ceilings"]
  n = c["num_gpus"]
  assert isinstance(c["pinned_host"]["works"], bool)
  assert [r["gpu"] for r in c["h2d_alone"]] == list(range(n))
  assert all(positive(r["gbps"]) for r in c["h2d_alone"])
  assert positive(c["h2d_pageable_gpu0"]["gbps"])
  assert positive(c["h2d_all_at_once"]["gbps_total"])
  assert len(c["d2d"]) == n * (n - 1) and all(positive(r["gbps"]) for r in c["d2d"])
  assert [r["k"] for r in c["ingest"]] == list(range(n))
  for r in c["ingest"]:
    assert positive(r["gbps"]) and set(r["by_mode"]) == {"threads", "async"}
    assert sum(r["chunks_per_path"]) * c["chunk_bytes"] == c["total_bytes"]


def test_host_memory(smoke):
  doc, md, _ = smoke
  h = doc["host_memory"]
  sources = doc["meta"]["config"]["host_memory"]["sources"]
  assert [(r["source"], r["bound"]) for r in h["h2d"]] == [
      (s, b) for s in sources for b in (None, 2)]
  assert all(positive(r["gbps"]) and r["bytes_equal"] for r in h["h2d"])
  assert h["bytes"] == h["layer_bytes"] * h["num_layers"]
  assert set(h["d2h"]) == {"numpy_fresh", "jax_pinned_host", "resident_direct",
                           "resident_pinned", "pinned_host_view"}
  assert all(positive(r["gbps"]) for r in h["d2h"].values() if isinstance(r, dict))
  assert "H2D of" in md and "from jax_pinned_array" in md


def test_host_memory_catches_wrong_bytes(monkeypatch):
  """A copy that lands the last layer where the first belongs makes its rows bytes_equal False
  (checked on the device, bench/verify.py)."""
  import jax

  from dualpath_jax.bench import host_memory
  issue = host_memory._issue

  def swapping(sources, device, bound):
    moved = issue(sources, device, bound)
    moved[0], moved[-1] = moved[-1], moved[0]
    return moved

  monkeypatch.setattr(host_memory, "_issue", swapping)
  h = host_memory.measure_host_memory(jax.devices()[0], layer_bytes=4096, num_layers=3,
                                      bounds=(None,), sources=("numpy",), repeats=1, warmup=0,
                                      log=lambda line: None)
  assert [r["bytes_equal"] for r in h["h2d"]] == [False]


def test_data_plane(smoke):
  doc, md, _ = smoke
  d = doc["data_plane"]
  assert d["bytes"] == d["prefix_tokens"] * 28 * 2 * 4 * 128 * 2  # qwen2.5-7b KV, bf16
  rows = {(r["k"], r["variant"]): r for r in d["rows"]}
  assert set(rows) == {(k, v) for k in range(4) for v in data_plane.VARIANTS}
  # The 'traffic' variant runs with the config's chunking (the smoke's 256 KiB cut a 2 MiB
  # layer into pieces), recorded in the section and on its rows.
  config = doc["meta"]["config"]["data_plane"]
  assert (d["chunk_bytes"], d["max_kv_wait_s"]) == (config["chunk_bytes"],
                                                    config["max_kv_wait_s"]) == (256 << 10, 0.0)
  assert d["layers_in_flight"] == 3 and d["check_layers"] == [0, 27]
  for r in rows.values():
    assert "error" not in r, r
    # On CPU a "device" is host RAM and host_to_device may alias numpy, so the data plane can
    # beat the pinned-copy "ceiling": only the ratio's sign and rough size are checked here.
    assert positive(r["gbps"]) and 0 < r["ratio"] < 10
    # the target judges the runtime's variant only; the others are diagnostics
    assert isinstance(r["met"], bool) if r["variant"] == data_plane.RUNTIME_VARIANT \
        else "met" not in r
    assert sum(r["blocks_per_path"]) == d["num_blocks"]
    # Every variant landed the whole prefix on the PE, and every run's layers 0 and L-1 equal
    # the host's layer_kv (else the row would be an error): reused buffers corrupt nothing.
    assert r["loaded_bytes"] == d["bytes"] and r["kv_checked_runs"] == d["repeats"] + d["warmup"]
    # where each path's thread spent the median run: one entry a path, parts within the whole
    assert len(r["path_host_s"]) == r["paths"]
    for host in r["path_host_s"]:
      assert 0 <= host["issue_max_s"] <= host["issue_s"]
      assert host["issue_s"] + host["wait_s"] <= host["thread_s"] <= max(r["times_s"])
    assert r["gather_buffers"] == {"transfer_fresh_buffers": "fresh",
                                   "layer_major": "none: landed layer-major",
                                   "layer_major_direct": "none: landed layer-major"}.get(
                                       r["variant"], "reused, 3 a path")
    assert r["note"] == d["variant_notes"][r["variant"]]
    if r["variant"] in ("traffic", "layer_major"):
      assert (r["chunk_bytes"], r["max_kv_wait_s"]) == (256 << 10, 0.0)
      assert r["h2d_staging"] == d["h2d_staging"] in ("auto", "direct")
    else:
      assert "chunk_bytes" not in r
  assert "| data_plane | k=1 traffic (0.25 MiB pieces, KV wait <= 0 s): 1024-token prefix |" in md
  assert "| data_plane | k=3 transfer_fresh_buffers: 1024-token prefix |" in md
  assert md.count("info (not the runtime's path)") == 4 * (len(data_plane.VARIANTS) - 1)
  assert all(positive(d["components"][k])
             for k in ("gather_gbps", "h2d_gbps", "h2d_direct_gbps", "d2d_gbps"))
  by_source = d["components"]["h2d_direct_by_source"]
  assert sorted(by_source) == sorted(f"{s}_{b}_gbps" for s in ("separate", "landed_views")
                                     for b in ("back_to_back", "3_in_flight"))
  assert all(positive(v) for v in by_source.values())
  pieces = {r["piece_bytes"]: r for r in d["components"]["h2d_pieces"]}
  assert sorted(pieces) == [256 << 10, 8 << 20, 32 << 20]
  assert pieces[256 << 10]["pieces"] == 8 * 28 and pieces[8 << 20]["pieces"] == 28  # 2 MiB layers
  assert all(positive(pieces[256 << 10][f"{s}_{how}_gbps"]) for s in ("auto", "direct")
             for how in ("back_to_back", "one_at_a_time"))
  assert positive(pieces[32 << 20]["direct_back_to_back_gbps"])
  assert "direct_one_at_a_time_gbps" not in pieces[32 << 20]


def test_engine(smoke):
  e = smoke[0]["engine"]
  assert e["card"]["source"].startswith("config override")
  variants = {r["variant"]: r for r in e["prefill"]}
  assert set(variants) == {"layerwise", "layerwise_sdpa", "layerwise_split", "whole"}
  for r in variants.values():
    assert "error" not in r, r
    assert positive(r["median_s"]) and 0 < r["mfu"] < 2 and r["logits_finite"]
  sdpa = variants["layerwise_sdpa"]
  assert sdpa["sdpa_traced"] is True and sdpa["first_layer_rel_err_vs_einsum"] < 0.05
  split = variants["layerwise_split"]  # smoke: einsum parts (no cuDNN on CPU), 3 prefix chunks
  assert split["implementation"] == "einsum" and split["prefill_kv_splits"] == 3
  # bf16 parts and output (the masked einsum rounds once, the split path per part): ~3e-3
  assert split["first_layer_rel_err_vs_einsum"] < 0.02
  check_decode_rows(e, batches=[1, 4], blockings=[(2, 128)])
  # the decode profile's trace lands under the run's output folder
  assert "error" not in e["decode_profile"], e["decode_profile"]
  trace = e["decode_profile"]["trace"]
  assert f"{os.sep}decode_profile{os.sep}" in trace and os.path.exists(trace)
  # 256 tokens + the new one in 64-token pages: 5 pages, 2 splits of 4 (3 padding), 2 a block.
  assert e["decode"][-1]["pallas_blocking"] == dict(k_splits=2, pages_per_compute_block=2,
                                                    padded_pages=8)
  pm = e["peak_memory"]
  assert "error" not in pm, pm
  assert pm["bound_bytes"] > pm["weights_bytes"] > 0 and pm["logits_finite"]
  from dualpath_jax.runtime.prefill_shard import LAYERS_IN_FLIGHT
  assert pm["layers_in_flight"] == LAYERS_IN_FLIGHT  # the bound counts the PE's layers in flight
  assert pm["bound_bytes"] - pm["weights_bytes"] - pm["activation_bytes"]["total"] == (
      LAYERS_IN_FLIGHT * pm["kv_layer_bytes"])
  assert pm["peak_bytes"] is None or positive(pm["peak_bytes"])  # no memory_stats on CPU


def check_decode_rows(e, batches, blockings=()):
  """Each decode attention: one fixed-cost row (batch 1, context 0, no target), then every batch
  under every attention, batch by batch, then 'pallas' at the largest batch under each of
  `blockings` ((pallas_k_splits, pallas_block_tokens[, pallas_num_warps, pallas_num_stages[,
  pallas_kernel]]), the defaults 8 warps, 2 stages, the project's kernel where left out);
  'pallas' rows record their kernel fields."""
  blockings = [tuple(b) + (8, 2, "dualpath")[len(b) - 2:] for b in blockings]
  attentions = e["decode_attentions"]
  assert attentions and set(attentions) <= {"gather", "pallas"}
  fixed = [r for r in e["decode"] if r.get("diagnostic") == "fixed_cost"]
  assert [(r["paged_attention"], r["batch"], r["context"]) for r in fixed] == [
      (a, 1, 0) for a in attentions]
  assert all("met" not in r and r["kv_bytes_read"] == 0 for r in fixed)
  measured = [(r["batch"], r["paged_attention"]) for r in e["decode"]
              if "diagnostic" not in r and "sweep" not in r]
  assert measured == [(b, a) for b in batches for a in attentions]
  assert e["pallas_default_blocking"] == [16, 128, 8, 2, "dualpath"]
  assert e["pallas_blockings"] == [list(b) for b in blockings]
  (context,) = {r["context"] for r in e["decode"] if "diagnostic" not in r}
  sweep = [r for r in e["decode"] if "sweep" in r]
  assert [(r["sweep"], r["paged_attention"], r["batch"], r["context"], r["pallas_k_splits"],
           r["pallas_block_tokens"], r["pallas_num_warps"], r["pallas_num_stages"],
           r["pallas_kernel"]) for r in sweep] == [
      ("pallas_blocking", "pallas", max(batches), context, *b) for b in blockings]
  for r in e["decode"]:
    assert "error" not in r, r
    assert positive(r["step_s"]) and 0 < r["roofline_fraction"] < 2 and r["logits_finite"]
    assert r["bytes_read"] == r["weight_bytes_read"] + r["kv_bytes_read"]
    if r["paged_attention"] == "pallas":
      if "sweep" not in r:
        assert (r["pallas_k_splits"], r["pallas_block_tokens"], r["pallas_num_warps"],
                r["pallas_num_stages"], r["pallas_kernel"]) == (16, 128, 8, 2, "dualpath")
      b = r["pallas_blocking"]
      assert b["k_splits"] <= r["pallas_k_splits"] and b["padded_pages"] % b["k_splits"] == 0
    else:
      assert "pallas_k_splits" not in r and "pallas_blocking" not in r
  names = [row[1] for row in report.rows({"engine": e}) if row[1].startswith("decode")
           and not row[1].startswith("decode profile")]
  assert len(names) == len(e["decode"]) and len(set(names)) == len(names)
  assert [n for n in names if "k_splits" in n] == [
      f"decode pallas batch {r['batch']} ctx {r['context']} k_splits {r['pallas_k_splits']} "
      f"block_tokens {r['pallas_block_tokens']} num_warps {r['pallas_num_warps']} "
      f"num_stages {r['pallas_num_stages']} kernel {r['pallas_kernel']}" for r in sweep]


def test_engine_decode_under_both_attentions(tmp_path):
  """In-process, decode only: the pallas kernel (interpret mode on CPU) next to the gather, and
  the decode profile (on CPU the trace has no GPU streams: only its structure is checked)."""
  import jax

  from dualpath_jax.bench import engine
  from dualpath_jax.model import get_preset
  card = hardware.CardSpec(name="cpu", peak_flops=1e12, hbm_bytes_per_s=1e11, source="test")
  e = engine.measure_engine(
      jax.devices()[0], model_config=get_preset("tiny"), prefill_contexts=(), append_tokens=16,
      prefill_variants=(), sdpa_implementation=None, decode_batches=(2,), decode_context=100,
      peak_context=0, block_tokens=16, repeats=1, warmup=1, decode_steps=2, card=card,
      target_prefill_mfu=0.4, target_decode_roofline=0.6, decode_attentions=("gather", "pallas"),
      pallas_blockings=((2, 16), (16, 128), (2, 16), (2, 16, 4, 3), (16, 128, 8, 2),
                        (16, 128, 8, 2, "dualpath"), (2, 16, 8, 2, "jax")),
      decode_profile_steps=2, profile_dir=str(tmp_path / "profile"), log=lambda _: None)
  # The default blocking (as a pair or whole) and the repeat are not measured again.
  check_decode_rows(e, batches=[2], blockings=[(2, 16), (2, 16, 4, 3), (2, 16, 8, 2, "jax")])
  assert e["decode"][-1]["pallas_blocking"] == dict(k_splits=2, pages_per_compute_block=1,
                                                    padded_pages=8)
  profile = e["decode_profile"]
  assert "error" not in profile, profile
  assert profile["steps"] == 2 and os.path.exists(profile["trace"])
  labels = list(profile["runs"])
  assert labels[:2] == ["fixed_cost", "batch_2"] and labels[2:] in ([], ["batch_2_best_sweep"])
  assert [(r["batch"], r["context"], r["paged_attention"]) for r in profile["runs"].values()][:2] \
      == [(1, 0, "pallas"), (2, 100, "pallas")]
  for r in profile["runs"].values():
    assert r["pallas"]["kernel"] in ("jax", "dualpath") and len(r["pallas"]) == 5
    step = r["per_step"]
    assert step["span_s"] > 0 and 0 <= step["device_busy_s"] <= step["span_s"]
  assert [row[1] for row in report.rows({"engine": e}) if row[1].startswith("decode profile")] \
      == [f"decode profile {label} (batch {r['batch']} ctx {r['context']})"
          for label, r in profile["runs"].items()]
  for bad in ((3, 48), (0, 128), (2,), (2, 16, 3, 2), (2, 16, 4), (2, 16, 4, 0),
              (2, 16, 4, 2, "triton"), (2, 16, 4, 2, "jax", 1)):
    with pytest.raises(ValueError, match="engine.pallas_blockings"):
      engine.measure_engine(
          jax.devices()[0], model_config=get_preset("tiny"), prefill_contexts=(),
          append_tokens=16, prefill_variants=(), sdpa_implementation=None, decode_batches=(2,),
          decode_context=100, peak_context=0, block_tokens=16, repeats=1, warmup=1,
          decode_steps=2, card=card, target_prefill_mfu=0.4, target_decode_roofline=0.6,
          pallas_blockings=(bad,))
  with pytest.raises(ValueError, match="engine.prefill_kv_splits"):
    engine.measure_engine(
        jax.devices()[0], model_config=get_preset("tiny"), prefill_contexts=(),
        append_tokens=16, prefill_variants=("layerwise_split",), sdpa_implementation=None,
        decode_batches=(2,), decode_context=100, peak_context=0, block_tokens=64, repeats=1,
        warmup=0, decode_steps=2, card=card, target_prefill_mfu=0.4, target_decode_roofline=0.6,
        prefill_kv_splits=(2.5,))
  with pytest.raises(ValueError, match="engine.decode_attentions"):
    engine.measure_engine(
        jax.devices()[0], model_config=get_preset("tiny"), prefill_contexts=(), append_tokens=16,
        prefill_variants=(), sdpa_implementation=None, decode_batches=(2,), decode_context=100,
        peak_context=0, block_tokens=16, repeats=1, warmup=1, decode_steps=2, card=card,
        target_prefill_mfu=0.4, target_decode_roofline=0.6, decode_attentions=("flash",))


def test_end_to_end(smoke):
  jobs = smoke[0]["end_to_end"]["jobs"]
  assert [j["name"] for j in jobs] == ["2P2D_uncapped", "2P2D_cap0.001GBps"]
  for j in jobs:
    assert "error" not in j and "skipped" not in j, j
    assert set(j["jct_s"]) == {"basic", "dualpath", "oracle"}
    assert all(positive(s) for s in j["jct_s"].values())
    assert 0 < j["bound"] <= 2.0 and positive(j["dualpath_speedup"])
    assert j["bound"] == pytest.approx(min(2.0, j["jct_s"]["basic"] / j["jct_s"]["oracle"]))


# --- pure helpers (no subprocess) ----------------------------------------------------------------


def test_offline_config_replaces_only_the_given_fields():
  base = dict(modes=("basic",), warmup=True, check_reference=True, extra_switch=7,
              model=dict(preset="tiny", dtype="float32", seed=3),
              topology=dict(num_prefill_engines=2, num_decode_engines=2, engines_per_node=2),
              runtime=dict(link_bytes_per_s=1e6, max_context_tokens=512, new_knob="x"),
              workload=dict(kind="synthetic", agents=8, turns=4, first_append_tokens=400,
                            append_tokens=64, gen_tokens=8, seed=0))
  c = end_to_end.offline_config(base, preset="small", dtype="bfloat16", topology="1P3D",
                                link_bytes_per_s=0, agents=2, turns=3, first_append_tokens=1000,
                                append_tokens=100, gen_tokens=10)
  assert c["extra_switch"] == 7 and c["runtime"]["new_knob"] == "x" and c["model"]["seed"] == 3
  assert c["topology"] == dict(num_prefill_engines=1, num_decode_engines=3, engines_per_node=1)
  assert c["runtime"]["link_bytes_per_s"] is None
  assert c["runtime"]["max_context_tokens"] == 1344  # 1000 + 3 * 110 = 1330, in 64-token steps
  assert c["modes"] == ("basic", "dualpath", "oracle") and c["check_reference"] is False
  assert base["topology"]["num_prefill_engines"] == 2  # the base is not modified
  with pytest.raises(ValueError, match="topologies"):
    end_to_end.offline_config(base, preset="tiny", dtype="float32", topology="3X1",
                              link_bytes_per_s=0, agents=1, turns=1, first_append_tokens=1,
                              append_tokens=1, gen_tokens=1)


def test_repeats_interleave_runs_of_each_mode_and_speedups_use_medians():
  names, variants = end_to_end.repeat_runs(("basic", "split"), 3,
                                           {"split": {"mode": "dualpath", "split_reads": True}})
  assert names == ("basic", "split", "basic_r2", "split_r2", "basic_r3", "split_r3")
  assert variants["basic_r3"] == {"mode": "basic"}
  assert variants["split_r2"] == {"mode": "dualpath", "split_reads": True}
  assert end_to_end.repeat_runs(("basic",), 1, {}) == (("basic",), {})
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="end_to_end.repeats"):
      end_to_end.repeat_runs(("basic",), bad, {})
  with pytest.raises(ValueError, match="basic_r2"):
    end_to_end.repeat_runs(("basic",), 2, {"basic_r2": {"mode": "oracle"}})
  # A variant of a mode (deep: dualpath with other switches) keeps its own median.
  runs, medians = end_to_end.medians_by_mode(
      dict(basic=6.0, dualpath=5.0, deep=3.0, basic_r2=4.0, dualpath_r2=9.0, deep_r2=3.5,
           basic_r3=5.0, x_r2=1.0))
  assert runs == dict(basic=[6.0, 4.0, 5.0], dualpath=[5.0, 9.0], deep=[3.0, 3.5], x_r2=[1.0])
  assert medians == dict(basic=5.0, dualpath=7.0, deep=3.25, x_r2=1.0)


def test_speedups_and_bound():
  s = end_to_end.speedups(dict(basic=10.0, dualpath=6.0, oracle=2.0), 1, 3, 0.8)
  assert s["bound"] == 4.0 and s["dualpath_speedup"] == pytest.approx(10 / 6)
  assert s["met"] is False
  s = end_to_end.speedups(dict(basic=10.0, dualpath=6.0, oracle=8.0), 2, 2, 0.8)
  assert s["bound"] == pytest.approx(1.25) and s["met"] is True


def test_detect_card_by_device_kind():
  class Fake:
    device_kind = "NVIDIA H100 80GB HBM3"
  card = hardware.detect_card(Fake())
  assert (card.peak_flops, card.hbm_bytes_per_s) == (989e12, 3.35e12)
  Fake.device_kind = "NVIDIA H200"
  assert hardware.detect_card(Fake()).hbm_bytes_per_s == 4.8e12
  Fake.device_kind = "cpu"
  assert hardware.detect_card(Fake()).peak_flops is None
  assert hardware.detect_card(Fake(), peak_flops=1e12).peak_flops == 1e12


# --- sections in-process on fewer devices (a 1- or 2-GPU host) -----------------------------------


def test_ceilings_on_one_device_without_pinned_host():
  import jax
  from dualpath_jax.bench import ceilings
  c = ceilings.measure_ceilings(jax.devices()[:1], total_bytes=4 << 20, chunk_bytes=1 << 20,
                                d2d_bytes=1 << 20, repeats=1, warmup=0, pinned=False,
                                log=lambda line: None)
  assert c["h2d_source"] == "numpy (pageable)" and "note" in c
  assert c["d2d"] == [] and [r["k"] for r in c["ingest"]] == [0]
  assert positive(c["ingest"][0]["gbps"]) and positive(c["h2d_all_at_once"]["gbps_total"])


def test_data_plane_on_one_and_two_devices():
  import jax

  from dualpath_jax.kvstore.layout import KVLayout
  layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=4)
  one = data_plane.measure_data_plane(jax.devices()[:1], layout=layout, prefix_tokens=32,
                                      repeats=1, warmup=0, ceiling_gbps={0: 1.0},
                                      log=lambda line: None)
  # One device is a PE alone: every variant at k = 0, the TrafficManager ones included.
  assert [(r["k"], r["variant"]) for r in one["rows"]] == [(0, v) for v in data_plane.VARIANTS]
  assert "skipped" not in one
  assert all(r["loaded_bytes"] == one["bytes"] for r in one["rows"])
  assert "d2d_gbps" not in one["components"]
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="data_plane.layers_in_flight"):
      data_plane.measure_data_plane(jax.devices()[:1], layout=layout, prefix_tokens=32,
                                    repeats=1, warmup=0, layers_in_flight=bad)
  with pytest.raises(ValueError, match="data_plane.h2d_staging"):
    data_plane.measure_data_plane(jax.devices()[:1], layout=layout, prefix_tokens=32,
                                  repeats=1, warmup=0, h2d_staging="dma")
  two = data_plane.measure_data_plane(jax.devices()[:2], layout=layout, prefix_tokens=32,
                                      repeats=1, warmup=0, components=False,
                                      h2d_staging="direct", log=lambda line: None)
  # the TrafficManager variants run the given staging (the runtime's), components or not
  assert two["h2d_staging"] == "direct"
  assert {r["h2d_staging"] for r in two["rows"] if "h2d_staging" in r} == {"direct"}
  assert [(r["k"], r["variant"]) for r in two["rows"]] == [
      (k, v) for k in (0, 1) for v in data_plane.VARIANTS]
  assert all(positive(r["gbps"]) and "ratio" not in r for r in two["rows"])
  assert all(r["loaded_bytes"] == two["bytes"] for r in two["rows"])
  assert two["chunk_bytes"] == 32 << 20 and two["max_kv_wait_s"] == 0.0  # the defaults
  assert two["rows"][len(data_plane.VARIANTS)]["blocks_per_path"] == [4, 4]  # k = 1


def test_data_plane_reuses_gather_buffers_and_catches_wrong_kv(monkeypatch):
  """More layers than LAYERS_IN_FLIGHT, so that every reused-buffer path reuses its buffers,
  waiting for a layer to land first; a path that lands a wrong layer makes its row an error."""
  import jax

  from dualpath_jax.kvstore.layout import KVLayout
  layout = KVLayout(num_layers=7, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=4)
  gathers = []
  layer_kv = KVLayout.layer_kv

  def counting_layer_kv(self, blocks, layer, out=None, tokens=None):
    gathers.append(None if out is None else out.ctypes.data)
    return layer_kv(self, blocks, layer, out=out, tokens=tokens)

  monkeypatch.setattr(KVLayout, "layer_kv", counting_layer_kv)
  d = data_plane.measure_data_plane(jax.devices()[:3], layout=layout, prefix_tokens=48,
                                    variants=("transfer", "traffic", "layer_major",
                                              "layer_major_direct"),
                                    repeats=2, warmup=1, components=False, chunk_bytes=256,
                                    log=lambda line: None)
  assert [(r["k"], r["variant"]) for r in d["rows"]] == [
      (k, v) for k in range(3)
      for v in ("transfer", "traffic", "layer_major", "layer_major_direct")]
  assert all("error" not in r and r["loaded_bytes"] == d["bytes"] for r in d["rows"])
  # 3 buffers a path: 3 + 6 + 9 distinct buffers per variant, every gather into one of them
  buffers = set(gathers[len(d["check_layers"]):])
  assert None not in buffers and len(buffers) <= 2 * (3 + 6 + 9)
  monkeypatch.setattr(KVLayout, "layer_kv", layer_kv)

  runner = data_plane._path_runner

  def swapping_runner(*args):
    run_path = runner(*args)

    def run(p, part):
      out = run_path(p, part)
      out[0], out[-1] = out[-1], out[0]  # layers 0 and L-1 landed in each other's place
      return out
    run.host_s = run_path.host_s  # where each path's thread spent the run
    return run

  monkeypatch.setattr(data_plane, "_path_runner", swapping_runner)
  bad = data_plane.measure_data_plane(jax.devices()[:2], layout=layout, prefix_tokens=48,
                                      variants=("transfer", "layer_major"), repeats=1,
                                      warmup=0, components=False, log=lambda line: None)
  assert all("wrong KV on the PE" in r["error"] for r in bad["rows"]) and len(bad["rows"]) == 4


def test_pallas_blocking_flags_reach_the_engine_and_the_end_to_end_model(tmp_path):
  """h100x4 sweeps a few blockings; the flags of scripts/gpu_bench_call.sh set the sweep and the
  end-to-end jobs' ModelConfig blocking (the offline job takes them as model fields)."""
  from absl import flags
  from ml_collections import config_flags

  from dualpath_jax.config_files import load_config_spec
  from dualpath_jax.runtime.offline_job import OfflineJob
  spec = os.path.join(REPO, "configs", "gpu_bench.py")

  def parse(*args):
    argv = ["gpu_bench", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config

  assert parse(f"--config={spec}:h100x4").engine.pallas_blockings == (
      (16, 128, 8, 2, "jax"), (16, 128, 4, 3), (16, 64, 4, 2), (16, 64, 2, 3), (8, 128, 4, 4))
  config = parse(f"--config={spec}:e2e_h100x4",
                 "--config.engine.pallas_blockings=((4,128),(16,512))",
                 "--config.end_to_end.model.pallas_k_splits=8",
                 "--config.end_to_end.model.pallas_block_tokens=256",
                 "--config.end_to_end.model.pallas_kernel=jax",
                 "--config.end_to_end.runtime.prefill_layers_in_flight=6",
                 "--config.end_to_end.runtime.host_memory=jax_pinned",
                 "--config.end_to_end.variants={'deep': {'mode': 'dualpath', "
                 "'prefill_layers_in_flight': 8}}")
  assert config.engine.pallas_blockings == ((4, 128), (16, 512))
  x = config.end_to_end
  base = load_config_spec(x.base_config, REPO)
  job_config = end_to_end.offline_config(
      base, preset="tiny", dtype="float32", topology="1P3D", link_bytes_per_s=0, agents=1,
      turns=1, first_append_tokens=16, append_tokens=8, gen_tokens=2, model=x.model.to_dict(),
      runtime=x.runtime.to_dict())
  job_config["model"]["checkpoint"] = ""
  job = OfflineJob.from_config(job_config, str(tmp_path))
  model = job.model_config
  assert (model.paged_attention, model.pallas_k_splits, model.pallas_block_tokens,
          model.pallas_kernel) == ("pallas", 8, 256, "jax")
  # the PE's layers in flight reach the runtime config of every mode
  assert {rc.prefill_layers_in_flight for rc in job.runtimes} == {6}
  assert {rc.host_memory for rc in job.runtimes} == {"jax_pinned"}
  assert {rc.d2h_staging for rc in job.runtimes} == {"cuda_memcpy"}  # the preset's, since record 6
  # repeated runs are variants of the job: every run of a mode has that mode's runtime
  job_config = end_to_end.offline_config(
      base, preset="tiny", dtype="float32", topology="1P3D", link_bytes_per_s=0, agents=1,
      turns=1, first_append_tokens=16, append_tokens=8, gen_tokens=2, repeats=2)
  job = OfflineJob.from_config(job_config, str(tmp_path))
  assert job.run_names == ("basic", "dualpath", "oracle", "basic_r2", "dualpath_r2", "oracle_r2")
  assert [rc.mode for rc in job.runtimes] == ["basic", "dualpath", "oracle"] * 2
  # a variant given to the end-to-end job is a run of its own, repeated like the modes
  job_config = end_to_end.offline_config(
      base, preset="tiny", dtype="float32", topology="1P3D", link_bytes_per_s=0, agents=1,
      turns=1, first_append_tokens=16, append_tokens=8, gen_tokens=2, repeats=2,
      modes=("dualpath", "deep"), variants=x.variants.to_dict())
  job = OfflineJob.from_config(job_config, str(tmp_path))
  assert job.run_names == ("dualpath", "deep", "dualpath_r2", "deep_r2")
  assert [rc.prefill_layers_in_flight for rc in job.runtimes] == [3, 8, 3, 8]


def test_decode_interference(smoke):
  doc, md, _ = smoke
  di = doc["decode_interference"]
  assert "error" not in di, di.get("traceback")
  [row] = di["rows"]
  assert (row["batch"], row["context"]) == (4, 256)
  names = [c["condition"] for c in row["conditions"]]
  gates = ("off, 0.25 MiB", "0.02 s, 0.0625 MiB")
  assert names == ["none"] + [f"{kind}, gate {gate}" for gate in gates
                              for kind in ("h2d", "d2h", "h2d+d2h", "admit")]
  base = row["conditions"][0]
  assert base["inflation"] == 0.0 and "met" not in base
  assert base["steps"] == di["rounds"] * (di["steps"] - 1)
  for c in row["conditions"][1:]:
    assert c["steps"] == base["steps"] and positive(c["median_s"])
    assert c["inflation"] == pytest.approx(c["median_s"] / base["median_s"] - 1)
    assert c["met"] == (c["inflation"] <= di["target_inflation"])
    # Each direction of the condition moved whole moves, and only those directions moved.
    for direction in ("h2d", "d2h"):
      if direction in c["kind"]:
        assert c[f"{direction}_moves"] >= 1 and c[f"{direction}_bytes"] % di[
            f"{direction}_move_bytes"] == 0
        # (a CPU window of a few ms may see no move land: rates may be 0)
        assert c[f"{direction}_alone_gbps"] >= 0 and c[f"{direction}_alone_bytes"] % di[
            f"{direction}_move_bytes"] == 0 and c["alone_seconds"] >= c["seconds"]
      else:
        assert f"{direction}_moves" not in c
    if c["kind"] == "admit":  # steps 2 and 5 of 8 (admit_every 3), each with its turn's read
      assert c["admissions"] == c["persists"] == 2 * di["rounds"]
      assert c["admission_steps"]["steps"] == c["admissions"]
      assert c["admission_step_inflation"] == pytest.approx(
          c["admission_steps"]["median_s"] / base["median_s"] - 1)
    else:
      assert "admissions" not in c
  assert "DE step under d2h, gate off" in md
  assert "steps behind an admission" in md


def test_decode_interference_bad_input():
  import jax

  from dualpath_jax.bench import decode_interference
  from dualpath_jax.model.config import get_preset
  good = dict(model_config=get_preset("tiny"), shapes=((2, 64),), page_tokens=16, steps=3,
              rounds=1, h2d_tokens=16, d2h_tokens=16, log=lambda line: None)
  for field, value in (("kinds", ("h2d",)), ("kinds", ("none", "d2d")), ("steps", 1),
                       ("rounds", 0), ("shapes", ((2,),)), ("gates", ((0, 0.0),)),
                       ("gates", ()), ("host_memory", "gpu"), ("in_flight", 0),
                       ("admit_every", 0), ("admit_tokens", -1)):
    with pytest.raises(ValueError, match=f"decode_interference.{field}"):
      decode_interference.measure_decode_interference(jax.devices()[0], **{**good, field: value})


def test_de_loop_hooks_bracket_every_step():
  from dualpath_jax.bench.engine import DecodeInputs
  from dualpath_jax.model import weights
  from dualpath_jax.model.config import get_preset
  config = get_preset("tiny", dtype="float32").replace(paged_attention="gather")
  inputs = DecodeInputs(config, batch=2, context=40, page_tokens=16, seed=0)
  model = weights.init_random(config, seed=0)
  events = []
  inputs.de_loop(model, 5, before_dispatch=lambda: events.append("dispatch"),
                 after_collect=lambda: events.append("collect"))
  # One step in flight: step n+1 is dispatched before step n is collected.
  assert events == ["dispatch"] + ["dispatch", "collect"] * 4 + ["collect"]
  # Two: step n+2 before step n; timings from the second read after a dispatch on.
  events.clear()
  timings = []
  inputs.de_loop(model, 6, in_flight=2, before_dispatch=lambda: events.append("dispatch"),
                 after_collect=lambda: events.append("collect"), timings=timings)
  assert events == ["dispatch"] * 2 + ["dispatch", "collect"] * 4 + ["collect"] * 2
  assert len(timings) == 3
  assert all(period >= wait > 0 and dispatch > 0 for period, dispatch, wait in timings)
  inputs.delete()


def test_decode_interference_catches_wrong_bytes(monkeypatch):
  import jax

  from dualpath_jax.bench import decode_interference
  from dualpath_jax.model.config import get_preset
  from dualpath_jax.runtime.traffic import TrafficManager
  real_h2d = TrafficManager.h2d
  monkeypatch.setattr(TrafficManager, "h2d", lambda self, host, dst=None: real_h2d(self, host) + 1)
  got = decode_interference.measure_decode_interference(
      jax.devices()[0], model_config=get_preset("tiny", dtype="float32").replace(
          paged_attention="gather"), shapes=((2, 64),), page_tokens=16, steps=3, rounds=1,
      kinds=("none", "h2d"), h2d_tokens=16, d2h_tokens=16, log=lambda line: None)
  assert "landed different bytes" in got["rows"][0]["error"]


def test_decode_interference_catches_a_wrong_page_write(monkeypatch):
  """The 'admit' kind checks, on the device, that its page writes hold the landed KV."""
  import jax

  from dualpath_jax.bench import decode_interference
  from dualpath_jax.model import paged
  from dualpath_jax.model.config import get_preset
  real_write = paged.write_kv_to_pages
  monkeypatch.setattr(paged, "write_kv_to_pages",
                      lambda pool, kv, ids: real_write(pool, kv + 1, ids))
  got = decode_interference.measure_decode_interference(
      jax.devices()[0], model_config=get_preset("tiny", dtype="float32").replace(
          paged_attention="gather"), shapes=((2, 64),), page_tokens=16, steps=4, rounds=1,
      kinds=("none", "admit"), h2d_tokens=16, d2h_tokens=16, admit_every=2, admit_tokens=32,
      log=lambda line: None)
  assert "pages written differ" in got["rows"][0]["error"]
