"""The disaggregated runtime: same tokens as a full recompute (whole or chunked prefill, reads on
either side or split across both), reads split between the two sides without changing their
total, persisted blocks hit on the next turn, bounded PE residency, KV that lands on the
destination mesh, an I/O-free oracle, clear start-up errors, and no leaked buffers."""

import jax
import numpy as np
import pytest
import tensorstore as ts

from dualpath_jax.engines.topology import TopologyConfig
from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec, chain_block_hashes
from dualpath_jax.model import get_preset, weights
from dualpath_jax.runtime import offline
from dualpath_jax.runtime.cluster import Cluster
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.offline import run_offline, run_reference
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.tasks.trained import load_trained
from dualpath_jax.workload import simple_trajectories

# A fixed cost model (not a profile): what the batch selector predicts is then deterministic.
COST = CostModel(fixed_s=1e-3, per_token_s=2e-6, per_attention_s=3e-9)
RUNS = {  # run name -> RuntimeConfig switches
    "basic": dict(mode="basic"),
    "dualpath": dict(mode="dualpath"),
    "oracle": dict(mode="oracle"),
    # Reads split across both sides (beyond the paper).
    "split": dict(mode="dualpath", split_reads=True),
    # A quota below one first-turn prompt's predicted time: chunked prefill.
    "chunked": dict(mode="dualpath", compute_quota_s=1.5e-3),
    # The same with the priority gate off and the DE path staging a forward's layers at its
    # start (runtime.de_path_h2d 'forward'; gated, moves stay per layer).
    "chunked-ungated": dict(mode="dualpath", compute_quota_s=1.5e-3, kv_max_wait_s=0.0,
                            de_path_h2d="forward"),
    # Whole-prompt loading with chunks: later chunks reload the prefix from the DE buffer.
    "basic-chunked": dict(mode="basic", token_budget=128),
    "basic-dualpath-scheduler": dict(mode="basic", scheduler="dualpath"),
    # The diagnostic route: DE-read KV goes from the DE node's buffer straight onto the PE.
    "de-direct": dict(mode="dualpath", de_read_route="pe_host_link"),
}

MAX_CONTEXT = 1024
LINK_BYTES_PER_S = 5e5  # slow enough that read queues build up, so dualpath reads on both sides
TOPOLOGIES = {
    "2P2D": TopologyConfig(num_prefill_engines=2, num_decode_engines=2),
    "1P3D": TopologyConfig(num_prefill_engines=1, num_decode_engines=3),
    "2P2D-shared-nodes": TopologyConfig(num_prefill_engines=2, num_decode_engines=2,
                                        engines_per_node=2),
    "1P1D": TopologyConfig(num_prefill_engines=1, num_decode_engines=1),
}
READ_PATHS = ("store_read_pe_side", "store_read_de_side")


# --- shared set-up (module scope: one model, one store, compiles reused) ---------------------------

@pytest.fixture(scope="module")
def cfg():
  return get_preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def model(cfg):
  # The recall-trained checkpoint: its tokens depend on far-back context, so equality with the
  # recompute checks the loaded KV (tests/test_recall_runtime.py shows a corrupt block breaks it).
  trained = load_trained("tiny")
  assert trained.config == cfg
  return trained


@pytest.fixture(scope="module")
def layout(cfg):
  return KVLayout.for_model(cfg)


@pytest.fixture(scope="module")
def store(layout):
  return KVBlockStore.open(StoreSpec(driver="memory", path="x"), layout, context=ts.Context())


@pytest.fixture(scope="module")
def trajs(cfg):
  return simple_trajectories(agents=4, turns=3, first_append_tokens=300, append_tokens=100,
                             gen_tokens=8, vocab_size=cfg.vocab_size)


@pytest.fixture(scope="module")
def reference(model, trajs):
  return run_reference(model, trajs, MAX_CONTEXT)


def _run_capturing_cluster(rc, model, store, layout, trajs, prefix):
  """run_offline, plus the Cluster it built (for its host buffers, which the run doesn't expose)."""
  clusters = []

  class RecordingCluster(Cluster):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      clusters.append(self)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(offline, "Cluster", RecordingCluster)
    run = run_offline(rc, model, store, layout, trajs, cost_model=COST, namespace_prefix=prefix)
  (cluster,) = clusters
  return run, cluster


