"""Storage links, host buffers and store traffic: queues, caps, concurrency, bounds."""

import threading
import time

import numpy as np
import pytest

from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.runtime.host_buffer import HostBuffer
from dualpath_jax.runtime.storage_link import LinkPacer, StorageLink, StorageLinkConfig

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=4)


class FakeStore:
  """Blocks in a dict; optional per-read delay and a gate that holds reads until opened."""

  def __init__(self, block_bytes=LAYOUT.full_block_bytes, read_delay_s=0.0):
    self.blocks = {}
    self.block_bytes = block_bytes
    self.read_delay_s = read_delay_s
    self.gate = threading.Event()
    self.gate.set()

  def read_blocks(self, namespace, hashes):
    self.gate.wait()
    time.sleep(self.read_delay_s)
    return [self.blocks.get((namespace, h)) for h in hashes]

  def read_blocks_into(self, namespace, hashes, outs):
    landed = []
    for block, out in zip(self.read_blocks(namespace, hashes), outs):
      if block is not None:
        out[...] = block.reshape(out.shape)
      landed.append(block is not None)
    return landed

  def write_blocks(self, namespace, hashes, blocks):
    for h, b in zip(hashes, blocks):
      self.blocks[(namespace, h)] = np.array(b)
    return len(hashes)

  def fill(self, n, nbytes=None):
    nbytes = nbytes or self.block_bytes
    for i in range(n):
      self.blocks[("ns", f"h{i}")] = np.full(nbytes, i, np.uint8)
    return [f"h{i}" for i in range(n)]


def test_cap_holds_its_rate():
  store = FakeStore()
  hashes = store.fill(10, nbytes=1_000_000)
  rate = 20e6
  with StorageLink(store, node_id=0, config=StorageLinkConfig(link_bytes_per_s=rate)) as link:
    assert "emulates a NIC of 20.0 MB/s" in link.describe()
    t0 = time.perf_counter()
    futures = [link.submit_read("ns", [h], tokens=64) for h in hashes]
    for f in futures:
      f.result()
    elapsed = time.perf_counter() - t0
  assert link.bytes_read == 10_000_000
  # The cap can only slow a link down: never faster than its rate (less the bucket's burst).
  # Its exact pacing is checked on a virtual clock below, not on this machine's wall clock.
  burst = rate * link.config.burst_s
  assert elapsed >= (link.bytes_read - burst) / rate
  assert 0 < link.busy_s <= elapsed
  assert len(link.read_records) == 10


class VirtualClock:
  """A clock that only moves when the code under test sleeps (plus explicit `advance`)."""

  def __init__(self):
    self.now = 0.0
    self.slept_s = 0.0

  def __call__(self):
    return self.now

  def sleep(self, seconds):
    self.slept_s += seconds
    self.now += seconds


def test_link_pacer_paces_bytes_to_its_rate_on_a_virtual_clock():
  clock = VirtualClock()
  rate, burst = 1e6, 5e3
  wire = LinkPacer(rate, burst, clock=clock, sleep=clock.sleep)
  for _ in range(100):
    wire.pay(10_000)  # 1 MB in all
  # Back to back, every byte waits its turn: 1 MB at 1 MB/s is 1 s (the wire starts with no credit).
  assert clock.slept_s == pytest.approx(1.0, rel=1e-9)
  # After idling, at most `burst` bytes go through without waiting.
  clock.now += 10.0
  before = clock.slept_s
  wire.pay(int(burst))
  assert clock.slept_s == before
  wire.pay(10_000)
  assert clock.slept_s - before == pytest.approx(10_000 / rate, rel=1e-9)


def test_link_pacer_overlaps_a_transfers_store_io_with_its_wire_time():
  """A lone transfer takes max(store time, bytes / rate), as a NIC streaming while the storage
  serves; a transfer that began while the wire was busy queues behind it."""
  clock = VirtualClock()
  rate = 1e6
  wire = LinkPacer(rate, 0.0, clock=clock, sleep=clock.sleep)
  clock.now = 5.0
  began = clock.now
  clock.now += 0.3  # the store took 0.3 s for a transfer whose wire time is 1 s
  wire.pay(1_000_000, since=began)
  assert clock.now == pytest.approx(began + 1.0, rel=1e-9)  # not 1.3 s
  began = clock.now
  clock.now += 2.0  # the store took longer than the wire needs: no wait at all
  before = clock.slept_s
  wire.pay(1_000_000, since=began)
  assert clock.slept_s == before
  # Two transfers that began together: the second's wire time starts where the first's ends.
  began = clock.now
  clock.now += 0.1
  wire.pay(500_000, since=began)
  wire.pay(500_000, since=began)
  assert clock.now == pytest.approx(began + 1.0, rel=1e-9)
  # A `since` in the future (clock skew) counts as now: never credit before the transfer began.
  began = clock.now
  wire.pay(1_000_000, since=began + 10.0)
  assert clock.now == pytest.approx(began + 1.0, rel=1e-9)


