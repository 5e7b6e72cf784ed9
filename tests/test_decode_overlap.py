"""The DE keeps one decode step in flight: the same tokens as a full recompute while slots are
freed by counting and taken by new requests before the step that ends their last occupant is
read; a failed step fails the turns on the DE and returns their pages; padding slots in the page
table's decode inputs; the engine bench's overlapped step."""

import itertools

import numpy as np
import pytest
import tensorstore as ts

from dualpath_jax.bench import engine, hardware, report
from dualpath_jax.engines.topology import TopologyConfig
from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec, chain_block_hashes
from dualpath_jax.model import get_preset, paged
from dualpath_jax.runtime import offline
from dualpath_jax.runtime.cluster import Cluster
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.decode_worker import DecodeWorker
from dualpath_jax.runtime.offline import run_offline, run_reference
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.tasks.trained import load_trained
from dualpath_jax.workload.synthetic import AgentTrajectory, Turn

MAX_CONTEXT = 512
# Per agent, per turn: forced generation lengths. With two slots, one long turn holds a slot
# while short turns (two of a single token: they never take a slot) queue for the other.
GEN_TOKENS = ((40, 6, 3), (2, 5, 1), (3, 9, 2), (7, 2, 4), (1, 3, 6))


def _trajectories(vocab_size):
  rng = np.random.default_rng(7)
  return [AgentTrajectory(agent_id=f"agent{a}", turns=tuple(
      Turn(append_ids=rng.integers(0, vocab_size, 60 if t == 0 else 20 + 5 * a, dtype=np.int32),
           gen_tokens=gen) for t, gen in enumerate(gens)))
          for a, gens in enumerate(GEN_TOKENS)]


@pytest.mark.parametrize("steps_in_flight", [1, 2, 3])
def test_overlapped_decode_matches_full_recompute_while_slots_turn_over(monkeypatch,
                                                                        steps_in_flight):
  model = load_trained("tiny")
  layout = KVLayout.for_model(model.config)
  store = KVBlockStore.open(StoreSpec(driver="memory", path="x"), layout, context=ts.Context())
  trajs = _trajectories(model.config.vocab_size)
  clusters, admissions = [], []

  class RecordingCluster(Cluster):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      clusters.append(self)

  admit = DecodeWorker._admit

  def recording_admit(self, request, kv):
    # A request whose last token is dispatched but not read: its slot was freed by counting.
    unread = [r for step in self._in_flight for r in step.rows
              if r is not None and r not in self._slots]
    # Admitted only once its prompt KV has landed: no step waits for the copy.
    admissions.append(dict(in_flight=len(self._in_flight), freed_unread=len(unread),
                           landed=kv is not None and kv.is_ready()))
    admit(self, request, kv)

  monkeypatch.setattr(offline, "Cluster", RecordingCluster)
  monkeypatch.setattr(DecodeWorker, "_admit", recording_admit)
  rc = RuntimeConfig(mode="dualpath", topology=TopologyConfig(num_prefill_engines=1,
                                                              num_decode_engines=1),
                     decode_batch_size=2, max_context_tokens=MAX_CONTEXT,
                     decode_steps_in_flight=steps_in_flight)
  run = run_offline(rc, model, store, layout, trajs,
                    cost_model=CostModel(fixed_s=1e-3, per_token_s=2e-6, per_attention_s=3e-9))
  reference = run_reference(model, trajs, MAX_CONTEXT)
  assert set(run.generated) == set(reference)
  for (agent, turn), tokens in reference.items():
    assert run.generated[agent, turn] == tokens, (agent, turn)
    assert len(tokens) == GEN_TOKENS[int(agent[len("agent"):])][turn]
  (cluster,) = clusters
  (worker,) = cluster.decode_workers
  assert len(admissions) == sum(len(g) for g in GEN_TOKENS)
  assert worker.overlapped_admissions == sum(a["in_flight"] > 0 for a in admissions) > 0
  assert any(a["freed_unread"] for a in admissions), admissions
  assert all(a["landed"] for a in admissions), admissions
  assert worker.table.seq_lens == {}  # every page went back
  assert len(worker.table.free_pages) == worker.table.num_pages - 1
  # Steps tile the DE's time: each one starts where the one before it was read, or later.
  records = worker.step_records
  assert records and all(r.start < r.end for r in records)
  assert all(b.start >= a.end for a, b in itertools.pairwise(records))
  assert all(1 <= r.active <= rc.decode_batch_size for r in records)
  # Its parts are host seconds inside the period; most periods dispatch the next step (not
  # those whose rows all ended).
  assert all(r.dispatch_s + r.wait_s + r.admit_s <= r.end - r.start for r in records)
  assert sum(r.dispatch_s > 0 for r in records) > len(records) // 2
  assert all(r.wait_s > 0 for r in records) and sum(r.admit_s > 0 for r in records) > 0
  placements = worker.input_placements
  assert placements["tokens_reused"] > 0 and placements["tokens"] > 0