@pytest.fixture(scope="module")
def runs(model, store, layout, trajs):
  """(mode, topology name) -> (OfflineRun, Cluster); each run once, in its own namespace."""
  cache = {}

  def get(mode, topo):
    if (mode, topo) not in cache:
      rc = RuntimeConfig(**RUNS[mode], topology=TOPOLOGIES[topo],
                         link_bytes_per_s=LINK_BYTES_PER_S, max_context_tokens=MAX_CONTEXT)
      cache[mode, topo] = _run_capturing_cluster(rc, model, store, layout, trajs,
                                                 f"{mode}-{topo}-")
    return cache[mode, topo]

  return get


def prompts_of(trajs, generated):
  """(agent, turn) -> prompt token list, rebuilt from the appends and the generated tokens."""
  prompts = {}
  for t in trajs:
    context = []
    for k, turn in enumerate(t.turns):
      prompts[t.agent_id, k] = context + turn.append_ids.tolist()
      context = prompts[t.agent_id, k] + generated[t.agent_id, k]
  return prompts


def turn_bytes_total(run, path):
  return sum(r["bytes"].get(path, 0) for r in run.turns)


# --- 1. outputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, topo", [
    ("basic", "2P2D"), ("basic", "1P3D"), ("dualpath", "2P2D"), ("dualpath", "1P3D"),
    ("dualpath", "2P2D-shared-nodes"), ("split", "2P2D"), ("chunked", "2P2D-shared-nodes"),
    ("chunked-ungated", "2P2D-shared-nodes"),
    ("basic-chunked", "2P2D"), ("basic-dualpath-scheduler", "2P2D"), ("de-direct", "2P2D")])
def test_generated_tokens_match_full_recompute(runs, reference, trajs, mode, topo):
  run, _ = runs(mode, topo)
  assert len(run.turns) == sum(len(t.turns) for t in trajs)
  assert set(run.generated) == set(reference)
  for key, tokens in reference.items():
    assert run.generated[key] == tokens, key
    assert len(tokens) == trajs[0].turns[0].gen_tokens


# --- 2. read paths -------------------------------------------------------------------------------

def test_de_side_reads_replace_pe_side_reads_byte_for_byte(runs):
  basic, _ = runs("basic", "2P2D")
  dual, _ = runs("dualpath", "2P2D")
  assert basic.bytes["store_read_de_side"] == 0
  assert basic.bytes["store_read_pe_side"] > 0
  assert dual.bytes["store_read_de_side"] > 0, [
      (r["agent"], r["turn"], r["prefill_engine"], r["read_side"], r["times_s"].get("ready"),
       r["times_s"].get("read_done")) for r in dual.turns]
  assert basic.bytes["store_read_pe_side"] == (dual.bytes["store_read_pe_side"]
                                               + dual.bytes["store_read_de_side"])
  # Same trajectories, same tokens: the same blocks are persisted either way.
  assert basic.bytes["store_write"] == dual.bytes["store_write"] > 0
  # The diagnostic route leaves the DE's GPU out: DE-side reads, no D2D.
  direct, _ = runs("de-direct", "2P2D")
  assert direct.bytes["store_read_de_side"] > 0 and dual.bytes["d2d"] > 0
  assert direct.bytes["d2d"] == 0


@pytest.mark.parametrize("mode", ["basic", "dualpath", "split"])
def test_turn_bytes_sum_to_run_bytes_and_match_read_side(runs, layout, mode):
  run, _ = runs(mode, "2P2D")
  for path in READ_PATHS + ("store_write", "d2d"):
    assert turn_bytes_total(run, path) == run.bytes[path], path
  for r in run.turns:
    pe_bytes = r["bytes"].get("store_read_pe_side", 0)
    de_bytes = r["bytes"].get("store_read_de_side", 0)
    hit_bytes = r["hit_tokens"] // layout.block_tokens * layout.full_block_bytes
    assert pe_bytes + de_bytes == hit_bytes, r
    assert (r["read_blocks"]["pe"] * layout.full_block_bytes,
            r["read_blocks"]["de"] * layout.full_block_bytes) == (pe_bytes, de_bytes), r
    assert r["read_side"] in ("pe", "de", "split", "none"), r
    if r["read_side"] == "none":
      assert r["hit_tokens"] == 0 and pe_bytes == de_bytes == 0, r
    elif r["read_side"] == "pe":
      assert de_bytes == 0 < pe_bytes, r
    elif r["read_side"] == "de":
      assert mode != "basic" and pe_bytes == 0 < de_bytes, r
    else:
      assert mode == "split" and pe_bytes > 0 and de_bytes > 0, r
  if mode == "split":  # with both queues empty a read is split in halves
    assert any(r["read_side"] == "split" for r in run.turns)