def test_a_capped_link_starts_the_wire_when_its_store_io_starts():
  """The link pays its wire with the transfer's own start, so store time and wire time overlap
  (the pacing itself is checked on the virtual clock above)."""
  store = FakeStore(read_delay_s=0.05)
  hashes = store.fill(2)
  paid = []
  with StorageLink(store, node_id=0, config=StorageLinkConfig(link_bytes_per_s=1e9)) as link:
    link._read_wire.pay = lambda nbytes, since=None: paid.append((nbytes, since))
    link.submit_read("ns", hashes, tokens=8).result()
  (record,) = link.read_records
  assert paid == [(record.nbytes, record.t_start)]


def test_links_of_two_nodes_overlap():
  store = FakeStore(read_delay_s=0.15)
  hashes = store.fill(2)
  links = [StorageLink(store, node_id=i, config=StorageLinkConfig(workers=1)) for i in range(2)]
  futures = [link.submit_read("ns", hashes, tokens=8) for link in links]
  for f in futures:
    assert all(b is not None for b in f.result())
  (a,), (b,) = (link.read_records for link in links)
  assert max(a.t_start, b.t_start) < min(a.t_end, b.t_end)  # in flight at the same time
  for link in links:
    link.close()


def test_read_queue_tokens_rise_and_drain():
  store = FakeStore()
  hashes = store.fill(3)
  store.gate.clear()
  with StorageLink(store, node_id=0) as link:
    futures = [link.submit_read("ns", hashes[:1], tokens=4),
               link.submit_read("ns", hashes + ["missing"], tokens=16)]
    assert link.read_queue_tokens == 20
    store.gate.set()
    blocks = futures[1].result()
    futures[0].result()
    assert blocks[-1] is None and link.read_queue_tokens == 0
    assert link.bytes_read == 4 * LAYOUT.full_block_bytes
    link.submit_write("ns", ["w0"], np.zeros((1, *LAYOUT.full_block_shape), np.uint8)).result()
    assert link.bytes_written == LAYOUT.full_block_bytes and ("ns", "w0") in store.blocks


def test_a_read_lands_after_leaving_the_link_and_its_landing_error_reaches_the_caller():
  """`then` runs once the link has counted the read (the link is free for the next), its result
  is the future's, and an error it raises comes out of result() with the link's books closed."""
  store = FakeStore()
  hashes = store.fill(2)
  seen = []

  def land(blocks):
    seen.append((link.read_queue_tokens, link.bytes_read))
    return np.stack(blocks).sum()

  with StorageLink(store, node_id=0) as link:
    total = link.submit_read("ns", hashes, tokens=8, then=land).result()
    assert total == np.stack([store.blocks[("ns", h)] for h in hashes]).sum()
    assert seen == [(0, 2 * LAYOUT.full_block_bytes)]  # the link's part was over

    def refuse(blocks):
      raise RuntimeError("no room to land")

    with pytest.raises(RuntimeError, match="no room to land"):
      link.submit_read("ns", hashes, tokens=8, then=refuse).result()
    assert link.read_queue_tokens == 0 and link.bytes_read == 4 * LAYOUT.full_block_bytes


def test_a_read_into_destinations_gives_them_back_and_counts_only_what_landed():
  store = FakeStore()
  hashes = store.fill(2)
  outs = [np.zeros(LAYOUT.full_block_bytes, np.uint8) for _ in range(3)]
  with StorageLink(store, node_id=0) as link:
    got = link.submit_read("ns", hashes + ["missing"], tokens=12, into=outs).result()
  assert got[0] is outs[0] and got[1] is outs[1] and got[2] is None
  assert int(outs[1][0]) == 1 and not outs[2].any()
  assert link.bytes_read == 2 * LAYOUT.full_block_bytes and link.read_queue_tokens == 0


@pytest.mark.parametrize("rate", [0, -5.0])
def test_bad_cap_names_field(rate):
  with pytest.raises(ValueError, match="link_bytes_per_s"):
    StorageLinkConfig(link_bytes_per_s=rate)


