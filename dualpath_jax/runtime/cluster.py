"""The disaggregated runtime on one host: engines, nodes, links, buffers and the scheduler.

`Cluster` builds the prefill and decode meshes from the topology, one storage link and one host
buffer per node, one traffic manager per engine, a PE group (leader thread + one shard per PE
engine) per prefill node and a worker thread per DE (each engine with its own copy of the model on
its devices). `submit` hands a turn to the global scheduler, which places it (PE, DE, read side),
reserves host-buffer room, queues its reads and hands it to its PE group; the group prefills it in
one or more lock-step forwards and hands it to its DE; the DE ends it once its blocks persist.
"""

from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.engines.topology import build_topology
from dualpath_jax.kvstore import host_copy
from dualpath_jax.kvstore.block_store import KVBlockStore
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.model.prefill import pow2_at_least
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.decode_worker import DecodeWorker
from dualpath_jax.runtime.global_scheduler import GlobalScheduler
from dualpath_jax.runtime.host_buffer import HostBuffer
from dualpath_jax.runtime.prefill_group import PrefillGroup
from dualpath_jax.runtime.prefill_shard import PrefillShard
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.runtime.storage_link import StorageLink, StorageLinkConfig
from dualpath_jax.runtime.traffic import TrafficConfig, TrafficManager
from dualpath_jax.scheduler.quota import CostModel
from dualpath_jax.transfer import pinned_memory
from dualpath_jax.transfer.device_move import make_mover

ADMIT_BUCKETS_PER_OCTAVE = 8
"""A prompt's KV sits in the DE buffer, and moves onto the DE, padded to one of this many page
counts per power of two (at most 12.5% padding): a bounded number of compiled page writes. (A
power of two, as before, moved up to twice the prompt's bytes over H2D: 41 GB of H2D for 16 GB of
reads in a 2P2D run on 4x H200.)"""