@pytest.mark.parametrize("mode, topo", [("chunked", "2P2D-shared-nodes"),
                                        ("chunked-ungated", "2P2D-shared-nodes"),
                                        ("basic-chunked", "2P2D")])
def test_chunked_prefill_splits_turns_and_conserves_tokens(runs, mode, topo):
  run, _ = runs(mode, topo)
  assert any(r["prefill_chunks"] > 1 for r in run.turns)
  assert all(r["prefill_chunks"] >= 1 for r in run.turns)
  dual, _ = runs("dualpath", "2P2D")
  assert sum(r["new_tokens"] for r in run.turns) == sum(r["new_tokens"] for r in dual.turns)


def test_every_forward_is_recorded_per_shard(runs):
  run, cluster = runs("chunked", "2P2D-shared-nodes")
  (group,) = cluster.prefill_groups.values()
  assert len(group.shards) == 2
  forwards = run.forwards[group.node_id]
  assert forwards and all(len(f) == 2 for f in forwards)
  assert all(f[0] is not None or f[1] is not None for f in forwards)
  # A shard's forward holds at most max_batch_requests chunks: at least this many forwards.
  busy = sum(shard is not None for f in forwards for shard in f)
  assert busy * cluster.runtime_config.max_batch_requests >= sum(
      r["prefill_chunks"] for r in run.turns)
  for f in forwards:
    for shard in f:
      if shard is not None:
        predicted, measured = shard
        assert predicted > 0 and measured > 0


@pytest.mark.parametrize("path", ["h2d", "d2h"])
def test_turn_device_bytes_sum_to_run_bytes(runs, path):
  run, _ = runs("dualpath", "2P2D")
  assert turn_bytes_total(run, path) == run.bytes[path]


# --- 3. persistence ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["basic", "dualpath"])
def test_blocks_persisted_in_one_turn_hit_in_the_next(runs, store, layout, trajs, mode):
  topo = "2P2D"
  run, _ = runs(mode, topo)
  bt = layout.block_tokens
  prompts = prompts_of(trajs, run.generated)
  by_key = {(r["agent"], r["turn"]): r for r in run.turns}
  for (agent, k), r in by_key.items():
    assert r["prompt_tokens"] == len(prompts[agent, k])
    if k == 0:
      assert r["hit_tokens"] == 0  # agents never share KV
      continue
    prev = by_key[agent, k - 1]
    with_kv = prev["prompt_tokens"] + prev["gen_tokens"] - 1  # the last token is never fed back
    expected = min(with_kv // bt * bt, (r["prompt_tokens"] - 1) // bt * bt)
    assert r["hit_tokens"] == expected > 0, r
    assert r["new_tokens"] == r["prompt_tokens"] - r["hit_tokens"]
  for t in trajs:
    last = len(t.turns) - 1
    final = prompts[t.agent_id, last] + run.generated[t.agent_id, last][:-1]
    hashes = chain_block_hashes(np.array(final, np.int32), bt)
    assert store.longest_prefix(f"{mode}-{topo}-{t.agent_id}", hashes) == len(hashes) > 0


# --- 4. PE residency -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_layers():
  """A 4-layer tiny model (more layers than a PE holds at once), its store and 2 short agents."""
  cfg4 = get_preset("tiny", dtype="float32", num_layers=4)
  layout4 = KVLayout.for_model(cfg4)
  store4 = KVBlockStore.open(StoreSpec(driver="memory", path="x"), layout4, context=ts.Context())
  small = simple_trajectories(agents=2, turns=2, first_append_tokens=200, append_tokens=70,
                              gen_tokens=6, vocab_size=cfg4.vocab_size, seed=1)
  return cfg4, weights.init_random(cfg4, 1), layout4, store4, small


@pytest.fixture(scope="module")
def four_layer_runs(four_layers):
  cfg4, model4, layout4, store4, small = four_layers
  out = {}
  for name, mode, in_flight, memory in (
      ("basic", "basic", 3, "numpy"), ("dualpath", "dualpath", 3, "numpy"),
      ("dualpath_2_in_flight", "dualpath", 2, "numpy"),
      ("dualpath_jax_pinned", "dualpath", 3, "jax_pinned")):
    rc = RuntimeConfig(mode=mode, topology=TOPOLOGIES["1P1D"], max_context_tokens=512,
                       prefill_layers_in_flight=in_flight, host_memory=memory,
                       host_buffer_bytes=64 << 20)
    out[name] = run_offline(rc, model4, store4, layout4, small, cost_model=COST,
                            namespace_prefix=f"l4-{name}-")
  return cfg4, out


def test_layerwise_prefill_holds_a_few_layers_on_the_pe(four_layer_runs):
  from dualpath_jax.runtime.prefill_shard import LAYERS_IN_FLIGHT
  cfg4, out = four_layer_runs
  assert any(r["hit_tokens"] for r in out["dualpath"].turns)
  assert LAYERS_IN_FLIGHT < cfg4.num_layers
  assert 1 <= out["dualpath"].max_prefix_layers_on_pe <= LAYERS_IN_FLIGHT
  # The baseline loads the whole prefix before prefill: every layer at once.
  assert out["basic"].max_prefix_layers_on_pe == cfg4.num_layers == 4
  assert out["basic"].generated == out["dualpath"].generated
  # runtime.prefill_layers_in_flight sets the bound; the outputs stay the same.
  assert 1 <= out["dualpath_2_in_flight"].max_prefix_layers_on_pe <= 2
  assert out["dualpath_2_in_flight"].generated == out["dualpath"].generated
  with pytest.raises(ValueError, match="prefill_layers_in_flight"):
    RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["1P1D"], prefill_layers_in_flight=1)