def test_a_failed_step_fails_every_turn_on_the_de_and_the_de_keeps_serving(monkeypatch):
  """The third step's dispatch raises with the second step in flight: every turn decoding then
  fails, their pages go back, and the DE serves the next turn."""
  model = load_trained("tiny")
  layout = KVLayout.for_model(model.config)
  store = KVBlockStore.open(StoreSpec(driver="memory", path="x"), layout, context=ts.Context())
  greedy = paged.greedy_decode_step_jit
  calls = []

  def failing_greedy(*args):
    calls.append(len(calls))
    if len(calls) == 3:
      raise RuntimeError("injected step failure")
    return greedy(*args)

  monkeypatch.setattr(paged, "greedy_decode_step_jit", failing_greedy)
  rc = RuntimeConfig(mode="dualpath", topology=TopologyConfig(num_prefill_engines=1,
                                                              num_decode_engines=1),
                     decode_batch_size=2, max_context_tokens=MAX_CONTEXT)
  cluster = Cluster(rc, model, store, layout,
                    cost_model=CostModel(fixed_s=1e-3, per_token_s=2e-6, per_attention_s=3e-9))
  rng = np.random.default_rng(3)

  def request(name):
    prompt = rng.integers(0, model.config.vocab_size, 40, dtype=np.int32)
    return TurnRequest(agent_id=name, turn=0, prompt=prompt, gen_tokens=8,
                       hashes=chain_block_hashes(prompt, layout.block_tokens), hit_blocks=0,
                       block_tokens=layout.block_tokens)

  try:
    first = [request("a"), request("b")]
    for r in first:
      cluster.submit(r)
    for r in first:
      assert r.done.wait(60)  # a liveness bound, not a timing assert
    failed = [r for r in first if r.error is not None]
    assert failed and all("injected" in str(r.error) for r in failed)
    (worker,) = cluster.decode_workers
    assert not worker.table.seq_lens and not worker.tm._active_steps
    later = request("c")
    cluster.submit(later)
    assert later.done.wait(60) and later.error is None and len(later.generated) == 8
    assert not worker.table.seq_lens
  finally:
    cluster.close()


def test_prepare_decode_skips_padding_rows():
  table = paged.PageTable.create(num_pages=9, page_tokens=4)
  table = table.allocate("a", 4).allocate("b", 6)
  dense, dense_tables, dense_lens = table.prepare_decode(["a", "b"], batch_size=2, max_pages=3)
  slotted, tables, lens = table.prepare_decode([None, "a", None, "b"], batch_size=5,
                                               max_pages=3)
  np.testing.assert_array_equal(tables[[1, 3]], dense_tables)
  np.testing.assert_array_equal(lens[[1, 3]], dense_lens)
  for row in (0, 2, 4):  # None rows and the rows past the list: padding
    assert lens[row] == 0 and (tables[row] == paged.SCRATCH_PAGE).all()
  assert dict(slotted.seq_lens) == dict(dense.seq_lens) == {"a": 5, "b": 7}
  assert dict(slotted.block_tables) == dict(dense.block_tables)
  all_padding, tables, lens = table.prepare_decode([None, None], batch_size=2, max_pages=3)
  assert all_padding == table and not lens.any() and not tables.any()
  with pytest.raises(ValueError, match="exceed batch_size"):
    table.prepare_decode([None, "a", None], batch_size=2, max_pages=3)
  with pytest.raises(ValueError, match="unknown sequence"):
    table.prepare_decode([None, "c"], batch_size=2, max_pages=3)


def test_engine_decode_row_reports_the_overlapped_step(monkeypatch):
  """A 30-token context in 16-token pages leaves 2 free slots a row: 7 overlapped steps restart
  the growing lengths from the context instead of writing past the block tables."""
  import jax

  config = get_preset("tiny")
  card = hardware.CardSpec(name="cpu", peak_flops=1e12, hbm_bytes_per_s=1e11, source="test")
  lengths = []
  greedy = paged.greedy_decode_step_jit

  def recording_greedy(model, pool, tokens, block_tables, seq_lens):
    lengths.append((np.asarray(seq_lens).max(), block_tables.shape[1] * pool.page_tokens))
    return greedy(model, pool, tokens, block_tables, seq_lens)

  monkeypatch.setattr(paged, "greedy_decode_step_jit", recording_greedy)
  e = engine.measure_engine(
      jax.devices()[0], model_config=config, prefill_contexts=(), append_tokens=16,
      prefill_variants=(), sdpa_implementation=None, decode_batches=(2,), decode_context=30,
      peak_context=0, block_tokens=16, repeats=1, warmup=1, decode_steps=7, card=card,
      target_prefill_mfu=0.4, target_decode_roofline=0.6, log=lambda _: None)
  fixed, row = e["decode"]
  for r in (fixed, row):
    assert "error" not in r, r
    assert r["overlapped_step_s"] > 0 and 0 < r["overlapped_roofline_fraction"] < 2
  assert "overlapped_met" not in fixed and "met" not in fixed  # diagnostic: no target
  assert row["overlapped_met"] == (row["overlapped_roofline_fraction"] >= 0.6)
  assert lengths and all(longest < room for longest, room in lengths)
  assert max(longest for longest, _ in lengths) == 31  # the row's context grew into its slots
  values = [value for _, name, value, _, _ in report.rows({"engine": e}) if "batch 2" in name]
  assert values and "overlapped" in values[0]