def admit_tokens(prompt_tokens: int, block_tokens: int) -> int:
  """Whole pages of `block_tokens` for `prompt_tokens`, rounded up to a multiple of
  pow2(pages) / (2 * ADMIT_BUCKETS_PER_OCTAVE) pages; returned in tokens."""
  pages = -(-prompt_tokens // block_tokens)
  step = max(1, pow2_at_least(pages) // (2 * ADMIT_BUCKETS_PER_OCTAVE))
  return -(-pages // step) * step * block_tokens


BETA_PROBE_TOKENS = 512
"""beta's prefill rate is the cost model's at this many new tokens on half the longest context."""


class Cluster:
  """PEs and DEs on separate meshes of this host's devices, sharing one KV block store."""

  def __init__(self, runtime_config: RuntimeConfig, model, store: KVBlockStore, layout: KVLayout,
               *, cost_model: CostModel, on_turn_done=None, devices=None):
    self.runtime_config = runtime_config
    self.layout = layout
    self.store = store
    self.topology = build_topology(runtime_config.topology, devices)
    per_node = {n.node_id: n for n in self.topology.nodes}
    self.links = {i: StorageLink(store, node_id=i, config=StorageLinkConfig(
        link_bytes_per_s=runtime_config.link_bytes_per_s)) for i in per_node}
    # Page-locked node buffers get their whole capacity at once (an arena: page-locking per
    # block was slow), leased so that the job's next cluster reuses it (returned in close()).
    memory = runtime_config.host_memory
    self._arenas = {}
    self.arena_lease_s = {}
    """Per node: seconds taken to lease its buffer's arena (page-locked kinds only)."""
    for i, node in per_node.items():
      if memory != "numpy":
        t0 = time.perf_counter()
        self._arenas[i] = (pinned_memory.lease(runtime_config.host_buffer_bytes, memory,
                                               node.engines[0].devices[0]),
                           node.engines[0].devices[0])
        self.arena_lease_s[i] = time.perf_counter() - t0
    self.buffers = {i: HostBuffer(
        host_buffer_bytes=runtime_config.host_buffer_bytes,
        full_block_bytes=layout.full_block_bytes, node_id=i,
        allocate=functools.partial(pinned_memory.allocate, kind=memory,
                                   device=node.engines[0].devices[0]),
        arena_memory=self._arenas[i][0] if i in self._arenas else None)
        for i, node in per_node.items()}
    mover = make_mover(runtime_config.mover)
    traffic_config = TrafficConfig(chunk_bytes=runtime_config.kv_chunk_bytes,
                                   max_kv_wait_s=float(runtime_config.kv_max_wait_s),
                                   h2d_staging=runtime_config.h2d_staging,
                                   d2h_staging=runtime_config.d2h_staging)
    self.traffic = {e.name: TrafficManager(e, mover=mover, config=traffic_config)
                    for e in self.topology.engines}
    self._on_turn_done = on_turn_done
    self._zeros: dict = {}
    self._lock = threading.Lock()
    self.cost_model = cost_model
    bt = layout.block_tokens
    self.decode_pool_bytes = (runtime_config.decode_batch_size * -(
        -runtime_config.max_context_tokens // bt) * layout.full_block_bytes)
    """Device memory of one DE's page pool for KV (what the DE selection's memory rule sees)."""
    probe_cached = runtime_config.max_context_tokens // 2
    self.scheduler = GlobalScheduler(self, prefill_tokens_per_s=BETA_PROBE_TOKENS / max(
        cost_model.predict([(probe_cached, BETA_PROBE_TOKENS)]), 1e-9))
    self.prefill_shards = [PrefillShard(self, e, jax.device_put(model, e.replicated_sharding))
                           for e in self.topology.prefill_engines]
    nodes = sorted({e.node_id for e in self.topology.prefill_engines})
    self.prefill_groups = {n: PrefillGroup(self, [s for s in self.prefill_shards
                                                  if s.engine.node_id == n], cost_model,
                                           node_id=n) for n in nodes}
    self.decode_workers = [DecodeWorker(self, e, jax.device_put(model, e.replicated_sharding))
                           for e in self.topology.decode_engines]
    for worker in [*self.prefill_groups.values(), *self.decode_workers]:
      worker.start()

  def describe(self) -> str:
    c = self.runtime_config
    return (f"{c.mode} on {self.topology.config.name} ({len(self.topology.nodes)} nodes); "
            f"{self.scheduler.describe()}; batching={c.batching}; links: "
            f"{self.links[0].describe()}; mover: {c.mover}")

  def admit_tokens(self, prompt_tokens: int) -> int:
    """Token rows of a prompt's KV array in the DE buffer (module function admit_tokens)."""
    return admit_tokens(prompt_tokens, self.layout.block_tokens)

  def read_rows(self, num_blocks: int, *, both_sides: bool) -> int:
    """Token rows of one side's read KV in its node buffer (PrefillShard._begin): a hit read on
    one side is padded to one of a few lengths, so that the PE pads and stacks it on the device
    with a handful of compiled programs; a hit read on both sides keeps its exact length (its
    halves are joined on the device)."""
    tokens = num_blocks * self.layout.block_tokens
    if both_sides or not tokens:
      return tokens
    return min(self.admit_tokens(tokens), pow2_at_least(tokens, self.layout.block_tokens))

  def read_bytes(self, num_blocks: int, *, both_sides: bool) -> int:
    """Node-buffer bytes of one side's read (read_rows of every layer's KV)."""
    return self.read_rows(num_blocks, both_sides=both_sides) * self.layout.kv_bytes_per_token

  def decode_bytes_for(self, tokens: int) -> int:
    """DE page-pool bytes a sequence of `tokens` occupies (whole pages)."""
    bt = self.layout.block_tokens
    return -(-tokens // bt) * self.layout.full_block_bytes

  def prefill_group_of(self, engine) -> PrefillGroup:
    return self.prefill_groups[engine.node_id]

  def zeros_on(self, engine, shape: tuple[int, ...]) -> jax.Array:
    """A cached zeros array on `engine` (the oracle's uninitialised KV; an empty prefix)."""
    key = (engine.name, shape)
    with self._lock:
      if key not in self._zeros:
        self._zeros[key] = jax.device_put(jnp.zeros(shape, self.layout.np_dtype),
                                          engine.replicated_sharding)
      return self._zeros[key]

  def submit(self, request: TurnRequest) -> None:
    """Hands a turn to the global scheduler (placement, reads, then its PE group)."""
    self.scheduler.submit(request)

  def prepare_prompt_kv(self, request: TurnRequest) -> None:
    """The request's prompt-KV array in its DE node buffer ([L, admit_tokens, 2, H, D]): padded
    to whole pages (admit_tokens) so that the DE moves it as it is; the tail is zeros, which
    masked attention slots need (model/paged.py). Its reads and the PE's sends fill the rest."""
    layout = self.layout
    rows = self.admit_tokens(request.prompt_tokens)
    request.prompt_kv = request.de_reservation.empty(
        (layout.num_layers, rows, *layout.token_kv_shape), layout.np_dtype)
    request.prompt_kv[:, request.prompt_tokens:] = 0

  def read_destination(self, request: TurnRequest, side: str, num_blocks: int
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Where one side's read lands: a uint8 [L, read_rows, W] array in the side's reservation,
    layer-major (every layer's prefix side by side, padded to read_rows with zeros, so that a
    layer goes H2D as it lies), and each block's [L, B, W] view of it, which the store writes
    into (KVBlockStore.read_blocks_into: no array a block, no copy to land it)."""
    layout = self.layout
    rows = self.read_rows(num_blocks, both_sides=len(request.read_reservations) > 1)
    out = request.read_reservations[side].empty((rows * layout.kv_bytes_per_token,), np.uint8)
    raw = layout.landing_rows(num_blocks, out, rows)
    bt = layout.block_tokens
    return raw, [raw[:, i * bt:(i + 1) * bt] for i in range(num_blocks)]

  def land_read(self, request: TurnRequest, side: str, raw: np.ndarray, blocks) -> np.ndarray:
    """One side's read once it has left the link (on the link's worker, not the PE's thread:
    until 2026-11-28 `PrefillShard` landed reads at the start of each forward, 'begin' 1.3 s of a
    7.5 s 1P1D dualpath job, 2x H200, docs/perf/gpu_bench.md record 6): checks that every block
    arrived in `raw` (read_destination) and copies the DE-read part into the prompt KV
    (prepare_prompt_kv), which the DE admits. Returns the landed [L, read_rows, 2, H, D]."""
    if any(b is None for b in blocks):
      raise RuntimeError(f"{request.agent_id} turn {request.turn}: a hit block could not be "
                         "read back; the runtime does not yet re-plan a shrunken hit")
    layout = self.layout
    kv = raw.view(layout.np_dtype).reshape(layout.num_layers, -1, *layout.token_kv_shape)
    if side == "de" and request.prompt_kv is not None:
      start = request.read_split[0] * layout.block_tokens
      host_copy.copy(request.prompt_kv[:, start:request.hit_tokens].view(np.uint8),
                     kv[:, :request.hit_tokens - start].view(np.uint8))
    return kv

  def read_done(self, request: TurnRequest) -> None:
    """A read of `request` completed (called on the link's thread)."""
    if request.reads_done():
      request.times["read_done"] = time.perf_counter()
    pe = self.topology.prefill_engines[request.prefill_engine]
    self.prefill_group_of(pe).wake()
    self.scheduler.poke()  # a read queue got shorter

  def on_turn_done(self, request: TurnRequest) -> None:
    if request.de_reservation is not None:
      request.de_reservation.release()
    request.release_reads()
    self.scheduler.turn_done(request)
    if self._on_turn_done is not None:
      self._on_turn_done(request)

  def bytes_by_path(self) -> dict[str, int]:
    total: dict[str, int] = {}
    for tm in self.traffic.values():
      for path, nbytes in tm.bytes_by_path.items():
        total[path] = total.get(path, 0) + nbytes
    return total

  def close(self) -> None:
    for worker in [*self.prefill_groups.values(), *self.decode_workers]:
      worker.stop()
    for group in self.prefill_groups.values():
      group.close()
    for worker in self.decode_workers:
      worker.join(timeout=10)
    for link in self.links.values():
      link.close()
    # Drop the device state now: workers, shards and the cluster refer to each other, so without
    # this their model copies and page pools lived until Python's cycle collector ran, and a job's
    # next runs stacked new copies on top (out of memory on a 7B model's DE, 4x H200).
    for engine in [*self.decode_workers, *self.prefill_shards]:
      engine.release_device_memory()
    self._zeros.clear()
    arenas, self._arenas = self._arenas, {}
    for memory, device in arenas.values():  # every worker has stopped: the arenas are free
      pinned_memory.give_back(memory, self.runtime_config.host_memory, device)

  def host_buffer_stats(self) -> dict[int, dict]:
    """Per node: HostBuffer.stats() and the seconds its arena's lease took."""
    return {i: dict(b.stats(), arena_lease_s=self.arena_lease_s.get(i, 0.0))
            for i, b in self.buffers.items()}
