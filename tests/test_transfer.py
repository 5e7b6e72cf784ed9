"""Transfers: after a move the array sits on the destination engine, bit for bit."""

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dualpath_jax.engines import TopologyConfig, build_topology
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.runtime.traffic import TrafficConfig, TrafficManager
from dualpath_jax.transfer import (MOVER_NAMES, device_to_host, has_pinned_host, host_to_device,
                                   make_mover)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=4)


@pytest.fixture(scope="module")
def topo():
  return build_topology(TopologyConfig(num_prefill_engines=2, num_decode_engines=6))


def random_layer_kv(num_blocks=3, seed=0):
  """One layer of `num_blocks` Full Blocks as model KV [n*B, 2, H, D] bf16, random bit patterns."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (num_blocks, *LAYOUT.full_block_shape), dtype=np.uint8)
  return LAYOUT.layer_kv(blocks, 1)


def bits(x):
  return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("mover_name", MOVER_NAMES)
def test_move_lands_on_destination_bitwise(topo, mover_name):
  host = random_layer_kv()
  pe, de = topo.prefill_engines[1], topo.decode_engines[4]
  x = host_to_device(host, pe)
  assert x.devices() == set(pe.devices)
  mover = make_mover(mover_name)
  for _ in range(2):  # the second call reuses the cached program
    y = mover.move(x, de)
    assert y.devices() == set(de.devices) and y.sharding == de.replicated_sharding
    np.testing.assert_array_equal(bits(y), bits(host))
  back = mover.move(y, pe)  # DE -> PE, the DE read path's direction
  assert back.devices() == set(pe.devices)
  np.testing.assert_array_equal(bits(back), bits(host))


@pytest.mark.parametrize("mover_name", MOVER_NAMES)
def test_move_between_tensor_parallel_engines(mover_name):
  topo = build_topology(TopologyConfig(num_prefill_engines=1, num_decode_engines=1,
                                       devices_per_engine=2))
  pe, de = topo.prefill_engines[0], topo.decode_engines[0]
  host = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  split = lambda e: NamedSharding(e.mesh, PartitionSpec(None, "tp"))  # noqa: E731
  x = jax.device_put(host, split(pe))
  y = make_mover(mover_name).move(x, split(de))
  assert y.sharding == split(de)
  np.testing.assert_array_equal(np.asarray(y), host)


def test_shard_map_mover_rejects_mismatched_layouts(topo):
  x = host_to_device(np.zeros((4, 4), np.float32), topo.prefill_engines[0])
  with pytest.raises(ValueError, match="dst"):
    make_mover("shard_map").move(x, NamedSharding(topo.decode_mesh, PartitionSpec()))
  with pytest.raises(ValueError, match="mover"):
    make_mover("rdma")


def test_host_to_device_does_not_alias_the_host_buffer(topo):
  raw = np.zeros(1 << 16, np.uint8)  # 64-byte aligned view: the case XLA:CPU would alias
  buf = raw[(-raw.ctypes.data) % 64:][:1 << 15]
  x = host_to_device(buf, topo.decode_engines[0])
  buf[:] = 7
  assert not np.asarray(x).any()
  out = np.empty_like(buf)
  assert device_to_host(x, out) is out and not out.any()


def test_traffic_manager_chunks_and_counts(topo):
  pe, de = topo.prefill_engines[0], topo.decode_engines[0]
  host = random_layer_kv(num_blocks=4)  # 16 rows of 64 bytes
  tm = TrafficManager(pe, mover=make_mover("shard_map"), config=TrafficConfig(chunk_bytes=300))
  x = tm.h2d(host)
  assert x.devices() == set(pe.devices)
  y = tm.d2d(x, de)
  assert y.devices() == set(de.devices)
  np.testing.assert_array_equal(bits(y), bits(host))
  np.testing.assert_array_equal(bits(tm.d2h(y)), bits(host))
  counts = tm.bytes_by_path
  assert counts["h2d"] == counts["d2d"] == counts["d2h"] == host.nbytes
  assert tm.bytes_by_link["d2d:pe0->de0"] == host.nbytes
  # One record per move (not per piece), in order, with its ends named: engines by name (this
  # manager's own, or a destination Engine), other arrays by their device ids.
  foreign = "dev" + "+".join(str(d.id) for d in de.devices)
  assert [m[2:] for m in tm.move_records] == [("h2d", "host", "pe0"), ("d2d", "pe0", "de0"),
                                              ("d2h", foreign, "host")]
  assert all(t0 <= t1 for t0, t1, *_ in tm.move_records)


@pytest.mark.parametrize("max_kv_wait_s,d2h_staging", [(0.0, "direct"), (0.05, "direct"),
                                                        (0.0, "pinned")])
def test_pieces_go_back_to_back_with_the_gate_off(topo, monkeypatch, max_kv_wait_s, d2h_staging):
  """Gate off: a move's pieces are all issued before any lands (one at a time, 64 MiB H2D
  pieces moved 4.4 GB/s on an H200, back to back 32); gate on: each waits for the previous.
  Either way the bytes arrive whole, for H2D, D2D and D2H."""
  from dualpath_jax.runtime import traffic
  pe, de = topo.prefill_engines[0], topo.decode_engines[0]
  host = random_layer_kv(num_blocks=4)  # 16 rows of 64 bytes: 4 pieces of 4 rows
  waits, ready = [], jax.block_until_ready
  monkeypatch.setattr(traffic.jax, "block_until_ready", lambda x: waits.append(x) or ready(x))
  started = []
  piece = traffic._piece
  monkeypatch.setattr(traffic, "_piece", lambda x, rows: started.append(rows) or piece(x, rows))
  tm = TrafficManager(pe, mover=make_mover("device_put"),
                      config=TrafficConfig(chunk_bytes=256, max_kv_wait_s=max_kv_wait_s,
                                           d2h_staging=d2h_staging))
  x = tm.h2d(host)
  y = tm.d2d(x, de)
  out = tm.d2h(y)
  np.testing.assert_array_equal(bits(out), bits(host))
  np.testing.assert_array_equal(bits(y), bits(host))
  assert tm.gated == (max_kv_wait_s > 0)
  assert len(waits) == (3 * 3 if tm.gated else 0)  # 3 moves of 4 pieces
  if not tm.gated:  # D2H: every piece cut (and its copy started) once, before any is read;
    assert len(started) == 4  # the D2D goes whole (pieces would only add cuts and a join)


def test_gate_off_moves_a_page_locked_source_in_one_copy(topo, monkeypatch):
  """Gate off: an H2D from page-locked memory is one copy (it fills the link alone, record 6),
  from pageable memory it goes in pieces; both arrive whole."""
  from dualpath_jax.runtime import traffic
  from dualpath_jax.transfer import pinned_memory
  pe = topo.prefill_engines[0]
  host = random_layer_kv(num_blocks=4)  # 16 rows of 64 bytes
  locked = pinned_memory.allocate(host.nbytes, "jax_pinned").view(host.dtype).reshape(host.shape)
  locked[:] = host
  copies = []
  put = traffic.host_device.host_to_device
  monkeypatch.setattr(traffic.host_device, "host_to_device",
                      lambda a, *args, **kw: copies.append(a.shape[0]) or put(a, *args, **kw))
  tm = TrafficManager(pe, config=TrafficConfig(chunk_bytes=256, max_kv_wait_s=0.0))
  for source, pieces in ((locked, [16]), (host, [4, 4, 4, 4])):
    copies.clear()
    np.testing.assert_array_equal(bits(tm.h2d(source)), bits(host))
    assert copies == pieces


def test_kv_moves_wait_for_model_steps(topo):
  pe = topo.prefill_engines[0]
  tm = TrafficManager(pe, config=TrafficConfig(max_kv_wait_s=5.0))
  in_step, done = threading.Event(), []

  def step():
    with tm.model_step():
      in_step.set()
      time.sleep(0.2)
      done.append("step")

  thread = threading.Thread(target=step)
  thread.start()
  in_step.wait()
  tm.h2d(np.ones((4, 4), np.float32))
  done.append("kv")
  thread.join()
  assert done == ["step", "kv"] and tm.kv_wait_s > 0.1
  with tm.model_step():  # a step's own KV pull goes at once instead of deadlocking
    tm.h2d(np.ones((4, 4), np.float32))


def test_kv_waits_for_the_running_step_only(topo):
  """Back-to-back steps leave no instant without a step; a KV piece still goes once the step
  that was running when it arrived ends, not after all of them."""
  pe = topo.prefill_engines[0]
  tm = TrafficManager(pe, config=TrafficConfig(max_kv_wait_s=30.0))
  started, log = threading.Event(), []

  def steps():
    for i in range(8):
      with tm.model_step():
        started.set()
        time.sleep(0.05)
        log.append(f"step{i}")

  thread = threading.Thread(target=steps)
  thread.start()
  started.wait()
  tm.h2d(np.ones((4, 4), np.float32))
  log.append("kv")
  thread.join()
  assert log.index("kv") < log.index("step7"), log


def test_pinned_staging_path(topo):
  """The GPU H2D path (stage into pinned_host, then device), run where CPU offers the kind."""
  engine = topo.decode_engines[1]
  if not has_pinned_host(engine.replicated_sharding):
    pytest.skip("no pinned_host memory kind on this backend")
  host = random_layer_kv(seed=3)
  x = host_to_device(host, engine, staging="pinned")
  assert x.sharding.memory_kind == "device" and x.devices() == set(engine.devices)
  np.testing.assert_array_equal(bits(x), bits(host))
  with pytest.raises(ValueError, match="staging"):
    host_to_device(host, engine, staging="rdma")


@pytest.mark.parametrize("staging", ["direct", "pinned", "auto"])
def test_device_to_host_stagings_give_the_same_bytes(topo, staging):
  host = random_layer_kv(num_blocks=4)
  x = host_to_device(host, topo.decode_engines[0])
  out = np.zeros_like(host)
  assert device_to_host(x, out, staging=staging) is out
  np.testing.assert_array_equal(bits(out), bits(host))
  fresh = device_to_host(x, staging=staging)
  np.testing.assert_array_equal(bits(fresh), bits(host))
  fresh[...] = 0  # the result is the caller's: writing it leaves the device array as it was
  np.testing.assert_array_equal(bits(x), bits(host))
  with pytest.raises(ValueError, match="staging"):
    device_to_host(x, staging="rdma")


def test_device_to_host_fills_a_shorter_out_from_the_leading_entries(topo):
  host = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
  x = host_to_device(host, topo.decode_engines[0])
  out = np.zeros((2, 4, 3), np.float32)
  assert device_to_host(x, out, axis=1) is out
  np.testing.assert_array_equal(out, host[:, :4])
  with pytest.raises(ValueError, match="shorter along axis 1"):
    device_to_host(x, np.zeros((2, 7, 3), np.float32), axis=1)
  with pytest.raises(ValueError, match="out"):
    device_to_host(x, np.zeros((2, 4, 3), np.float32))  # no axis: shapes must match
  tm = TrafficManager(topo.decode_engines[0], config=TrafficConfig(chunk_bytes=40))
  out[:] = 0
  tm.d2h(x, out=out, axis=1)  # chunked along axis 0
  np.testing.assert_array_equal(out, host[:, :4])
  with pytest.raises(ValueError, match="axis"):
    tm.d2h(x, out=out, axis=0)