def test_de_path_h2d_forward_stages_every_layer_before_the_first_d2d(four_layers, monkeypatch):
  """runtime.de_path_h2d: 'forward' puts every layer of a DE-path region on the DE device before
  its first D2D to the PE (an H2D onto a decoding GPU waits for the step in flight, so they wait
  together); 'per_layer' moves one layer H2D then D2D. The same tokens either way."""
  import threading

  from dualpath_jax.runtime.traffic import TrafficManager
  _, model4, layout4, store4, small = four_layers
  events = []
  real_h2d, real_d2d = TrafficManager.h2d, TrafficManager.d2d

  def h2d(self, host, dst=None):
    if self.engine.role == "decode" and not threading.current_thread().name.startswith("decode"):
      events.append("de_path_h2d")  # on the PE's thread (the DE's own admissions excluded)
    return real_h2d(self, host, dst)

  def d2d(self, x, dst):
    events.append("d2d")
    return real_d2d(self, x, dst)

  monkeypatch.setattr(TrafficManager, "h2d", h2d)
  monkeypatch.setattr(TrafficManager, "d2d", d2d)
  generated, staged = {}, {}
  # (de_path_h2d, de_path_stage_bytes): 1 byte bounds 'forward' to the layer the loop needs
  for how, bound in (("forward", 0), ("per_layer", 0), ("forward", 1)):
    events.clear()
    rc = RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["1P1D"], max_context_tokens=512,
                       host_buffer_bytes=64 << 20, link_bytes_per_s=LINK_BYTES_PER_S,
                       de_path_h2d=how, de_path_stage_bytes=bound,
                       kv_max_wait_s=0.0)  # gated, moves stay per layer
    run = run_offline(rc, model4, store4, layout4, small, cost_model=COST,
                      namespace_prefix=f"l4-de-path-{how}-{bound}-")
    generated[how, bound], staged[how, bound] = run.generated, run.max_de_staged_bytes
    assert "d2d" in events and run.bytes["d2d"] > 0, how
    first = events.index("d2d")
    # every DE-path layer goes H2D once and on once, in either mode
    assert events.count("d2d") == events.count("de_path_h2d"), how
    if (how, bound) == ("forward", 0):
      assert first >= layout4.num_layers  # the region's 4 layers all staged first
    else:
      assert first == 1
  assert generated["forward", 0] == generated["per_layer", 0] == generated["forward", 1]
  assert staged["per_layer", 0] == 0 < staged["forward", 1] < staged["forward", 0]


