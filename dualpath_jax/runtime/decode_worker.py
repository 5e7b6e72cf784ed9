"""A decode engine (DE): takes prompts from its node buffer into a paged pool, decodes, persists.

Admission (PAPER.md section 2.4): once the DE node buffer holds a request's complete prompt KV, the
DE allocates pages, moves the KV onto its device (H2D), releases the host buffer and starts
decoding. Every step decodes all admitted sequences together (padded to decode_batch_size: one
compiled program). When a sequence has its forced number of tokens, every completed Full Block of
the turn (the appended prompt and the generated tokens, those before the hit excluded) goes D2H and
is written to the store through this node's storage link; the turn ends when the write commits,
so the agent's next turn hits it. In oracle mode the prompt KV never arrives (the pages hold
whatever was there) and nothing is persisted.
"""

from __future__ import annotations

import collections
import threading
import time

import jax
import numpy as np

from dualpath_jax.kvstore.hashing import chain_block_hashes
from dualpath_jax.model import paged
from dualpath_jax.model.prefill import pow2_at_least
from dualpath_jax.runtime.request import TurnRequest


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
    self._active: list[TurnRequest] = []
    self._stopping = False
    self.stage_s: collections.Counter = collections.Counter()
    """Seconds of this DE's thread per stage: 'admit' (a prompt's KV H2D into its pages),
    'step' (decode steps), 'persist' (a finished turn's new blocks D2H and handed to the link)."""
    self.step_records: list[tuple[float, float, int]] = []
    """(t_start, t_end, active sequences) of every decode step, perf_counter seconds (for the
    step-time inflation under KV traffic, runtime/metrics.py decode_inflation)."""
    self._device_inputs: dict | None = None
    """The last step's inputs on the device and what the next step's would be if the batch goes
    on unchanged (`_inputs`); host copies to check against."""
    self.input_placements: collections.Counter = collections.Counter()
    """How often each decode input was placed from the host ('tokens', 'block_tables',
    'seq_lens') against reused from the device ('<name>_reused')."""

  def release_device_memory(self) -> None:
    """Drops this DE's page pool and model copy (after the thread has stopped)."""
    self.pool = self.model = None

  def precompile(self, token_counts) -> int:
    """Compiles the admission's page write for each prompt KV length (Cluster.admit_tokens) by
    writing zeros to the scratch page, before the clock starts: otherwise the first admission of
    a new length compiles on this thread, between decode steps. Call it while no request is in
    flight. Returns how many lengths ran."""
    layout = self.cluster.layout
    for tokens in token_counts:
      kv = jax.device_put(np.zeros((layout.num_layers, tokens, *layout.token_kv_shape),
                                   layout.np_dtype), self.engine.replicated_sharding)
      page_ids = np.full((-(-tokens // self.block_tokens),), paged.SCRATCH_PAGE, np.int32)
      self.pool = paged.write_kv_to_pages(self.pool, kv, page_ids)
    jax.block_until_ready(self.pool)
    return len(token_counts)

  def submit(self, request: TurnRequest) -> None:
    with self._cond:
      self._pending.append(request)
      self._cond.notify_all()

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()

  def run(self) -> None:
    while True:
      with self._cond:
        while not self._stopping and not self._pending and not self._active:
          self._cond.wait()
        if self._stopping:
          return
        room = self.cluster.runtime_config.decode_batch_size - len(self._active)
        admitted, self._pending = self._pending[:room], self._pending[room:]
      try:
        for request in admitted:
          start = time.perf_counter()
          self._admit(request)
          self.stage_s["admit"] += time.perf_counter() - start
        if self._active:
          self._step()
      except BaseException as e:
        for request in admitted + self._active:
          request.error = e
          self._end(request)
        self._active = []

  def _admit(self, request: TurnRequest) -> None:
    request.times["decode_start"] = time.perf_counter()
    self.table = self.table.allocate(request, request.prompt_tokens)
    pages = self.table.block_tables[request]
    if not self.cluster.runtime_config.skips_kv_io:
      # The buffer's array is already padded to whole pages (Cluster.admit_tokens): it moves as
      # it is, and the padding pages are written to the scratch page.
      n = request.prompt_kv.shape[1] // self.block_tokens
      page_ids = np.full((n,), paged.SCRATCH_PAGE, np.int32)
      page_ids[:len(pages)] = pages
      kv = self.tm.h2d(request.prompt_kv)
      request.add_bytes("h2d", kv.nbytes)  # what moved, padding included
      self.pool = paged.write_kv_to_pages(self.pool, kv, page_ids)
      request.prompt_kv = None
      # The buffer's memory goes back to its pool for the next request: the copy must have
      # read it first (a device_put may still be reading when it returns).
      kv.block_until_ready()
      request.de_reservation.release()
    request.generated = [request.first_token]
    request.times["first_token"] = time.perf_counter()
    if request.gen_tokens == 1:
      request.times["last_token"] = request.times["first_token"]
      self._finish(request)
    else:
      self._active.append(request)

  def _step(self) -> None:
    start = time.perf_counter()
    batch = self.cluster.runtime_config.decode_batch_size
    self.table, block_tables, seq_lens = self.table.prepare_decode(
        self._active, batch_size=batch, max_pages=self.max_pages)
    tokens = np.zeros((batch,), np.int32)
    tokens[:len(self._active)] = [r.generated[-1] for r in self._active]
    inputs = self._inputs(tokens, block_tables, seq_lens)
    with self.tm.model_step():
      next_dev, lens_dev, self.pool = paged.greedy_decode_step_jit(self.model, self.pool, *inputs)
      next_tokens = np.asarray(next_dev)
    self._device_inputs = dict(
        tokens=(next_tokens, next_dev), block_tables=(block_tables, inputs[1]),
        seq_lens=(np.where(seq_lens > 0, seq_lens + 1, 0), lens_dev), rows=len(self._active))
    self.step_records.append((start, time.perf_counter(), len(self._active)))
    self.stage_s["step"] += self.step_records[-1][1] - start
    still = []
    now = time.perf_counter()
    for row, request in enumerate(self._active):
      request.generated.append(int(next_tokens[row]))
      if len(request.generated) == 2:
        request.times["second_token"] = now
      if len(request.generated) == request.gen_tokens:
        request.times["last_token"] = now
      if len(request.generated) >= request.gen_tokens:
        self._finish(request)
      else:
        still.append(request)
    self._active = still

  def _inputs(self, tokens: np.ndarray, block_tables: np.ndarray, seq_lens: np.ndarray) -> list:
    """The step's inputs on the device: each one the last step left there where the host's
    value equals it, else placed from the host. Steady decode places only the block tables a
    row's new page changed: the three small transfers per step took 10-20% of a DE thread's
    samples on a GPU host, 3% after this change, but the median step did not get shorter (the
    time moved into the step's dispatch; 2x H100, docs/perf/gpu_bench.md record 4, call 5).
    Tokens compare on the active rows only: a padding row's token (the last step's argmax
    there) never reaches an active row."""
    last = self._device_inputs or {}
    rows = len(self._active)
    same = dict(
        tokens=last.get("rows") == rows and "tokens" in last
        and np.array_equal(last["tokens"][0][:rows], tokens[:rows]),
        block_tables="block_tables" in last and np.array_equal(last["block_tables"][0],
                                                               block_tables),
        seq_lens="seq_lens" in last and np.array_equal(last["seq_lens"][0], seq_lens))
    out = []
    for name, host in (("tokens", tokens), ("block_tables", block_tables),
                       ("seq_lens", seq_lens)):
      if same[name]:
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

  def _persist(self, request: TurnRequest) -> None:
    pages = self.table.block_tables[request]
    if self.cluster.runtime_config.skips_kv_io:
      self.table = self.table.free(request)
      self._end(request)
      return
    layout = self.cluster.layout
    # KV exists for the prompt and every generated token but the last (never fed back).
    with_kv = np.concatenate([request.prompt, np.array(request.generated[:-1], np.int32)])
    hashes = chain_block_hashes(with_kv, self.block_tokens)
    todo = hashes[request.hit_blocks:]
    if not todo:
      self.table = self.table.free(request)
      self._end(request)
      return
    n = pow2_at_least(len(todo))
    page_ids = np.full((n,), paged.SCRATCH_PAGE, np.int32)
    page_ids[:len(todo)] = pages[request.hit_blocks:len(hashes)]
    kv = paged.read_kv_from_pages(self.pool, page_ids, n * self.block_tokens)
    host = self.tm.d2h(kv)[:, :len(todo) * self.block_tokens]
    request.add_bytes("d2h", kv.nbytes)  # what moved: padded to a power-of-two page count
    blocks = layout.kv_to_full_blocks(host)
    self.table = self.table.free(request)
    link = self.cluster.links[self.engine.node_id]
    future = self.tm.write(link, request.agent_id, todo, blocks)
    request.add_bytes("store_write", blocks.nbytes)
    future.add_done_callback(lambda f: self._end(request, f.exception()))

  def _end(self, request: TurnRequest, error: BaseException | None = None) -> None:
    if error is not None and request.error is None:
      request.error = error
    request.times["done"] = time.perf_counter()
    request.done.set()
    self.cluster.on_turn_done(request)
