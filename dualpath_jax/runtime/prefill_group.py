"""A PE group: the PE engines of one node, data-parallel shards that run forwards in lock step.

PAPER.md 5.5: with data-parallel attention every shard of a group runs its own requests and the
shards meet after each forward, so uneven shards leave bubbles. The group leader (this thread)
picks one batch per shard from that shard's FIFO queue of requests whose reads have completed:

  quota         compute-quota selection: a shard's batch fills up to `compute_quota_s` of
                predicted forward time (the cost model fit on this device kind); the request that
                would overflow is chunked (chunked prefill) and its remainder waits for a later
                forward with a larger cached length
  token_budget  the baseline: new tokens up to `token_budget`, no quota

then runs the shards' batches at once (one executor thread per shard), waits for all of them (the
synchronisation point), and records each shard's predicted and measured forward time for the
attention-balance metric. Chunks are rounded down to whole blocks (at least one) so that cached
lengths stay block-aligned and the compiled shapes stay few.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

from dualpath_jax.runtime.prefill_shard import PrefillShard
from dualpath_jax.runtime.request import TurnRequest
from dualpath_jax.scheduler.quota import (CostModel, QueuedPrefill, select_quota_batch,
                                          select_token_budget_batch)


class PrefillGroup(threading.Thread):
  """The leader of one PE group: selects, runs and records lock-step data-parallel forwards."""

  def __init__(self, cluster, shards: list[PrefillShard], cost_model: CostModel, *, node_id: int):
    super().__init__(name=f"prefill-group{node_id}", daemon=True)
    self.cluster = cluster
    self.shards = {shard.engine.index: shard for shard in shards}
    self.cost_model = cost_model
    self.node_id = node_id
    self._cond = threading.Condition()
    self._queues: dict[int, list[TurnRequest]] = {index: [] for index in self.shards}
    self._stopping = False
    self._pool = concurrent.futures.ThreadPoolExecutor(len(shards),
                                                       thread_name_prefix=f"pe-group{node_id}")
    self.forwards: list[list[tuple[float, float] | None]] = []
    """Per forward, per shard (in engine order): (predicted_s, measured_s), None when idle."""
    self.loaded: list[bool] = []
    """Per forward: every shard's batch was cut by the quota (or budget) with more ready work
    waiting, i.e. the group was loaded (the regime of the paper's balance figure)."""

  def submit(self, request: TurnRequest) -> None:
    with self._cond:
      self._queues[request.prefill_engine].append(request)
      self._cond.notify_all()

  def wake(self) -> None:
    with self._cond:
      self._cond.notify_all()

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()

  def close(self) -> None:
    self.stop()
    self.join(timeout=30)
    self._pool.shutdown(wait=True)

  # --- batch selection ---------------------------------------------------------------------------

  def _select(self, queue: list[TurnRequest]) -> tuple[list[tuple[TurnRequest, int, int]], bool]:
    """One shard's batch, (request, cached, new) chunks FIFO over requests whose reads are done,
    and whether ready work is left over (the batch was cut)."""
    config = self.cluster.runtime_config
    ready = [r for r in queue if r.reads_done()]
    entries = [QueuedPrefill(request_id=r.request_id, cached=r.hit_tokens + r.prefilled_tokens,
                             remaining=r.new_tokens - r.prefilled_tokens) for r in ready]
    if not entries:
      return [], False
    bt = self.cluster.layout.block_tokens
    if config.batching == "quota":
      chosen = select_quota_batch(entries, cost=self.cost_model, quota_s=config.compute_quota_s,
                                  max_requests=config.max_batch_requests, min_chunk_tokens=bt)
    else:
      chosen = select_token_budget_batch(entries, token_budget=config.token_budget,
                                         max_requests=config.max_batch_requests)
    by_id = {r.request_id: r for r in ready}
    left = {e.request_id: e.remaining for e in entries}
    chunks = []
    for chunk in chosen:
      new = chunk.new
      if new < left[chunk.request_id]:  # a partial chunk: whole blocks, at least one
        new = max(bt, new // bt * bt)
      chunks.append((by_id[chunk.request_id], chunk.cached, new))
    return chunks, sum(new for _, _, new in chunks) < sum(left.values())

  def _next_batches(self) -> dict[int, list] | None:
    with self._cond:
      while not self._stopping:
        selected = {index: self._select(queue) for index, queue in self._queues.items()}
        if any(chunks for chunks, _ in selected.values()):
          self.loaded.append(all(more for _, more in selected.values()))
          return {index: chunks for index, (chunks, _) in selected.items()}
        self._cond.wait(0.05)
      return None

  # --- the loop ----------------------------------------------------------------------------------

  def run(self) -> None:
    while (batches := self._next_batches()) is not None:
      futures = {index: self._pool.submit(self.shards[index].run_batch, chunks)
                 for index, chunks in batches.items() if chunks}
      record: list[tuple[float, float] | None] = []
      for index in sorted(self.shards):
        chunks = batches[index]
        if not chunks:
          record.append(None)
          continue
        predicted = self.cost_model.predict([(cached, new) for _, cached, new in chunks])
        try:
          measured = futures[index].result()
        except BaseException as e:  # surfaced by the runner; the group keeps serving
          for request, _, _ in chunks:
            self._fail(request, e)
          record.append(None)
          continue
        record.append((predicted, measured))
        for request, _, new in chunks:
          self._advance(request, new)
      self.forwards.append(record)

  def _advance(self, request: TurnRequest, new: int) -> None:
    request.prefilled_tokens += new
    request.chunks += 1
    finished = request.prefilled_tokens == request.new_tokens
    if finished:
      with self._cond:
        self._queues[request.prefill_engine].remove(request)
      request.times["prefill_done"] = time.perf_counter()
    self.cluster.scheduler.prefill_progress(request, new, finished)
    if finished:
      self.cluster.decode_workers[request.decode_engine].submit(request)

  def _fail(self, request: TurnRequest, error: BaseException) -> None:
    with self._cond:
      if request in self._queues[request.prefill_engine]:
        self._queues[request.prefill_engine].remove(request)
    request.error = error
    self.cluster.scheduler.prefill_progress(
        request, request.new_tokens - request.prefilled_tokens, True)
    request.done.set()
    self.cluster.on_turn_done(request)
