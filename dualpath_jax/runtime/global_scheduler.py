"""The global scheduler of the runtime: measured state in, policy decisions executed.

The policies (dualpath_jax/scheduler/) are pure functions; this class owns the queues and the
per-engine counters they read (seq and tok per engine, each node's read queue, each DE's free
device memory), calls them whenever that state changes (a turn arrives, a PE batch ends, a read
completes, a turn ends) and executes what they decide: it reserves host-buffer room, queues the
reads on the chosen links and hands the turn to its PE group.

  roundrobin  RoundRobinPlacer: PE and DE round robin; the read side alternates with the dual
              path on, PE only without it (the paper's Basic).
  dualpath    PAPER.md section 5: the PE groups fetch (alpha/beta categories, FIFO, tok updated
              per assignment; [ours] their fetches interleaved, below); then the two-level DE
              selection (group with the least tokens; inside it the memory-fit and Z rules); then
              the read side: the node with the shorter read queue, or (split_reads) both sides in
              proportion to their drain times.

PE group order [ours]. The paper's groups pull work on their own clocks, so a group with less
unfinished work asks again sooner. This scheduler runs every group's fetch in one pass instead,
interleaved one request at a time (scheduler.inter_engine.interleave_prefill_fetches): each
waiting request, FIFO, goes to the group of least summed tok that has an engine with tok <= beta
(inside it, the engine of least tok in C2, else C3, as PAPER.md 5.2 says), ties going to the next
group after the one that last took a request. Equal groups therefore alternate and loaded ones get
less, however many passes an event causes. (Before: the groups were visited from a start that
rotated only when a pass left work waiting, and the first group visited took every request while
its engines stayed under beta, i.e. ~5 s of prefill: on 4x H200, 2P2D, every timed turn of the
dualpath and oracle modes ran on PE 1 and PE 0 stayed idle.)

A placed turn waits (FIFO) until its host buffers have room; nothing here ever blocks a worker.
"""

from __future__ import annotations

import functools
import threading
import time

from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.scheduler.baselines import RoundRobinPlacer
from dualpath_jax.scheduler.inter_engine import (assign_decode_groups, choose_read_side,
                                                 derive_alpha_beta, interleave_prefill_fetches,
                                                 select_decode_engines, split_read)
from dualpath_jax.scheduler.state import EngineLoad, WaitingRequest

READ_WINDOW_S = 3.0
"""alpha: the tokens a node's link reads in this many seconds (PAPER.md 5.2)."""
COMPUTE_WINDOW_S = 5.0
"""beta: the new tokens one PE prefills in this many seconds (PAPER.md 5.2)."""


