"""The disaggregated runtime on one host: engines, nodes, links, buffers, and request placement.

`Cluster` builds the prefill and decode meshes from the topology, one storage link and one host
buffer per node, one traffic manager per engine, and a worker thread per engine (each with its own
copy of the model on its devices). `submit` places a turn (PE, DE, read side), reserves the read
node's host buffer, queues the read of the hit blocks on that node's link and hands the turn to
its PE; the PE hands it to its DE; the DE ends it once its blocks are persisted.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp

from dualpath_jax.engines.topology import build_topology
from dualpath_jax.kvstore.block_store import KVBlockStore
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.decode_worker import DecodeWorker
from dualpath_jax.runtime.host_buffer import HostBuffer
from dualpath_jax.runtime.prefill_worker import PrefillWorker
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.runtime.storage_link import StorageLink, StorageLinkConfig
from dualpath_jax.runtime.traffic import TrafficConfig, TrafficManager
from dualpath_jax.scheduler.simple import ReadQueues, place_round_robin
from dualpath_jax.transfer.device_move import make_mover


class Cluster:
  """PEs and DEs on separate meshes of this host's devices, sharing one KV block store."""

  def __init__(self, runtime_config: RuntimeConfig, model, store: KVBlockStore, layout: KVLayout,
               *, on_turn_done=None, devices=None):
    self.runtime_config = runtime_config
    self.layout = layout
    self.store = store
    self.topology = build_topology(runtime_config.topology, devices)
    per_node = {n.node_id: n for n in self.topology.nodes}
    self.links = {i: StorageLink(store, node_id=i, config=StorageLinkConfig(
        link_bytes_per_s=runtime_config.link_bytes_per_s)) for i in per_node}
    self.buffers = {i: HostBuffer(host_buffer_bytes=runtime_config.host_buffer_bytes,
                                  full_block_bytes=layout.full_block_bytes, node_id=i)
                    for i in per_node}
    mover = make_mover(runtime_config.mover)
    traffic_config = TrafficConfig(chunk_bytes=runtime_config.kv_chunk_bytes)
    self.traffic = {e.name: TrafficManager(e, mover=mover, config=traffic_config)
                    for e in self.topology.engines}
    self._on_turn_done = on_turn_done
    self._zeros: dict = {}
    self._lock = threading.Lock()
    self._placed = 0
    self.prefill_workers = [PrefillWorker(self, e, jax.device_put(model, e.replicated_sharding))
                            for e in self.topology.prefill_engines]
    self.decode_workers = [DecodeWorker(self, e, jax.device_put(model, e.replicated_sharding))
                           for e in self.topology.decode_engines]
    for worker in self.prefill_workers + self.decode_workers:
      worker.start()

  def describe(self) -> str:
    c = self.runtime_config
    return (f"{c.mode} on {self.topology.config.name} ({len(self.topology.nodes)} nodes); "
            f"links: {self.links[0].describe()}; mover: {c.mover}")

  def zeros_on(self, engine, shape: tuple[int, ...]) -> jax.Array:
    """A cached zeros array on `engine` (the oracle's uninitialised KV; an empty prefix)."""
    key = (engine.name, shape)
    with self._lock:
      if key not in self._zeros:
        self._zeros[key] = jax.device_put(jnp.zeros(shape, self.layout.np_dtype),
                                          engine.replicated_sharding)
      return self._zeros[key]

  def read_queues(self, pe: int, de: int) -> ReadQueues:
    pe_node = self.topology.prefill_engines[pe].node_id
    de_node = self.topology.decode_engines[de].node_id
    return ReadQueues(pe_node_tokens=self.links[pe_node].read_queue_tokens,
                      de_node_tokens=self.links[de_node].read_queue_tokens)

  def submit(self, request: TurnRequest) -> None:
    """Places a turn, queues its read on the chosen node's link and hands it to its PE."""
    config = self.runtime_config
    request.times["ready"] = time.perf_counter()
    with self._lock:
      number, self._placed = self._placed, self._placed + 1
    placement = place_round_robin(
        number, num_prefill_engines=len(self.prefill_workers),
        num_decode_engines=len(self.decode_workers), dual_path=config.dual_path,
        queues_of=self.read_queues)
    request.prefill_engine = placement.prefill_engine
    request.decode_engine = placement.decode_engine
    request.read_side = placement.read_side
    pe = self.topology.prefill_engines[request.prefill_engine]
    de = self.topology.decode_engines[request.decode_engine]
    prompt_bytes = request.prompt_tokens * self.layout.kv_bytes_per_token
    if (request.read_side == "de" and prompt_bytes + request.hit_blocks
        * self.layout.full_block_bytes > self.buffers[de.node_id].capacity_bytes):
      # The DE buffer would hold both its prompt KV and its hit blocks: more than it can ever
      # hold, so waiting for room would wait forever. Read on the PE side instead.
      request.read_side = "pe"
    if not config.skips_kv_io:
      request.de_reservation = self.buffers[de.node_id].reserve(prompt_bytes, request)
      if request.hit_blocks:
        reader = pe if request.read_side == "pe" else de
        request.read_reservation = self.buffers[reader.node_id].reserve_blocks(
            request.hit_blocks, request)
        request.times["read_start"] = time.perf_counter()
        request.read_future = self.traffic[reader.name].read(
            self.links[reader.node_id], request.agent_id, request.hashes[:request.hit_blocks],
            request.hit_tokens, side=request.read_side)
        request.add_bytes(f"store_read_{request.read_side}_side",
                          request.hit_blocks * self.layout.full_block_bytes)
        request.read_future.add_done_callback(lambda f: self._read_done(request))
    self.prefill_workers[request.prefill_engine].submit(request)

  def _read_done(self, request: TurnRequest) -> None:
    request.times["read_done"] = time.perf_counter()
    self.prefill_workers[request.prefill_engine].wake()

  def on_turn_done(self, request: TurnRequest) -> None:
    if request.de_reservation is not None:
      request.de_reservation.release()
    if request.read_reservation is not None:
      request.read_reservation.release()
    if self._on_turn_done is not None:
      self._on_turn_done(request)

  def bytes_by_path(self) -> dict[str, int]:
    total: dict[str, int] = {}
    for tm in self.traffic.values():
      for path, nbytes in tm.bytes_by_path.items():
        total[path] = total.get(path, 0) + nbytes
    return total

  def close(self) -> None:
    for worker in self.prefill_workers + self.decode_workers:
      worker.stop()
    for worker in self.prefill_workers + self.decode_workers:
      worker.join(timeout=10)
    for link in self.links.values():
      link.close()
