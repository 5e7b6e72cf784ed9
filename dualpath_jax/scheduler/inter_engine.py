"""Inter-engine scheduling (PAPER.md 5.2-5.4): which PE and DE run a request, which side reads it.

Every function takes the state of one fetch (load reports, waiting requests) and returns the
decisions as (request_id, engine or group) pairs in assignment order; the caller removes the
assigned requests from its queues and updates its own loads. Requests that are not returned stay
waiting for a later fetch. Nothing here reads a clock or touches a device.

  derive_alpha_beta        the thresholds alpha (read queue) and beta (unfinished tokens)
  select_prefill_engines   one fetch of one PE group: C2 before C3, never C1, FIFO
  interleave_prefill_fetches
                           [ours] every PE group's fetch of one pass, interleaved one request at
                           a time: the group of least summed tok first (ties: a rotation)
  assign_decode_groups     DE phase 1: the global queue into groups, minimum sum of tok
  select_decode_engines    DE phase 2: one group's private queue into its DEs (HBM fit, Z rule)
  choose_read_side         the node with the shorter read queue, ties to the PE
  split_read               beyond the paper: split one read so both links drain together
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from dualpath_jax.scheduler.state import EngineLoad, WaitingRequest

Z_SLACK = 1.05
"""Factor of the high-token threshold Z over the group's mean tokens per DE (PAPER.md 5.3)."""


def _check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
      or not math.isfinite(value):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_unique_engines(engines: Sequence[EngineLoad]) -> None:
  indices = [e.engine for e in engines]
  if len(set(indices)) != len(indices):
    raise ValueError(f"engine indices must be unique within a fetch, got {indices}")


def derive_alpha_beta(*, link_bytes_per_s: float, kv_bytes_per_token: int,
                      prefill_tokens_per_s: float, read_window_s: float = 3.0,
                      compute_window_s: float = 5.0) -> tuple[int, int]:
  """(alpha, beta) in tokens, from profiled rates.

  alpha: the tokens of KV one node's storage link reads in `read_window_s` (paper: 3 s);
  beta: the new tokens one PE prefills in `compute_window_s` (paper: 5 s). Both are floored.
  """
  _check_positive("link_bytes_per_s", link_bytes_per_s)
  _check_positive("kv_bytes_per_token", kv_bytes_per_token)
  _check_positive("prefill_tokens_per_s", prefill_tokens_per_s)
  _check_positive("read_window_s", read_window_s)
  _check_positive("compute_window_s", compute_window_s)
  alpha = math.floor(link_bytes_per_s * read_window_s / kv_bytes_per_token)
  beta = math.floor(prefill_tokens_per_s * compute_window_s)
  return alpha, beta


def select_prefill_engines(waiting: Sequence[WaitingRequest], engines: Sequence[EngineLoad], *,
                           alpha: float, beta: float) -> list[tuple[int, int]]:
  """One fetch of one PE group (PAPER.md 5.2): (request_id, engine) pairs, FIFO over `waiting`.

  An engine with tok > beta (C1, overloaded) is never chosen. Engines with tok <= beta are C2 when
  their node's read queue is <= alpha and C3 otherwise; each request goes to the engine of least
  tok in C2 if C2 is non-empty, else in C3 (ties: lowest engine index). The chosen engine's tok
  grows by the request's new tokens (read queues are not updated within a fetch), and the engines
  are classified again. The fetch ends as soon as no engine qualifies.
  """
  _check_unique_engines(engines)
  tok = {e.engine: e.tok for e in engines}
  short_queue = {e.engine: e.read_queue_tokens <= alpha for e in engines}
  assigned: list[tuple[int, int]] = []
  for request in waiting:
    qualified = [i for i in tok if tok[i] <= beta]
    if not qualified:
      break
    c2 = [i for i in qualified if short_queue[i]]
    candidates = c2 or qualified  # qualified minus C2 is C3
    chosen = min(candidates, key=lambda i: (tok[i], i))
    assigned.append((request.request_id, chosen))
    tok[chosen] += request.new_tokens
  return assigned


def interleave_prefill_fetches(waiting: Sequence[WaitingRequest],
                               groups: Mapping[int, Sequence[EngineLoad]], *, alpha: float,
                               beta: float, start: int = 0) -> tuple[list[tuple[int, int]], int]:
  """[ours] All PE groups' fetches of one scheduling pass, interleaved one request at a time.

  The paper's groups pull work on their own clocks, so a group with less unfinished work comes
  back for more sooner; it does not say in which order an emulation that fetches for every group
  at once should serve them. Letting one group's fetch (select_prefill_engines) take the whole
  queue while its engines stay under beta hands a lightly loaded system's every request to that
  one group. Instead, for each request in FIFO order, the groups are ordered by the sum of tok
  over their engines (least first; ties by rotation: the group at position `start` of the sorted
  group ids first, then the ones after it, cyclically), and the first group with a qualifying
  engine (tok <= beta) takes the request as a fetch of that one request would: the engine of
  least tok in C2, else in C3. That engine's tok grows by the request's new tokens, the rotation
  moves to the position after the group that took it, and the groups are ordered again. With
  equal loads the groups alternate; under load the one of least tok gets the request. The pass
  ends when no engine of any group qualifies (the remaining requests stay waiting, FIFO).

  Returns ((request_id, engine) pairs in assignment order, the rotation position for the next
  pass: `start` modulo the number of groups if nothing was assigned).
  """
  ids = sorted(groups)
  engines_of = {g: list(groups[g]) for g in ids}
  _check_unique_engines([e for g in ids for e in engines_of[g]])
  if not ids:
    return [], start
  position = start % len(ids)
  tok = {e.engine: e.tok for g in ids for e in engines_of[g]}
  assigned: list[tuple[int, int]] = []
  for request in waiting:
    order = sorted(range(len(ids)), key=lambda k: (
        sum(tok[e.engine] for e in engines_of[ids[k]]), (k - position) % len(ids)))
    for k in order:
      current = [dataclasses.replace(e, tok=tok[e.engine]) for e in engines_of[ids[k]]]
      chosen = select_prefill_engines([request], current, alpha=alpha, beta=beta)
      if chosen:
        engine = chosen[0][1]
        assigned.append((request.request_id, engine))
        tok[engine] += request.new_tokens
        position = (k + 1) % len(ids)
        break
    else:
      break  # no engine of any group qualifies; qualification does not depend on the request
  return assigned, position