def test_de_path_staging_keeps_within_its_bound():
  """PrefillShard._stage_on_de: with runtime.de_path_stage_bytes, a DE holds at most that many
  staged bytes for a forward (the layer needed now always staged), shared by the regions on it,
  topped up as layers are sent on; 0 stages every layer at once."""
  from types import SimpleNamespace

  from dualpath_jax.runtime.prefill_shard import PrefillShard, _StagedRegion

  def shard(bound):
    return SimpleNamespace(cluster=SimpleNamespace(
        runtime_config=SimpleNamespace(de_path_stage_bytes=bound)), _de_staged_bytes={},
        max_de_staged_bytes=0)

  issued = []
  de_tm = SimpleNamespace(engine=SimpleNamespace(name="de0"),
                          h2d=lambda host: issued.append(host) or host)

  def send(s, region, layer):  # what _via_de does around the staging
    PrefillShard._stage_on_de(s, region, de_tm, need=layer)
    assert region.arrays[layer] is not None
    region.arrays[layer] = None
    s._de_staged_bytes["de0"] -= region.layer_bytes

  unbounded = shard(0)
  region = _StagedRegion(lambda layer: ("a", layer), 10, 6)
  send(unbounded, region, 0)
  assert region.next == 6 and unbounded.max_de_staged_bytes == 60 and len(issued) == 6
  # 25 bytes: two 10-byte layers ahead at most, shared by two regions on the same DE
  issued.clear()
  bounded = shard(25)
  a = _StagedRegion(lambda layer: ("a", layer), 10, 6)
  b = _StagedRegion(lambda layer: ("b", layer), 10, 6)
  for layer in range(6):
    for region in (a, b):
      send(bounded, region, layer)
      assert bounded._de_staged_bytes["de0"] <= 25
  assert bounded.max_de_staged_bytes <= 25
  assert sorted(issued) == sorted([("a", l) for l in range(6)] + [("b", l) for l in range(6)])
  assert issued[:2] == [("a", 0), ("a", 1)]  # a staged ahead within the bound, b waited
  # a bound below one layer still stages the layer needed now
  tiny = shard(1)
  c = _StagedRegion(lambda layer: ("c", layer), 10, 3)
  for layer in range(3):
    send(tiny, c, layer)
  assert tiny.max_de_staged_bytes == 10
  with pytest.raises(ValueError, match="runtime.de_path_stage_bytes"):
    RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["1P1D"], de_path_stage_bytes=-1)


def test_host_buffers_in_jax_pinned_memory_give_the_same_outputs(four_layer_runs):
  """runtime.host_memory='jax_pinned': reads land in and leave from pool blocks that are views of
  jax pinned_host arrays (on CPU the same RAM, but the same code path as on a GPU)."""
  _, out = four_layer_runs
  pinned = out["dualpath_jax_pinned"]
  assert any(r["hit_tokens"] for r in pinned.turns)
  assert pinned.generated == out["dualpath"].generated
  # every node buffer carved its blocks out of its arena
  assert all(b["arena"] and b["pool_hits"] > 0 and b["arena_misses"] == 0
             for b in pinned.host_buffers.values())
  assert not any(b["arena"] for b in out["dualpath"].host_buffers.values())
  with pytest.raises(ValueError, match="runtime.host_memory"):
    RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["1P1D"], host_memory="hugepages")


def test_a_failed_layer_send_fails_its_turn_and_the_pe_keeps_serving(model, store, layout,
                                                                     monkeypatch):
  """Layerwise sends run on the shard's sender thread: an error there reaches the turn."""
  from dualpath_jax.runtime import prefill_shard
  bt = layout.block_tokens
  rng = np.random.default_rng(11)
  prompt = rng.integers(0, 100, 3 * bt + 5, dtype=np.int32)
  hashes = chain_block_hashes(prompt, bt)
  blocks = rng.integers(0, 256, (len(hashes), *layout.full_block_shape), dtype=np.uint8)
  store.write_blocks("send-fails", hashes, blocks)
  real_send = prefill_shard.PrefillShard._send_rows
  failing = {"on": True}

  def send(self, *args):
    if failing["on"] and args[-1] == 1:  # layer 1's sends
      raise RuntimeError("injected send failure")
    return real_send(self, *args)

  monkeypatch.setattr(prefill_shard.PrefillShard, "_send_rows", send)
  rc = RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["1P1D"], max_context_tokens=512)
  cluster = Cluster(rc, model, store, layout, cost_model=COST)

  def request(turn):
    return TurnRequest(agent_id="send-fails", turn=turn, prompt=prompt, gen_tokens=2,
                       hashes=hashes, hit_blocks=3, block_tokens=bt)

  try:
    first = request(0)
    cluster.submit(first)
    assert first.done.wait(60)  # a liveness bound, not a timing assert
    assert isinstance(first.error, RuntimeError) and "injected" in str(first.error)
    failing["on"] = False
    second = request(1)
    cluster.submit(second)
    assert second.done.wait(60) and second.error is None
  finally:
    cluster.close()