class GlobalScheduler:
  """Places every turn (PE, DE, read side) with the configured policy and starts its reads."""

  def __init__(self, cluster, *, prefill_tokens_per_s: float):
    self.cluster = cluster
    config = cluster.runtime_config
    self.config = config
    self._lock = threading.RLock()
    topo = cluster.topology
    self._pe_nodes = [e.node_id for e in topo.prefill_engines]
    self._de_nodes = [e.node_id for e in topo.decode_engines]
    self.pe_seq = [0] * len(self._pe_nodes)
    self.pe_tok = [0] * len(self._pe_nodes)
    self.de_seq = [0] * len(self._de_nodes)
    self.de_tok = [0] * len(self._de_nodes)
    self.de_used_bytes = [0] * len(self._de_nodes)
    self.de_capacity_bytes = cluster.decode_pool_bytes
    self._waiting: list[TurnRequest] = []  # no PE yet (FIFO)
    self._de_global: list[TurnRequest] = []  # PE chosen, no DE group yet
    self._de_private: dict[int, list[TurnRequest]] = {n: [] for n in sorted(set(self._de_nodes))}
    self._awaiting_buffers: list[TurnRequest] = []  # placed, waiting for host-buffer room
    self._planned_tokens: dict[int, int] = {n.node_id: 0 for n in topo.nodes}
    """Per node: read tokens decided but not yet queued on its link (waiting for buffers)."""
    self._arrivals = 0
    self._busy = False
    self._again = False
    self._next_group = 0  # rotation over the sorted PE groups: ties go to this one first
    self._round_robin = RoundRobinPlacer(num_prefill_engines=len(self._pe_nodes),
                                         num_decode_engines=len(self._de_nodes))
    layout = cluster.layout
    self.kv_bytes_per_token = layout.kv_bytes_per_token
    link_rate = config.link_bytes_per_s or UNCAPPED_LINK_BYTES_PER_S
    self.alpha, self.beta = derive_alpha_beta(
        link_bytes_per_s=link_rate, kv_bytes_per_token=layout.kv_bytes_per_token,
        prefill_tokens_per_s=prefill_tokens_per_s, read_window_s=READ_WINDOW_S,
        compute_window_s=COMPUTE_WINDOW_S)
    self.link_tokens_per_s = link_rate / layout.kv_bytes_per_token

  def describe(self) -> str:
    c = self.config
    text = f"scheduler={c.scheduler}, dual_path={c.dual_path}, split_reads={c.split_reads}"
    if c.scheduler == "dualpath":
      text += f", alpha={self.alpha} tokens (3 s of link), beta={self.beta} tokens (5 s of PE)"
    return text

  # --- events ------------------------------------------------------------------------------------

  def submit(self, request: TurnRequest) -> None:
    request.times["ready"] = time.perf_counter()
    with self._lock:
      request.request_id = self._arrivals
      self._arrivals += 1
      self._waiting.append(request)
      self._run()

  def poke(self) -> None:
    """State changed somewhere (a batch ended, a read completed, buffers freed): schedule again."""
    with self._lock:
      self._run()

  def prefill_progress(self, request: TurnRequest, tokens: int, finished: bool) -> None:
    with self._lock:
      self.pe_tok[request.prefill_engine] -= tokens
      if finished:
        self.pe_seq[request.prefill_engine] -= 1
      self._run()

  def turn_done(self, request: TurnRequest) -> None:
    with self._lock:
      if request.decode_engine >= 0:
        de = request.decode_engine
        self.de_seq[de] -= 1
        self.de_tok[de] -= request.prompt_tokens
        self.de_used_bytes[de] -= self._de_bytes(request)
      self._run()

  # --- decisions ---------------------------------------------------------------------------------

  def _de_bytes(self, request: TurnRequest) -> int:
    return self.cluster.decode_bytes_for(request.prompt_tokens + request.gen_tokens)

  def _waiting_view(self, request: TurnRequest) -> WaitingRequest:
    return WaitingRequest(request_id=request.request_id, total_tokens=request.prompt_tokens,
                          new_tokens=request.new_tokens, kv_bytes=self._de_bytes(request))

  def _read_queue(self, node: int) -> int:
    """The node's read queue as the policies see it: queued on the link, plus reads already
    decided for it that wait for host-buffer room (a decided read joins the queue at once)."""
    return self.cluster.links[node].read_queue_tokens + self._planned_tokens[node]

  def _recent_read_tokens(self, node: int) -> int:
    """Tokens the node's link finished reading within the last READ_WINDOW_S (tie-break)."""
    link = self.cluster.links[node]
    since = time.perf_counter() - READ_WINDOW_S
    return sum(r.nbytes for r in reversed(link.read_records[-64:]) if r.t_end >= since
               ) // self.kv_bytes_per_token

  def _plan_reads(self, request: TurnRequest, sign: int) -> None:
    pe_blocks, de_blocks = request.read_split
    bt = request.block_tokens
    self._planned_tokens[self._pe_nodes[request.prefill_engine]] += sign * pe_blocks * bt
    self._planned_tokens[self._de_nodes[request.decode_engine]] += sign * de_blocks * bt

  def _run(self) -> None:
    """_schedule until nothing changes; an event raised while it runs (a read that completes at
    once calls back on this thread) asks for one more pass instead of re-entering it."""
    if self._busy:
      self._again = True
      return
    self._busy = True
    try:
      self._again = True
      while self._again:
        self._again = False
        self._schedule()
    finally:
      self._busy = False

  def _schedule(self) -> None:
    if self.config.scheduler == "roundrobin":
      for request in self._waiting:
        pe, de, side = self._round_robin.place(dual_path=self.config.dual_path)
        self._assign_pe(request, pe)
        self._assign_de(request, de)
        hit = request.hit_blocks
        request.read_split = (0, hit) if side == "de" else (hit, 0)
        self._await_buffers(request)
      self._waiting.clear()
    else:
      self._schedule_prefill()
      self._schedule_decode()
    self._start_reads()

  def _schedule_prefill(self) -> None:
    """Every PE group fetches from the waiting queue, interleaved one request at a time: the
    group of least summed tok first, ties by a rotation that moves past the group that last took
    a request (interleave_prefill_fetches; [ours], see the module docstring)."""
    if not self._waiting:
      return
    groups = {g: [EngineLoad(engine=e, group=g, seq=self.pe_seq[e], tok=self.pe_tok[e],
                             read_queue_tokens=self._read_queue(g))
                  for e, node in enumerate(self._pe_nodes) if node == g]
              for g in sorted(set(self._pe_nodes))}
    by_id = {r.request_id: r for r in self._waiting}
    chosen, self._next_group = interleave_prefill_fetches(
        [self._waiting_view(r) for r in self._waiting], groups, alpha=self.alpha, beta=self.beta,
        start=self._next_group)
    for request_id, engine in chosen:
      request = by_id[request_id]
      self._assign_pe(request, engine)
      self._de_global.append(request)
    taken = {request_id for request_id, _ in chosen}
    self._waiting = [r for r in self._waiting if r.request_id not in taken]

  def _schedule_decode(self) -> None:
    groups = sorted(self._de_private)
    if self._de_global:
      loads = {g: [self._de_load(e) for e, node in enumerate(self._de_nodes) if node == g]
               for g in groups}
      by_id = {r.request_id: r for r in self._de_global}
      for request_id, group in assign_decode_groups(
          [self._waiting_view(r) for r in self._de_global], loads):
        self._de_private[group].append(by_id[request_id])
      self._de_global.clear()
    for group in groups:
      queue = self._de_private[group]
      if not queue:
        continue
      loads = [self._de_load(e) for e, node in enumerate(self._de_nodes) if node == group]
      by_id = {r.request_id: r for r in queue}
      chosen = select_decode_engines([self._waiting_view(r) for r in queue], loads)
      for request_id, engine in chosen:
        request = by_id[request_id]
        self._assign_de(request, engine)
        request.read_split = self._read_split(request)
        self._await_buffers(request)
      taken = {request_id for request_id, _ in chosen}
      self._de_private[group] = [r for r in queue if r.request_id not in taken]

  def _de_load(self, engine: int) -> EngineLoad:
    return EngineLoad(engine=engine, group=self._de_nodes[engine], seq=self.de_seq[engine],
                      tok=self.de_tok[engine], read_queue_tokens=self._read_queue(
                          self._de_nodes[engine]),
                      free_bytes=self.de_capacity_bytes - self.de_used_bytes[engine])

  def _read_split(self, request: TurnRequest) -> tuple[int, int]:
    hit = request.hit_blocks
    if not self.config.dual_path or not hit:
      return (hit, 0)
    pe_q = self._read_queue(self._pe_nodes[request.prefill_engine])
    de_q = self._read_queue(self._de_nodes[request.decode_engine])
    if self.config.split_reads:
      return split_read(hit_blocks=hit, block_tokens=request.block_tokens, pe_queue_tokens=pe_q,
                        de_queue_tokens=de_q, pe_tokens_per_s=self.link_tokens_per_s,
                        de_tokens_per_s=self.link_tokens_per_s)
    pe_node = self._pe_nodes[request.prefill_engine]
    de_node = self._de_nodes[request.decode_engine]
    side = choose_read_side(pe_queue_tokens=pe_q, de_queue_tokens=de_q,
                            pe_recent_tokens=self._recent_read_tokens(pe_node),
                            de_recent_tokens=self._recent_read_tokens(de_node))
    return (0, hit) if side == "de" else (hit, 0)

  def _assign_pe(self, request: TurnRequest, engine: int) -> None:
    request.prefill_engine = engine
    self.pe_seq[engine] += 1
    self.pe_tok[engine] += request.new_tokens

  def _assign_de(self, request: TurnRequest, engine: int) -> None:
    request.decode_engine = engine
    self.de_seq[engine] += 1
    self.de_tok[engine] += request.prompt_tokens
    self.de_used_bytes[engine] += self._de_bytes(request)

  # --- execution ---------------------------------------------------------------------------------

  def _await_buffers(self, request: TurnRequest) -> None:
    self._plan_reads(request, +1)
    self._awaiting_buffers.append(request)

  def _start_reads(self) -> None:
    """Reserves host-buffer room (FIFO; a turn without room waits), queues reads, hands off."""
    still = []
    for request in self._awaiting_buffers:
      if still:
        still.append(request)
        continue
      self._plan_reads(request, -1)  # from planned to the link's own queue (or back, below)
      if not self._try_start(request):
        self._plan_reads(request, +1)
        still.append(request)
    self._awaiting_buffers = still

  def _try_start(self, request: TurnRequest) -> bool:
    cluster, layout = self.cluster, self.cluster.layout
    pe = cluster.topology.prefill_engines[request.prefill_engine]
    de = cluster.topology.decode_engines[request.decode_engine]
    pe_blocks, de_blocks = request.read_split
    prompt_bytes = cluster.admit_tokens(request.prompt_tokens) * layout.kv_bytes_per_token
    de_buffer = cluster.buffers[de.node_id]
    if de_blocks and (prompt_bytes + cluster.read_bytes(de_blocks, both_sides=bool(pe_blocks))
                      > de_buffer.capacity_bytes):
      # The DE buffer would hold its prompt KV and its hit blocks: more than it can ever hold.
      request.read_split = (pe_blocks + de_blocks, 0)
      pe_blocks, de_blocks = request.read_split
    if cluster.runtime_config.skips_kv_io:
      request.times["placed"] = time.perf_counter()
      cluster.prefill_group_of(pe).submit(request)
      return True
    reservations = {}
    needs = [("de_prompt", de_buffer, prompt_bytes)]
    both = bool(pe_blocks and de_blocks)
    if pe_blocks:
      needs.append(("pe", cluster.buffers[pe.node_id],
                    cluster.read_bytes(pe_blocks, both_sides=both)))
    if de_blocks:
      needs.append(("de", de_buffer, cluster.read_bytes(de_blocks, both_sides=both)))
    for name, buffer, nbytes in needs:
      reservation = buffer.try_reserve(nbytes, request)
      if reservation is None:
        for taken in reservations.values():
          taken.release()
        return False
      reservations[name] = reservation
    request.times["placed"] = time.perf_counter()
    request.de_reservation = reservations.pop("de_prompt")
    request.read_reservations = reservations
    cluster.prepare_prompt_kv(request)
    start = 0
    for side, engine, count in (("pe", pe, pe_blocks), ("de", de, de_blocks)):
      if not count:
        continue
      request.times.setdefault("read_start", time.perf_counter())
      hashes = request.hashes[start:start + count]
      raw, into = cluster.read_destination(request, side, count)
      future = cluster.traffic[engine.name].read(
          cluster.links[engine.node_id], request.agent_id, hashes, count * request.block_tokens,
          side=side, into=into, then=functools.partial(cluster.land_read, request, side, raw))
      request.read_futures[side] = future
      request.add_bytes(f"store_read_{side}_side", count * layout.full_block_bytes)
      start += count
    cluster.prefill_group_of(pe).submit(request)
    for future in list(request.read_futures.values()):
      future.add_done_callback(lambda f, r=request: cluster.read_done(r))
    return True


UNCAPPED_LINK_BYTES_PER_S = 10e9
"""Link speed assumed for alpha when the links are uncapped (the hardware's own limit is not
known before it is measured): about one 100 Gb/s NIC."""
