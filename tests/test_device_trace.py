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