# --- 5. transfers --------------------------------------------------------------------------------

@pytest.mark.parametrize("mover", ["device_put", "shard_map"])
def test_d2d_lands_on_the_decode_engine(model, store, layout, mover):
  rc = RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["2P2D"], mover=mover,
                     kv_chunk_bytes=1024)  # 4 KiB below: several chunks, joined on the DE
  cluster = Cluster(rc, model, store, layout, cost_model=COST)
  try:
    pe, de = cluster.topology.prefill_engines[1], cluster.topology.decode_engines[0]
    host = np.arange(16 * 64, dtype=np.float32).reshape(16, 64)
    x = jax.device_put(host, pe.replicated_sharding)
    result = cluster.traffic[pe.name].d2d(x, de)
    assert result.sharding.device_set == set(de.devices)
    assert not result.sharding.device_set & set(pe.devices)
    np.testing.assert_array_equal(np.asarray(result), host)
    assert cluster.bytes_by_path()["d2d"] == host.nbytes
  finally:
    cluster.close()


# --- 6. oracle -----------------------------------------------------------------------------------

def test_oracle_touches_no_store_and_records_every_turn(runs, store, layout, trajs):
  run, cluster = runs("oracle", "2P2D")
  assert run.mode == "oracle"
  assert run.jct_s >= 0
  assert all(v == 0 for v in run.bytes.values()), run.bytes
  assert all(r["bytes"] == {} for r in run.turns)
  assert {(r["agent"], r["turn"]) for r in run.turns} == {
      (t.agent_id, k) for t in trajs for k in range(len(t.turns))}
  assert all("done" in r["times_s"] for r in run.turns)
  assert all(link.bytes_read == link.bytes_written == 0 for link in cluster.links.values())
  # Hits come from what earlier turns would have persisted, though nothing was.
  assert all(r["hit_tokens"] > 0 for r in run.turns if r["turn"] > 0)
  for t in trajs:
    prompt = t.turns[0].append_ids
    hashes = chain_block_hashes(prompt, layout.block_tokens)
    assert store.longest_prefix(f"oracle-2P2D-{t.agent_id}", hashes) == 0


# --- 7. bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("topology, field", [
    (TopologyConfig(num_prefill_engines=4, num_decode_engines=5), "num_decode_engines"),
    (TopologyConfig(num_prefill_engines=9, num_decode_engines=1), "num_prefill_engines"),
    (TopologyConfig(num_prefill_engines=2, num_decode_engines=2, devices_per_engine=3),
     "devices_per_engine"),
])
def test_device_split_that_does_not_fit_fails_at_start_up(model, store, layout, trajs, topology,
                                                          field):
  rc = RuntimeConfig(mode="dualpath", topology=topology)
  with pytest.raises(ValueError, match=rf"topology\.{field}.*needs \d+ devices, 8 present"):
    Cluster(rc, model, store, layout, cost_model=COST)
  with pytest.raises(ValueError, match=rf"topology\.{field}"):
    run_offline(rc, model, store, layout, trajs, cost_model=COST, namespace_prefix="never-")


def test_topology_engines_per_node_must_divide_counts():
  with pytest.raises(ValueError, match="topology.engines_per_node"):
    TopologyConfig(num_prefill_engines=1, num_decode_engines=3, engines_per_node=3)


def test_host_buffer_smaller_than_a_full_block_fails_at_start_up(model, store, layout, trajs):
  rc = RuntimeConfig(mode="basic", topology=TOPOLOGIES["1P1D"],
                     host_buffer_bytes=layout.full_block_bytes - 1)
  with pytest.raises(ValueError, match="host_buffer_bytes"):
    Cluster(rc, model, store, layout, cost_model=COST)
  with pytest.raises(ValueError, match="host_buffer_bytes"):
    run_offline(rc, model, store, layout, trajs, cost_model=COST, namespace_prefix="never-")


def test_prompt_larger_than_the_host_buffer_fails_clearly(model, store, layout, trajs):
  # One Full Block holds 64 tokens of KV; the first prompt has 300.
  rc = RuntimeConfig(mode="basic", topology=TOPOLOGIES["1P1D"],
                     host_buffer_bytes=layout.full_block_bytes)
  with pytest.raises(ValueError, match="host_buffer_bytes"):
    run_offline(rc, model, store, layout, trajs, cost_model=COST, namespace_prefix="too-big-")


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, True])
def test_link_rate_must_be_positive(rate):
  with pytest.raises(ValueError, match="link_bytes_per_s"):
    RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["2P2D"], link_bytes_per_s=rate)


