"""analysis/device_trace: busy time per stream (overlaps once), device work by kind."""

import gzip
import json

import pytest

from dualpath_jax.analysis import device_trace


def _write(path, events):
  with gzip.open(path, "wt") as f:
    json.dump(dict(traceEvents=events), f)


def test_summary_counts_overlaps_once_and_sorts_device_work_by_kind(tmp_path):
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=1, tid=7, name="thread_name", args=dict(name="Stream #7")),
          dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="M", pid=2, tid=3, name="thread_name", args=dict(name="pe-group0_0"))]
  spans = [dict(ph="X", pid=1, tid=7, ts=0, dur=100, name="MemcpyH2D"),
           dict(ph="X", pid=1, tid=7, ts=50, dur=100, name="fusion_3"),  # overlaps the copy
           dict(ph="X", pid=1, tid=7, ts=300, dur=100, name="MemcpyD2H"),
           dict(ph="X", pid=1, tid=7, ts=500, dur=500, name="MemcpyP2P"),
           dict(ph="X", pid=2, tid=3, ts=0, dur=1000, name="pe0 compute"),
           dict(ph="X", pid=2, tid=3, ts=10, dur=20, name="pe0 h2d")]  # nested in the stage
  path = str(tmp_path / "perfetto_trace.json.gz")
  _write(path, meta + spans)
  s = device_trace.summarize(path)
  assert s["window_s"] == pytest.approx(1000e-6)
  gpu, host = s["processes"]  # devices first
  assert gpu["device"] and not host["device"]
  (stream,) = gpu["threads"]
  assert stream["name"] == "Stream #7" and stream["busy_s"] == pytest.approx(750e-6)
  assert stream["by_kind_s"] == pytest.approx(dict(
      kernel=100e-6, memcpy_d2d=500e-6, memcpy_d2h=100e-6, memcpy_h2d=100e-6))
  (thread,) = host["threads"]
  assert thread["busy_s"] == pytest.approx(1000e-6) and thread["busy_fraction"] == pytest.approx(1)
  assert thread["top"][0][:1] == ["pe0 compute"] and "by_kind_s" not in thread
  assert "Stream #7" in device_trace.format_summary(s)


def test_a_file_without_trace_events_is_named(tmp_path):
  path = tmp_path / "t.json"
  path.write_text(json.dumps({"traceEvents": 3}))
  with pytest.raises(ValueError, match="t.json: no traceEvents"):
    device_trace.summarize(str(path))


def test_breakdown_by_span_attributes_device_work_to_labelled_host_spans(tmp_path):
  """A device event belongs to the span its start lies in; kernels are classed by name (copies
  keep their kind); busy time is a union, class seconds are sums; a missing label is named."""
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU"))]
  spans = [dict(ph="X", pid=2, tid=1, ts=0, dur=1000, name="fixed_cost"),
           dict(ph="X", pid=2, tid=1, ts=2000, dur=1000, name="batch_32"),
           # inside fixed_cost
           dict(ph="X", pid=1, tid=7, ts=10, dur=100, name="nvjet_hsh_128x64_gemm"),
           dict(ph="X", pid=1, tid=7, ts=50, dur=100, name="gemv2T_kernel_val<bf16>"),
           dict(ph="X", pid=1, tid=8, ts=300, dur=50, name="input_scatter_fusion_2"),
           dict(ph="X", pid=1, tid=7, ts=900, dur=300, name="loop_add_fusion"),  # runs past
           # inside batch_32
           dict(ph="X", pid=1, tid=7, ts=2000, dur=400,
                name="paged_attention_block_h=16_pages_per_compute_block=2"),
           dict(ph="X", pid=1, tid=7, ts=2500, dur=100, name="MemcpyH2D"),
           # outside both: not counted
           dict(ph="X", pid=1, tid=7, ts=1500, dur=100, name="sm90_xmma_gemm_bf16"),
           # a host event with the label's name on the device process would not be a span
           dict(ph="X", pid=1, tid=7, ts=5000, dur=10, name="batch_32")]
  path = str(tmp_path / "perfetto_trace.json.gz")
  _write(path, meta + spans)
  b = device_trace.breakdown_by_span(path, ["fixed_cost", "batch_32"])
  fixed, big = b["fixed_cost"], b["batch_32"]
  assert fixed["span_s"] == pytest.approx(1000e-6) and big["span_s"] == pytest.approx(1000e-6)
  assert fixed["by_class_s"] == pytest.approx(dict(matmul=200e-6, other=300e-6, scatter=50e-6))
  assert fixed["device_busy_s"] == pytest.approx(140e-6 + 50e-6 + 300e-6)
  assert big["by_class_s"] == pytest.approx(dict(attention=400e-6, memcpy_h2d=100e-6))
  assert big["top"][0][0].startswith("paged_attention") and big["top"][0][2] == 1
  with pytest.raises(ValueError, match="no host span named \\['decode'\\]"):
    device_trace.breakdown_by_span(path, ["decode"])