def test_host_buffer_bound():
  block = LAYOUT.full_block_bytes
  with pytest.raises(ValueError, match="host_buffer_bytes"):
    HostBuffer(host_buffer_bytes=block - 1, full_block_bytes=block)
  buf = HostBuffer(host_buffer_bytes=3 * block, full_block_bytes=block)
  first = buf.reserve_blocks(2, "r0")
  assert buf.try_reserve(2 * block) is None and buf.used_bytes == 2 * block
  with pytest.raises(ValueError, match="host_buffer_bytes"):
    buf.reserve(4 * block)
  with pytest.raises(TimeoutError):
    buf.reserve(2 * block, timeout_s=0.05)
  with pytest.raises(ValueError, match="do not fit"):
    first.hold(np.zeros((3, *LAYOUT.full_block_shape), np.uint8))
  first.hold(np.zeros((2, *LAYOUT.full_block_shape), np.uint8))
  threading.Timer(0.05, first.release).start()
  with buf.reserve(2 * block, "r1", timeout_s=5) as second:  # waits for r0's release
    assert first.released and second.nbytes == 2 * block
  assert buf.used_bytes == 0 and buf.peak_bytes == 2 * block


def test_reads_and_writes_through_the_real_store():
  """The link and the traffic counters over KVBlockStore on tensorstore's memory driver."""
  from dualpath_jax.engines import TopologyConfig, build_topology
  from dualpath_jax.kvstore import KVBlockStore, StoreSpec, chain_block_hashes
  from dualpath_jax.runtime.traffic import TrafficManager

  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256, (3, *LAYOUT.full_block_shape), dtype=np.uint8)
  hashes = chain_block_hashes(np.arange(3 * LAYOUT.block_tokens), LAYOUT.block_tokens)
  de = build_topology(TopologyConfig(num_prefill_engines=1, num_decode_engines=1)).decode_engines[0]
  tm = TrafficManager(de)
  with KVBlockStore.open(StoreSpec(driver="memory"), LAYOUT) as store, \
      StorageLink(store, node_id=de.node_id) as link:
    tm.write(link, "agent0", hashes, blocks).result()
    got = tm.read(link, "agent0", hashes + ["0" * 32], tokens=4 * LAYOUT.block_tokens,
                  side="de").result()
  assert got[-1] is None
  np.testing.assert_array_equal(np.stack(got[:3]), blocks)
  assert tm.bytes_by_path["store_write"] == tm.bytes_by_path["store_read_de_side"] == blocks.nbytes
  assert tm.bytes_by_link[f"storage:node{de.node_id}"] == 2 * blocks.nbytes


def test_host_buffer_reuses_released_memory_within_its_size_class():
  block = 1 << 12
  buf = HostBuffer(host_buffer_bytes=64 * block, full_block_bytes=block)
  first = buf.reserve(10 * block, "a")
  a = first.empty((10, block), np.uint8)
  a[:] = 1
  address = a.ctypes.data
  with pytest.raises(ValueError, match="do not fit"):
    first.empty((1,), np.uint8)
  first.release()
  with pytest.raises(RuntimeError, match="released"):
    first.empty((1,), np.uint8)
  second = buf.reserve(10 * block - 100, "b")  # the same size class: the same memory
  b = second.empty((10 * block - 100,), np.uint8)
  assert b.ctypes.data == address and (buf.pool_hits, buf.pool_misses) == (1, 1)
  third = buf.reserve(3 * block, "c")  # another class: a fresh block
  c = third.empty((3, block // 2), np.float16)
  assert c.shape == (3, block // 2) and c.dtype == np.float16 and c.ctypes.data != address
  assert buf.pool_misses == 2


def test_host_buffer_pool_stays_within_capacity_plus_rounding():
  block = 1 << 12
  buf = HostBuffer(host_buffer_bytes=16 * block, full_block_bytes=block)
  for n in range(1, 17):  # every size once: each release leaves a free block of its class
    with buf.reserve(n * block, n) as r:
      r.empty((n * block,), np.uint8)
    assert buf._pool_bytes <= 16 * block + 2 * block


def test_link_read_ratios_script_reads_runs_of_links_json(tmp_path):
  """scripts/link_read_ratios.py: read time over wire time per capped run; uncapped runs and
  missing blocks (0 bytes) are left out."""
  import gzip
  import importlib.util
  import json
  import os

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "link_read_ratios.py")
  spec = importlib.util.spec_from_file_location("link_read_ratios", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  doc = {"runs": [
      {"mode": "basic", "link_bytes_per_s": 1e6,
       "nodes": {"0": {"reads": [[0.0, 1.0, 1_000_000], [1.0, 4.0, 1_000_000], [4.0, 5.0, 0]]},
                 "1": {"reads": [[0.0, 2.0, 1_000_000]]}}},
      {"mode": "uncapped", "link_bytes_per_s": None, "nodes": {"0": {"reads": [[0, 1, 5]]}}}]}
  out = tmp_path / "links.json.gz"
  with gzip.open(out, "wt") as f:
    json.dump(doc, f)
  assert module.ratios(str(out)) == [("basic", 3, 1.0, 2.0, 3.0)]