@pytest.mark.parametrize("field, value", [("h2d_staging", "rdma"), ("d2h_staging", "dma"),
                                          ("kv_max_wait_s", -0.1), ("kv_max_wait_s", True),
                                          ("de_read_route", "nvlink"), ("de_path_h2d", "ahead"),
                                          ("decode_steps_in_flight", 0),
                                          ("decode_steps_in_flight", True),
                                          ("decode_steps_in_flight", 1.5)])
def test_bad_traffic_settings_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"runtime.{field}"):
    RuntimeConfig(mode="dualpath", topology=TOPOLOGIES["2P2D"], **{field: value})


@pytest.mark.parametrize("mode", ["fast", "Basic", ""])
def test_unknown_mode_is_rejected(mode):
  with pytest.raises(ValueError, match="runtime.mode"):
    RuntimeConfig(mode=mode, topology=TOPOLOGIES["2P2D"])


@pytest.mark.parametrize("field", ["host_buffer_bytes", "decode_batch_size", "max_context_tokens",
                                   "kv_chunk_bytes"])
def test_sizes_must_be_positive_ints(field):
  with pytest.raises(ValueError, match=f"runtime.{field}"):
    RuntimeConfig(mode="basic", topology=TOPOLOGIES["2P2D"], **{field: 0})


# --- 8. host buffers -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, topo", [("basic", "2P2D"), ("dualpath", "2P2D"),
                                        ("dualpath", "1P3D"), ("oracle", "2P2D")])
def test_host_buffers_are_empty_after_a_run(runs, mode, topo):
  run, cluster = runs(mode, topo)
  assert set(cluster.buffers) == {n.node_id for n in cluster.topology.nodes}
  for buffer in cluster.buffers.values():
    assert buffer.used_bytes == 0, buffer.node_id
    assert buffer.peak_bytes <= buffer.capacity_bytes
  de_nodes = {e.node_id for e in cluster.topology.decode_engines}
  pe_nodes = {e.node_id for e in cluster.topology.prefill_engines}
  peaks = {i: b.peak_bytes for i, b in cluster.buffers.items()}
  if mode == "oracle":
    assert all(p == 0 for p in peaks.values())
  else:
    assert all(peaks[i] > 0 for i in de_nodes)  # every DE node held some prompt KV
    assert any(peaks[i] > 0 for i in pe_nodes) == (run.bytes["store_read_pe_side"] > 0)


def test_de_side_read_that_cannot_fit_the_de_buffer_goes_to_the_pe_side(model, store, layout):
  bt = layout.block_tokens
  rng = np.random.default_rng(7)
  prompt = rng.integers(0, 100, 5 * bt + 1, dtype=np.int32)  # 5 hit blocks, 1 token to compute
  hashes = chain_block_hashes(prompt, bt)
  blocks = rng.integers(0, 256, (len(hashes), *layout.full_block_shape), dtype=np.uint8)
  store.write_blocks("big-de-read", hashes, blocks)
  prompt_bytes = len(prompt) * layout.kv_bytes_per_token
  hit_bytes = 5 * layout.full_block_bytes
  # Either reservation fits on its own; together they don't. Round robin: request #1 reads on
  # the DE side, which could never hold both its prompt KV and its hit blocks.
  rc = RuntimeConfig(mode="dualpath", scheduler="roundrobin", topology=TOPOLOGIES["2P2D"],
                     link_bytes_per_s=1e6, host_buffer_bytes=prompt_bytes + hit_bytes - 1,
                     max_context_tokens=512)
  done = []
  cluster = Cluster(rc, model, store, layout, cost_model=COST, on_turn_done=done.append)

  def request(ns, n_hit):
    return TurnRequest(agent_id=ns, turn=0, prompt=prompt, gen_tokens=2, hashes=hashes,
                       hit_blocks=n_hit, block_tokens=bt)

  filler, big = request("big-de-filler", 0), request("big-de-read", 5)
  try:
    cluster.submit(filler)  # #0: the PE side, nothing to read
    cluster.submit(big)  # #1: the DE side by alternation -> moved to the PE side
    for r in (filler, big):
      assert r.done.wait(60) and r.error is None  # a liveness bound, not a timing assert
    assert big.read_split == (5, 0)
  finally:
    cluster.close()


