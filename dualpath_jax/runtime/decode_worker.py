"""A decode engine (DE): takes prompts from its node buffer into a paged pool, decodes, persists.

Admission (PAPER.md section 2.4): once the DE node buffer holds a request's complete prompt KV, the
DE allocates pages, moves the KV onto its device (H2D), releases the host buffer and starts
decoding. Every step decodes all admitted sequences together (padded to decode_batch_size: one
compiled program). When a sequence has its forced number of tokens, every completed Full Block of
the turn (the appended prompt and the generated tokens, those before the hit excluded) goes D2H and
is written to the store through this node's storage link; the turn ends when the write commits,
so the agent's next turn hits it. In oracle mode the prompt KV never arrives (the pages hold
whatever was there) and nothing is persisted.

runtime.decode_steps_in_flight steps stay in flight (1 up to 2026-11-29; see its doc in
runtime/config.py). A sequence keeps one batch row (slot) from its admission to its last
step; free slots are padding rows. A request taken from the queue reserves a free slot and its
prompt KV's H2D starts at once; it is admitted (pages allocated, KV written into them) at the
first loop turn after that H2D has landed, so that no step waits for a copy. Issued at once,
the page write (which the next step depends on, through the pool) waited for the whole copy;
steps that overlapped an admission's H2D took 1.7-5.6x the median (1P1D, 2x H200,
docs/perf/gpu_bench.md record 8; the change itself is not yet measured on a GPU). Each turn of
the loop admits the landed requests into their slots, dispatches step n, and
only then reads step n-d's tokens (d steps in flight; the host waits there while steps n-d+1..n
run), appends them and
persists the sequences whose last token they were; with no sequence left it reads the step in
flight (drains). Step n's tokens are step n-1's output on the device, and the host's first
tokens for rows admitted since. Generation lengths are forced, so when step n is dispatched the
rows whose last token it produces are known by counting: their slots take the next admission
before those tokens are read, and their pages, named in no later step's block table, are freed
when step n is read. Synced steps left the host's dispatch and token read between two steps on
the device: 14.4 ms a step at batch 32 on an H100 against 12.9 ms issued back to back
(docs/perf/gpu_bench.md record 4). A finishing sequence's pages and the next sequence's in its
slot are held at once for a step; the global scheduler's memory rule keeps them within the pool
(a turn's KV bytes count against its DE's pool until the turn ends).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.kvstore.hashing import chain_block_hashes
from dualpath_jax.model import paged
from dualpath_jax.model.prefill import pow2_at_least
from dualpath_jax.runtime import profile_window
from dualpath_jax.runtime.request import TurnRequest


@jax.jit
def _merge_tokens(host_tokens: jax.Array, previous: jax.Array) -> jax.Array:
  """A step's tokens [B]: the host's where it holds one (>= 0: rows admitted since the last
  step), else the last step's output (rows that go on)."""
  return jnp.where(host_tokens >= 0, host_tokens, previous)


class StepRecord(NamedTuple):
  """One decode step's period as the DE saw it (perf_counter seconds) and where its thread spent
  it (runtime/metrics.py decode_inflation splits the inflation by these parts)."""

  start: float
  """The later of the step's dispatch and the end of the previous step's collection."""
  end: float
  """Its tokens read and appended."""
  active: int
  """Sequences it decoded."""
  dispatch_s: float = 0.0
  """Host seconds inside the decode program's dispatch call in the period (a later step's:
  steps stay in flight). XLA launches the step's kernels in it, and the thread takes the
  GIL back when it returns."""
  wait_s: float = 0.0
  """Host seconds reading its tokens: waiting for the device, then for the GIL."""
  admit_s: float = 0.0
  """Host seconds admitting requests in the period (issuing a prompt's H2D, writing landed
  prompts into their pages)."""


@dataclasses.dataclass(kw_only=True, eq=False)
class _Step:
  """A dispatched decode step whose tokens the host has not read yet."""

  rows: list[TurnRequest | None]
  """The request of each batch row (None: padding)."""
  next_tokens: jax.Array
  """[B] int32 on the device: each row's next token."""
  dispatched_s: float
  """perf_counter when building its inputs began."""
  gate: contextlib.ExitStack
  """Holds its `TrafficManager.model_step()` open from dispatch to collection."""