def assign_decode_groups(waiting: Sequence[WaitingRequest],
                         groups: Mapping[int, Sequence[EngineLoad]]) -> list[tuple[int, int]]:
  """DE phase 1 (PAPER.md 5.3): every request of the global queue to a group, FIFO.

  Each goes to the group with the minimum sum of tok over its engines (ties: lowest group id),
  whose sum then grows by the request's total tokens. Returns (request_id, group) pairs.
  """
  if not waiting:
    return []
  if not groups:
    raise ValueError("assign_decode_groups: no decode groups to assign to")
  load = {g: sum(e.tok for e in engines) for g, engines in groups.items()}
  assigned: list[tuple[int, int]] = []
  for request in waiting:
    chosen = min(load, key=lambda g: (load[g], g))
    assigned.append((request.request_id, chosen))
    load[chosen] += request.total_tokens
  return assigned


def select_decode_engines(private_queue: Sequence[WaitingRequest],
                          engines: Sequence[EngineLoad]) -> list[tuple[int, int]]:
  """DE phase 2 (PAPER.md 5.3): one fetch of one DE group's private queue, FIFO.

  R is the longest head of the queue whose summed kv_bytes fit in the group's summed free bytes
  (no fragmentation assumed); Z = 1.05 * (sum of len_r over R + sum of tok_e) / |E|, computed once
  per fetch. For the head request r, among the engines with free_bytes >= r.kv_bytes, those with
  tok + len_r <= Z are preferred, choosing the least seq (ties: least tok, then lowest index);
  if there are none, the high-token ones, choosing the least tok (ties: lowest index). The chosen
  engine's seq, tok and free bytes are updated. The fetch ends when no engine has room for the
  head. Returns (request_id, engine) pairs.
  """
  _check_unique_engines(engines)
  if not engines:
    return []
  free_total = sum(e.free_bytes for e in engines)
  fit_tokens, fit_bytes = 0, 0
  for request in private_queue:
    if fit_bytes + request.kv_bytes > free_total:
      break
    fit_bytes += request.kv_bytes
    fit_tokens += request.total_tokens
  z = Z_SLACK * (fit_tokens + sum(e.tok for e in engines)) / len(engines)

  seq = {e.engine: e.seq for e in engines}
  tok = {e.engine: e.tok for e in engines}
  free = {e.engine: e.free_bytes for e in engines}
  assigned: list[tuple[int, int]] = []
  for request in private_queue:
    roomy = [i for i in free if free[i] >= request.kv_bytes]
    if not roomy:
      break
    others = [i for i in roomy if tok[i] + request.total_tokens <= z]
    if others:
      chosen = min(others, key=lambda i: (seq[i], tok[i], i))
    else:
      chosen = min(roomy, key=lambda i: (tok[i], i))
    assigned.append((request.request_id, chosen))
    seq[chosen] += 1
    tok[chosen] += request.total_tokens
    free[chosen] -= request.kv_bytes
  return assigned


def choose_read_side(*, pe_queue_tokens: int, de_queue_tokens: int, pe_recent_tokens: int = 0,
                     de_recent_tokens: int = 0) -> str:
  """The node with the shorter read queue (PAPER.md 5.4): 'pe' or 'de'.

  Ties (typically two idle links) go to the node whose link read fewer tokens recently (the
  paper is silent; sending every read of a lightly loaded system to the PE side would load one
  link of the pair only), then to 'pe'.
  """
  if de_queue_tokens != pe_queue_tokens:
    return "de" if de_queue_tokens < pe_queue_tokens else "pe"
  return "de" if de_recent_tokens < pe_recent_tokens else "pe"


def split_read(*, hit_blocks: int, block_tokens: int, pe_queue_tokens: int,
               de_queue_tokens: int, pe_tokens_per_s: float,
               de_tokens_per_s: float) -> tuple[int, int]:
  """(pe_blocks, de_blocks) summing to `hit_blocks`: one read split over both nodes' links.

  Beyond the paper (its stated future work). The split makes both links expected to drain at the
  same time, (pe_q + x * bt) / pe_rate = (de_q + (H - x) * bt) / de_rate, with x clamped to
  [0, H] and rounded to the nearest whole block (half a block goes to the PE side). The runtime
  reads the first pe_blocks on the PE side and the rest on the DE side.
  """
  for name, value in (("hit_blocks", hit_blocks), ("pe_queue_tokens", pe_queue_tokens),
                      ("de_queue_tokens", de_queue_tokens)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}")
  if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens <= 0:
    raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
  _check_positive("pe_tokens_per_s", pe_tokens_per_s)
  _check_positive("de_tokens_per_s", de_tokens_per_s)
  if hit_blocks == 0:
    return 0, 0
  pe_rate, de_rate = pe_tokens_per_s, de_tokens_per_s
  x = (pe_rate * (de_queue_tokens + hit_blocks * block_tokens) - de_rate * pe_queue_tokens) / (
      block_tokens * (pe_rate + de_rate))
  pe_blocks = min(hit_blocks, max(0, math.floor(x + 0.5)))
  return pe_blocks, hit_blocks - pe_blocks