@pytest.mark.parametrize("mode", ["basic", "dualpath"])
def test_every_runtime_d2h_fits_the_cuda_memcpy_geometry(four_layers, monkeypatch, mode):
  """d2h_staging='cuda_memcpy' copies with cudaMemcpy2D (GPUs only). Here the copy is emulated on
  the host from pinned_memory.memcpy2d_geometry and row_geometry (a batch row straight from the
  batch array), byte for byte as cudaMemcpy2D would do it: every D2H the runtime makes (the PE's
  handoff, the DE's persists) must fit that geometry and give the same tokens as 'direct'."""
  from dualpath_jax.transfer import pinned_memory
  calls = []

  def copy2d(x, out, src_offset, height, width, src_pitch, dst_pitch):
    src = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
    start = out.__array_interface__["data"][0]
    base = out
    while base.base is not None and isinstance(base.base, np.ndarray):
      base = base.base
    dst = base.reshape(-1).view(np.uint8)
    offset = start - dst.__array_interface__["data"][0]
    for h in range(height):
      dst[offset + h * dst_pitch:offset + h * dst_pitch + width] = \
          src[src_offset + h * src_pitch:src_offset + h * src_pitch + width]

  def emulated(x, out, axis=None):
    copy2d(x, out, 0, *pinned_memory.memcpy2d_geometry(x.shape, x.dtype, out, axis))
    calls.append(x.shape)
    return out

  def emulated_rows(x, copies, batch_axis):
    for row, out in copies:
      copy2d(x, out, *pinned_memory.row_geometry(x.shape, x.dtype, row, batch_axis, out))
      calls.append(("rows", batch_axis))

  monkeypatch.setattr(pinned_memory, "cuda_copy_to_host", emulated)
  monkeypatch.setattr(pinned_memory, "cuda_copy_rows_to_host", emulated_rows)
  _, model4, layout4, store4, small = four_layers
  generated = {}
  for staging in ("direct", "cuda_memcpy"):
    rc = RuntimeConfig(mode=mode, topology=TOPOLOGIES["1P1D"], max_context_tokens=512,
                       d2h_staging=staging, kv_chunk_bytes=64 << 10)
    generated[staging] = run_offline(rc, model4, store4, layout4, small, cost_model=COST,
                                     namespace_prefix=f"memcpy-{mode}-{staging}-").generated
  assert generated["cuda_memcpy"] == generated["direct"]
  # the PE's handoff went row by row out of its batch arrays (layerwise: one layer's, axis 0)
  assert ("rows", 0 if mode == "dualpath" else 1) in calls and any(c[0] != "rows" for c in calls)


@pytest.mark.parametrize("mode,host_memory,gate_s", [
    ("basic", "numpy", 0.05), ("dualpath", "numpy", 0.05), ("dualpath", "jax_pinned", 0.0)])
def test_precompile_covers_the_pe_row_pads_cuts_and_joins(four_layers, monkeypatch, mode,
                                                          host_memory, gate_s):
  """After PrefillShard.precompile, the timed turns compile no row pad (_pad_to), row cut
  (traffic._row) or join of a move's pieces (gate on: H2D and D2D in pieces; gate off with
  page-locked buffers: whole moves): up to record 6 they compiled inside the timed runs (21-32% of basic's PE samples
  on 2x H200). Precompile compiles the joins on zeros, moving no bytes."""
  from dualpath_jax.runtime import prefill_shard, traffic
  _, model4, layout4, store4, small = four_layers
  sizes = {}

  def cache_sizes():
    return (prefill_shard._pad_to._cache_size(), traffic._row._cache_size(),
            traffic._concatenate._cache_size())

  def progress(message):  # the compiles after this one are inside the timed turns
    if "clock started" in message:
      sizes["at_clock_start"] = cache_sizes()

  rc = RuntimeConfig(mode=mode, topology=TOPOLOGIES["1P1D"], max_context_tokens=512,
                     host_memory=host_memory, kv_max_wait_s=gate_s, kv_chunk_bytes=16 << 10,
                     h2d_staging="direct" if host_memory != "numpy" else "auto")
  run = run_offline(rc, model4, store4, layout4, small, cost_model=COST, primed_turns=1,
                    precompile=True, namespace_prefix=f"precompile-{mode}-{host_memory}-",
                    progress=progress)
  assert run.precompiled["shapes"] and not run.precompiled["skipped"]
  assert sum(r["hit_tokens"] > 0 for r in run.turns) == len(run.turns) > 0
  assert cache_sizes() == sizes["at_clock_start"]