class DecodeWorker(threading.Thread):
  """One DE: a thread running continuous batched decode over its paged pool."""

  def __init__(self, cluster, engine, model):
    super().__init__(name=f"decode-{engine.name}", daemon=True)
    self.cluster = cluster
    self.engine = engine
    self.model = model
    self.tm = cluster.traffic[engine.name]
    config = cluster.runtime_config
    self.block_tokens = cluster.layout.block_tokens
    self.max_pages = -(-config.max_context_tokens // self.block_tokens)
    num_pages = config.decode_batch_size * self.max_pages + 1
    self.pool = jax.device_put(paged.init_pool(model.config, num_pages, self.block_tokens),
                               engine.replicated_sharding)
    self.table = paged.PageTable.create(num_pages, self.block_tokens)
    self._cond = threading.Condition()
    self._pending: list[TurnRequest] = []
    self._stopping = False
    self._slots: list[TurnRequest | None] = [None] * config.decode_batch_size
    """Per batch row: the request whose next step it runs (None: free)."""
    self._issued = [0] * config.decode_batch_size
    """Per batch row: tokens of its request dispatched so far (the first token included)."""
    self._admitted_rows: set[int] = set()
    """Rows admitted since the last dispatch: their next token comes from the host."""
    self._page_reads: dict[TurnRequest, jax.Array] = {}
    """A finishing turn's new blocks read from the pool behind its last step
    (`_read_persisted_pages`), until `_persist` moves them to the host."""
    self._persister = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix=f"{engine.name}-persist")
    """Moves finished turns' new blocks to the host and hands them to the link (_write_back), so
    that this thread's steps do not wait for the copies."""
    self._arriving: dict[TurnRequest, jax.Array | None] = {}
    """Requests taken from the queue, each holding a free slot, whose prompt KV's H2D was issued
    (None: nothing to move) and that are admitted once it has landed (`_admit_landed`)."""
    self.steps_in_flight = config.decode_steps_in_flight
    self._in_flight: list[_Step] = []
    """Dispatched steps not read yet, oldest first: steps_in_flight between loop turns, one more
    just after a dispatch."""
    self._decoding: dict[TurnRequest, None] = {}
    """Requests taken from the queue and not yet handed to persistence, in order (an error
    fails them all)."""
    self._last_collect_s = 0.0
    """perf_counter when the last step's tokens had been read and appended."""
    self._period_s: collections.Counter = collections.Counter()
    """Host seconds per StepRecord part ('dispatch_s', 'admit_s') since the last collection."""
    self.stage_s: collections.Counter = collections.Counter()
    """Seconds of this DE's thread per stage: 'admit' (issuing a prompt's KV H2D; writing it
    into its pages once landed),
    'step' (dispatching decode steps and reading their tokens), 'persist' (a finished turn's new
    blocks D2H and handed to the link)."""
    self.step_records: list[StepRecord] = []
    """Every decode step's period and its parts (for the step-time inflation under KV traffic,
    runtime/metrics.py decode_inflation). With steps in flight, step n spans from the later of
    its dispatch and the end of step n-1's collection to the end of its own collection: the
    step period the DE sees, back-to-back steps tiling it.
    A period holds whatever this thread did in it, admissions and persists included, so their
    H2D and D2H count as KV moves overlapping it (synced steps never overlapped them)."""
    self.overlapped_admissions = 0
    """Admissions made while a step was in flight (their KV queued behind it on the device)."""
    self._device_inputs: dict | None = None
    """The last dispatched step's next tokens on the device, and its block tables and the next
    step's seq_lens if the batch goes on unchanged, each as (host copy, device array)."""
    self.input_placements: collections.Counter = collections.Counter()
    """How often each decode input was placed from the host ('tokens', 'block_tables',
    'seq_lens') against reused from the device ('<name>_reused'); 'tokens' counts the steps
    with a row admitted since the last one (the host's first tokens, merged on the device)."""

  def release_device_memory(self) -> None:
    """Drops this DE's page pool and model copy, stops its persister (after the thread has
    stopped)."""
    self._persister.shutdown(wait=True)
    self.pool = self.model = None

  def precompile(self, token_counts, persist_blocks=()) -> int:
    """Compiles the admission's H2D join and page write for each prompt KV length
    (Cluster.admit_tokens) by writing zeros to the scratch page, the read of a finished turn's
    pages for each padded block count in `persist_blocks` (runtime/offline.py
    persisted_block_counts; from the scratch page), the steps' token merge, and the decode step
    itself over
    padding rows only (their KV goes to the scratch page), before the clock starts: otherwise
    the first admission of a new length compiles on this thread, between decode steps, and a DE
    that the warm-up pass left idle compiles its step in the timed part (the oracle of the CPU
    smoke did, both DEs). Call it while no request is in flight. Returns how many lengths ran."""
    no_tokens = jax.device_put(np.zeros((len(self._slots),), np.int32),
                               self.engine.replicated_sharding)
    _merge_tokens(no_tokens, no_tokens)
    _, block_tables, seq_lens = self.table.prepare_decode(
        [None] * len(self._slots), batch_size=len(self._slots), max_pages=self.max_pages)
    tables, lens = (jax.device_put(h, self.engine.replicated_sharding)
                    for h in (block_tables, seq_lens))
    _, _, self.pool = paged.greedy_decode_step_jit(self.model, self.pool, no_tokens, tables, lens)
    layout = self.cluster.layout
    page_locked = self.cluster.runtime_config.host_memory != "numpy"
    for tokens in token_counts:
      shape = (layout.num_layers, tokens, *layout.token_kv_shape)
      self.tm.precompile_moves(shape, layout.np_dtype, page_locked=page_locked)  # the H2D's join
      kv = jax.device_put(np.zeros(shape, layout.np_dtype), self.engine.replicated_sharding)
      page_ids = np.full((-(-tokens // self.block_tokens),), paged.SCRATCH_PAGE, np.int32)
      self.pool = paged.write_kv_to_pages(self.pool, kv, page_ids)
    for blocks in persist_blocks:  # _read_persisted_pages, from the scratch page
      paged.read_kv_from_pages(self.pool, np.full((blocks,), paged.SCRATCH_PAGE, np.int32),
                               blocks * self.block_tokens).delete()
    jax.block_until_ready(self.pool)
    return len(token_counts)

  def submit(self, request: TurnRequest) -> None:
    with self._cond:
      self._pending.append(request)
      self._cond.notify_all()

  def stop(self) -> None:
    """Ends the thread after its current loop turn; the steps in flight are dropped unread."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()

  def _start_admission(self, request: TurnRequest) -> None:
    """Takes a request into a free slot: its prompt KV's H2D starts now, the admission follows
    once it has landed (`_admit_landed`)."""
    request.times["decode_start"] = time.perf_counter()
    kv = None
    if not self.cluster.runtime_config.skips_kv_io:
      # The buffer's array is already padded to whole pages (Cluster.admit_tokens): it moves as
      # it is, and the padding pages are written to the scratch page.
      kv = self.tm.h2d(request.prompt_kv)
      request.add_bytes("h2d", kv.nbytes)  # what moved, padding included
    self._arriving[request] = kv

  def _admit_landed(self, wait: bool) -> None:
    """Admits every arriving request whose H2D has landed, in arrival order; with `wait` (no
    step to overlap), waits for the first one's."""
    for request, kv in list(self._arriving.items()):
      if kv is not None and not kv.is_ready():
        if not wait:
          continue
        kv.block_until_ready()
      wait = False
      del self._arriving[request]
      start = time.perf_counter()
      with profile_window.span(f"{self.engine.name} admit"):
        self._admit(request, kv)
      self._add_admit_s(time.perf_counter() - start)

  def _add_admit_s(self, seconds: float) -> None:
    self.stage_s["admit"] += seconds
    self._period_s["admit_s"] += seconds

  def _drop_arriving(self) -> None:
    """Waits for the H2D of every arriving request (it reads the DE buffer) and returns their
    buffer room; they are not admitted."""
    arriving, self._arriving = self._arriving, {}
    for request, kv in arriving.items():
      try:
        if kv is not None:
          kv.block_until_ready()
      except BaseException:  # noqa: BLE001  (the turn fails with the caller's error)
        pass
      finally:
        if request.de_reservation is not None:
          request.de_reservation.release()

  def _occupied(self) -> bool:
    return any(request is not None for request in self._slots)

  def run(self) -> None:
    try:
      while True:
        with self._cond:
          while (not self._stopping and not self._pending and not self._occupied()
                 and not self._in_flight and not self._arriving):
            self._cond.wait()
          if self._stopping:
            return
          free = self._slots.count(None) - len(self._arriving)
          taken, self._pending = self._pending[:free], self._pending[free:]
        try:
          self._decoding.update(dict.fromkeys(taken))
          for request in taken:
            start = time.perf_counter()
            with profile_window.span(f"{self.engine.name} admit"):
              self._start_admission(request)
            self._add_admit_s(time.perf_counter() - start)
          # With nothing to step, wait for the first copy to land rather than spin.
          self._admit_landed(wait=not (self._occupied() or self._in_flight))
          # steps_in_flight steps stay in flight while rows decode; with none left, they are read.
          dispatched = self._occupied()
          if dispatched:
            with profile_window.span(f"{self.engine.name} dispatch step"):
              self._dispatch()
          while len(self._in_flight) > (self.steps_in_flight if dispatched else 0):
            with profile_window.span(f"{self.engine.name} collect step"):
              self._collect()
        except BaseException as e:
          self._fail(e)
    finally:
      for step in self._in_flight:
        step.gate.close()
      self._drop_arriving()

  def _admit(self, request: TurnRequest, kv: jax.Array | None) -> None:
    """A request whose prompt KV has landed on the device (kv; None in oracle mode): its pages,
    the KV written into them, its first token, its slot."""
    if self._in_flight:
      self.overlapped_admissions += 1
    self.table = self.table.allocate(request, request.prompt_tokens)
    pages = self.table.block_tables[request]
    if kv is not None:
      n = kv.shape[1] // self.block_tokens
      page_ids = np.full((n,), paged.SCRATCH_PAGE, np.int32)
      page_ids[:len(pages)] = pages
      self.pool = paged.write_kv_to_pages(self.pool, kv, page_ids)
      request.prompt_kv = None
      # The copy has read the buffer (kv is ready): its room goes back for the next request.
      if request.de_reservation is not None:
        request.de_reservation.release()
    request.generated = [request.first_token]
    request.times["first_token"] = time.perf_counter()
    if request.gen_tokens == 1:
      request.times["last_token"] = request.times["first_token"]
      self._read_persisted_pages(request)
      self._finish(request)
      return
    row = self._slots.index(None)
    self._slots[row], self._issued[row] = request, 1
    self._admitted_rows.add(row)

  def _dispatch(self) -> None:
    """Issues the next step over the occupied slots, then frees the slots of the rows whose
    last token it produces (their requests stay in the step's record until it is read)."""
    start = time.perf_counter()
    if not self._in_flight:  # this step's period starts now: what came before is not in it
      self._period_s.clear()
    batch = len(self._slots)
    self.table, block_tables, seq_lens = self.table.prepare_decode(
        self._slots, batch_size=batch, max_pages=self.max_pages)
    inputs = self._inputs(block_tables, seq_lens)
    gate = contextlib.ExitStack()
    gate.enter_context(self.tm.model_step())
    call = time.perf_counter()
    try:
      next_dev, lens_dev, self.pool = paged.greedy_decode_step_jit(self.model, self.pool, *inputs)
    except BaseException:
      gate.close()
      raise
    self._period_s["dispatch_s"] += time.perf_counter() - call
    self._in_flight.append(_Step(rows=list(self._slots), next_tokens=next_dev,
                                 dispatched_s=start, gate=gate))
    self._device_inputs = dict(
        tokens=next_dev, block_tables=(block_tables, inputs[1]),
        seq_lens=(np.where(seq_lens > 0, seq_lens + 1, 0), lens_dev))
    self._admitted_rows.clear()
    for row, request in enumerate(self._slots):
      if request is not None:
        self._issued[row] += 1
        if self._issued[row] == request.gen_tokens:
          self._slots[row] = None
          self._read_persisted_pages(request)
    self.stage_s["step"] += time.perf_counter() - start

  def _collect(self) -> None:
    """Reads the oldest step in flight: appends each row's token to its request and persists
    the requests it completes."""
    start = time.perf_counter()
    step = self._in_flight[0]
    tokens = np.asarray(step.next_tokens)
    wait_s = time.perf_counter() - start
    self._in_flight.pop(0)
    step.gate.close()
    now = time.perf_counter()
    done = []
    for row, request in enumerate(step.rows):
      if request is None:
        continue
      request.generated.append(int(tokens[row]))
      if len(request.generated) == 2:
        request.times["second_token"] = now
      if len(request.generated) == request.gen_tokens:
        request.times["last_token"] = now
        done.append(request)
    end = time.perf_counter()
    self.step_records.append(StepRecord(
        max(step.dispatched_s, self._last_collect_s), end,
        sum(request is not None for request in step.rows), wait_s=wait_s,
        dispatch_s=self._period_s["dispatch_s"], admit_s=self._period_s["admit_s"]))
    self._period_s.clear()
    self._last_collect_s = end
    self.stage_s["step"] += end - start
    for request in done:
      self._finish(request)

  def _fail(self, error: BaseException) -> None:
    """Fails every request taken from the queue and not yet handed to persistence (admitted,
    decoding, in flight), returns their pages and drops the steps in flight."""
    for step in self._in_flight:
      step.gate.close()
    self._in_flight = []
    self._period_s.clear()
    self._drop_arriving()
    self._slots = [None] * len(self._slots)
    self._admitted_rows.clear()
    failed, self._decoding = list(self._decoding), {}
    for request in failed:
      self._page_reads.pop(request, None)
      request.error = error
      if request in self.table.seq_lens:
        self.table = self.table.free(request)
      self._end(request)

  def _inputs(self, block_tables: np.ndarray, seq_lens: np.ndarray) -> list:
    """The step's inputs (tokens, block tables, seq_lens) on the device.

    Tokens: the last step's output as it is when every row goes on from it; the host's first
    tokens where every row is new; else both, merged on the device (`_merge_tokens`: one small
    host array, -1 on the rows that go on). Never the host's copy of a generated token: that is
    read only after the next step is dispatched. Block tables and seq_lens: each one the last
    step left there where the host's value equals it (the step returns the next seq_lens if the
    batch goes on unchanged), else placed from the host. Steady decode places only the block
    tables a row's new page changed: the three small transfers per step took 10-20% of a DE
    thread's samples on a GPU host, 3% after reuse, but the median synced step did not get
    shorter (the time moved into the step's dispatch; 2x H100, docs/perf/gpu_bench.md record 4,
    call 5).
    """
    last = self._device_inputs or {}
    # Rows that were in the last step: it is in flight or read, and they keep their slots.
    going_on = [row for row, request in enumerate(self._slots)
                if request is not None and row not in self._admitted_rows]
    if going_on and not self._admitted_rows:
      self.input_placements["tokens_reused"] += 1
      tokens = last["tokens"]
    else:
      self.input_placements["tokens"] += 1
      host = np.full((len(self._slots),), -1 if going_on else 0, np.int32)
      for row in self._admitted_rows:
        host[row] = self._slots[row].first_token
      tokens = jax.device_put(host, self.engine.replicated_sharding)
      if going_on:
        tokens = _merge_tokens(tokens, last["tokens"])
    out = [tokens]
    for name, host in (("block_tables", block_tables), ("seq_lens", seq_lens)):
      if name in last and np.array_equal(last[name][0], host):
        self.input_placements[f"{name}_reused"] += 1
        out.append(last[name][1])
      else:
        self.input_placements[name] += 1
        out.append(jax.device_put(host, self.engine.replicated_sharding))
    return out

  def _finish(self, request: TurnRequest) -> None:
    """Persists the turn's completed Full Blocks, frees its pages, ends it when the write commits."""
    start = time.perf_counter()
    try:
      self._persist(request)
    finally:
      self.stage_s["persist"] += time.perf_counter() - start
    del self._decoding[request]

  def _persisted_blocks(self, request: TurnRequest) -> int:
    """Completed blocks of the turn to persist: KV exists for the prompt and every generated
    token but the last (never fed back); the hit's blocks are in the store already."""
    with_kv = request.prompt_tokens + request.gen_tokens - 1
    return max(0, with_kv // self.block_tokens - request.hit_blocks)

  def _read_persisted_pages(self, request: TurnRequest) -> None:
    """Queues the read of a finishing turn's new blocks from the pool right behind its last
    step, before the next step is dispatched: read in _persist, after that next step was
    queued, it waited for it on the device (the pool is that step's output)."""
    todo = self._persisted_blocks(request)
    if self.cluster.runtime_config.skips_kv_io or not todo:
      return
    pages = self.table.block_tables[request]
    n = pow2_at_least(todo)
    page_ids = np.full((n,), paged.SCRATCH_PAGE, np.int32)
    page_ids[:todo] = pages[request.hit_blocks:request.hit_blocks + todo]
    self._page_reads[request] = paged.read_kv_from_pages(self.pool, page_ids,
                                                         n * self.block_tokens)

  def _persist(self, request: TurnRequest) -> None:
    kv = self._page_reads.pop(request, None)
    if self.cluster.runtime_config.skips_kv_io:
      self.table = self.table.free(request)
      self._end(request)
      return
    with_kv = np.concatenate([request.prompt, np.array(request.generated[:-1], np.int32)])
    hashes = chain_block_hashes(with_kv, self.block_tokens)
    todo = hashes[request.hit_blocks:]
    if len(todo) != self._persisted_blocks(request):  # the counts are the same arithmetic
      raise RuntimeError(f"{request.agent_id} turn {request.turn}: {len(todo)} blocks to "
                         f"persist, {self._persisted_blocks(request)} read from the pool")
    if not todo:
      self.table = self.table.free(request)
      self._end(request)
      return
    # kv is its own array, read from the pages before any later step was queued: they can go.
    self.table = self.table.free(request)
    self._persister.submit(self._write_back, request, kv, todo)

  def _write_back(self, request: TurnRequest, kv: jax.Array, todo: list[str]) -> None:
    """On the persister thread: the turn's new blocks D2H, into Full Blocks, to the link. Up to
    2026-11-28 this ran on the DE's own thread: with D2H 'cuda_memcpy' (a synchronous copy) the
    steps that overlapped it took 8.5-10x the median (2P2D, 4x H200, docs/perf/gpu_bench.md
    record 7)."""
    try:
      host = self.tm.d2h(kv)[:, :len(todo) * self.block_tokens]
      request.add_bytes("d2h", kv.nbytes)  # what moved: padded to a power-of-two page count
      blocks = self.cluster.layout.kv_to_full_blocks(host)
      link = self.cluster.links[self.engine.node_id]
      future = self.tm.write(link, request.agent_id, todo, blocks)
      request.add_bytes("store_write", blocks.nbytes)
    except BaseException as e:  # noqa: BLE001  (the turn fails, the DE goes on)
      self._end(request, e)
      return
    future.add_done_callback(lambda f: self._end(request, f.exception()))

  def _end(self, request: TurnRequest, error: BaseException | None = None) -> None:
    if error is not None and request.error is None:
      request.error = error
    request.times["done"] = time.perf_counter()
    request.done.set()
    self.cluster.on_turn_done(request)
