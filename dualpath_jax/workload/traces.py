"""Trace readers: Mooncake FAST'25 JSONL and the project's session JSONL (traces/README.md).

Both formats give lengths and block hash ids, not tokens. `read_trace` makes tokens from the ids:
a trace block's tokens are a pseudo-random function of (seed, id), so equal ids give equal tokens
and a shared id prefix gives a shared token prefix (the store's chained block hashes then hit on
every engine block inside it, for any engine block size that divides the trace's block size).
Tokens that no id determines are unique to their request: Mooncake's partial last block (its id
names a partial block whose content the trace does not pin down, README: "a request-unique tail"),
and in the session format the tokens past the last id. Session-format ids are scoped to their
session (the README's default; it defines no way for a file to say otherwise, so this reader always
namespaces them); Mooncake ids are global to the file.

Mapping a trace onto the replay protocol (PAPER.md section 6.4: the prompt of turn k+1 is our turn
k prompt + our G_k generated tokens + A_{k+1}). The generated tokens are not in a trace, and ours
(forced to the trace's output_length) replace whatever the trace's next prompt holds there:
  * turn 0's append is the whole first prompt (input_length tokens, from the ids);
  * turn k+1's append is sized so that our prompt has the trace's input_length:
    A_{k+1} = input_length_{k+1} - (our prompt_k + output_length_k). Its tokens are the last A_{k+1}
    tokens of the trace request's prompt (from its ids). Where the trace's prompt is shorter than
    that (the trace dropped tokens from its history, e.g. reasoning, or a Mooncake continuation that
    is not a verbatim one), A_{k+1} is 1 token and our prompt is longer than the trace's; sizing
    against our own previous prompt (not the trace's) keeps such excesses from adding up.
  * gen_tokens is the trace's output_length (forced generation), which must be >= 1.

Mooncake sessions (sessions=True) are rebuilt as the README says: request R continues an earlier
request E when E's full 512-token blocks are a prefix of R's ids, R is longer, and the match covers
more than block 0 (which every request shares: a system prompt). Where several earlier requests
match, R continues the one with the longest match, the latest one among equals, that no request has
continued yet (a session is a chain). If every such request has already been continued (R is a
fork, e.g. an edited or regenerated message), R starts a new session whose first append is its whole
prompt; its tokens still follow its ids, so it shares the parent's token prefix. Times: think_s of
turn k+1 is the arrival gap t_{k+1} - t_k in seconds. The trace does not say when turn k ended, so
the gap includes turn k's service time in production; online replay that waits think_s after our
turn k ends therefore paces a session more slowly than the trace (a bound, not an estimate).
arrival_s is the timestamp of the session's first request. Timestamps are milliseconds.
sessions=False takes every request as a one-turn trajectory (its whole prompt, arrival_s its time).

Session JSONL: sessions are explicit (lines of different sessions may interleave; a session's turns
must come as 0, 1, 2, ... in order). think_s is the line's think_time_s (default 0; on turn 0 it is
kept as given), arrival_s the session's arrival_s (absent: None, the experiment's arrival process
decides; if several lines of a session give it, they must agree).

Errors: any malformed line raises one TraceFormatError whose message starts with "path:line: ";
nothing is skipped, except lines holding only whitespace. Unknown keys are ignored.
Returned trajectories are ordered by their first request's line; max_sessions keeps the first ones.
Agent ids: f"{stem}-s{n:05d}" (Mooncake sessions, n counts sessions), f"{stem}-r{line:05d}" (one
request per trajectory), f"{stem}-{session_id}" (session format; characters outside
[A-Za-z0-9._-] become "_", and a "-{n}" suffix keeps ids unique), stem being the file name without
its extension. They never contain "/" (they are KV namespaces).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterator

import numpy as np

from dualpath_jax.workload.synthetic import AgentTrajectory, Turn

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake trace block (one hash id each)."""

FORMATS = ("auto", "mooncake", "session")
"""Values of read_trace's `format`."""

_MASK = (1 << 64) - 1
_MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
_SESSION_FIELDS = ("session_id", "turn", "input_length", "output_length", "hash_ids", "block_size")


class TraceFormatError(ValueError):
  """A malformed trace line. The message starts with "path:line: " and says what is wrong."""

  def __init__(self, path: str, line: int, what: str):
    super().__init__(f"{path}:{line}: {what}")
    self.path = path
    self.line = line


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Request:
  """One parsed trace line."""

  line: int
  """1-based line number in the file."""
  input_length: int
  """Prompt tokens."""
  output_length: int
  """Generated tokens (forced)."""
  hash_ids: list[int]
  """Block ids of the prompt, in order."""
  time_s: float | None = None
  """Mooncake: arrival in seconds."""
  session: str = ""
  """Session format: session id."""
  think_s: float = 0.0
  """Session format: think_time_s."""
  arrival_s: float | None = None
  """Session format: arrival_s, if the line gives it."""


def read_trace(path: str, *, format: str = "auto", vocab_size: int, block_tokens: int = 64,
               sessions: bool = True, max_sessions: int | None = None, seed: int = 0,
               max_requests: int | None = None, scale: int = 1) -> list[AgentTrajectory]:
  """Agent trajectories of the trace at `path` (see the module docstring for the mapping).

  Args:
    path: a JSONL file in the Mooncake or the session format.
    format: "auto" (from the keys of the first non-blank line: "session_id" means the session
      format, "timestamp" Mooncake), "mooncake" or "session".
    vocab_size: token ids are in [0, vocab_size).
    block_tokens: the engine's KV block size; it must divide the trace's block size (512 for
      Mooncake, the file's block_size for sessions) so that the trace's hit structure carries over
      exactly (ValueError otherwise).
    sessions: Mooncake only: rebuild sessions (True) or take each request alone (False). The
      session format always has sessions.
    max_sessions: keep only the first this many trajectories (by first request); None keeps all.
    seed: seeds the token contents (the same seed gives the same tokens for the same ids).
    max_requests: read only the first this many requests (non-blank lines), a time prefix of a
      Mooncake trace; None reads the whole file.
    scale: divides every length by this integer (for CPU runs; sessions are rebuilt from the
      unscaled trace): input and output lengths become length // scale (at least 1) and a trace
      block holds block_size // scale tokens, which block_tokens must divide, so full blocks and
      shared prefixes carry over block for block.

  Raises:
    TraceFormatError: a malformed line ("path:line: what is wrong").
    ValueError: a bad argument.
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  for name, value, low in (("vocab_size", vocab_size, 1), ("block_tokens", block_tokens, 1),
                           ("scale", scale, 1),
                           ("max_sessions", max_sessions, 0), ("max_requests", max_requests, 0)):
    if value is None and name in ("max_sessions", "max_requests"):
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  path = os.fspath(path)
  lines = _lines(path, max_requests)
  if format == "auto":
    first = next(lines, None)
    if first is None:
      return []
    format = _detect(path, *first)
    lines = _chain(first, lines)
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path).split(".")[0]) or "trace"
  if format == "mooncake":
    if MOONCAKE_BLOCK_TOKENS % scale or (MOONCAKE_BLOCK_TOKENS // scale) % block_tokens:
      raise ValueError(f"block_tokens {block_tokens} does not divide the Mooncake block size "
                       f"{MOONCAKE_BLOCK_TOKENS} / scale {scale}: the trace's hits would not "
                       "carry over")
    return _read_mooncake(path, lines, stem=stem, vocab_size=vocab_size, sessions=sessions,
                          max_sessions=max_sessions, seed=seed, scale=scale)
  return _read_sessions(path, lines, stem=stem, vocab_size=vocab_size, block_tokens=block_tokens,
                        max_sessions=max_sessions, seed=seed, scale=scale)


def _scaled(r: _Request, scale: int) -> _Request:
  if scale == 1:
    return r
  return dataclasses.replace(r, input_length=max(1, r.input_length // scale),
                             output_length=max(1, r.output_length // scale))


# --- parsing -----------------------------------------------------------------------------------


def _lines(path: str, max_requests: int | None) -> Iterator[tuple[int, dict]]:
  """(line number, JSON object) of each non-blank line, up to max_requests of them."""
  n = 0
  with open(path, encoding="utf-8") as f:
    for lineno, text in enumerate(f, start=1):
      if not text.strip():
        continue
      if max_requests is not None and n >= max_requests:
        return
      n += 1
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise TraceFormatError(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})"
                               ) from None
      if not isinstance(obj, dict):
        raise TraceFormatError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
      yield lineno, obj


def _chain(first, rest):
  yield first
  yield from rest


def _detect(path: str, lineno: int, obj: dict) -> str:
  if "session_id" in obj:
    return "session"
  if "timestamp" in obj:
    return "mooncake"
  raise TraceFormatError(path, lineno, f"cannot detect the trace format from keys {sorted(obj)}: "
                         "expected 'session_id' (session JSONL) or 'timestamp' (Mooncake)")


def _is_int(v) -> bool:
  return type(v) is int  # not bool


def _is_number(v) -> bool:
  return (type(v) is int or type(v) is float) and math.isfinite(v)


def _require(path: str, lineno: int, obj: dict, fields: tuple[str, ...]) -> None:
  missing = [f for f in fields if f not in obj]
  if missing:
    raise TraceFormatError(path, lineno, f"missing field(s) {', '.join(map(repr, missing))}")


def _int_field(path: str, lineno: int, obj: dict, name: str, low: int) -> int:
  v = obj[name]
  if not _is_int(v):
    raise TraceFormatError(path, lineno, f"{name} must be an integer, got {v!r}")
  if v < low:
    raise TraceFormatError(path, lineno, f"{name} must be >= {low}, got {v}")
  return v


def _hash_ids(path: str, lineno: int, obj: dict) -> list[int]:
  ids = obj["hash_ids"]
  if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
    raise TraceFormatError(path, lineno, "hash_ids must be a list of integers")
  if ids and (min(ids) < -(1 << 63) or max(ids) > _MASK):
    raise TraceFormatError(path, lineno, "hash_ids must fit in 64 bits")
  return ids


def _parse_mooncake(path: str, lineno: int, obj: dict, last_time: float) -> _Request:
  _require(path, lineno, obj, _MOONCAKE_FIELDS)
  t = obj["timestamp"]
  if not _is_number(t) or t < 0:
    raise TraceFormatError(path, lineno, f"timestamp must be a number >= 0 (ms), got {t!r}")
  if t < last_time:
    raise TraceFormatError(path, lineno, f"timestamp {t} is before the previous line's "
                           f"{last_time}: Mooncake traces are sorted by time")
  n = _int_field(path, lineno, obj, "input_length", 1)
  out = _int_field(path, lineno, obj, "output_length", 1)
  ids = _hash_ids(path, lineno, obj)
  want = -(-n // MOONCAKE_BLOCK_TOKENS)
  if len(ids) != want:
    raise TraceFormatError(path, lineno, f"{len(ids)} hash_ids for input_length {n}: expected "
                           f"ceil({n} / {MOONCAKE_BLOCK_TOKENS}) = {want}")
  return _Request(line=lineno, input_length=n, output_length=out, hash_ids=ids, time_s=t / 1000)


def _parse_session(path: str, lineno: int, obj: dict, block_size: int | None) -> tuple[_Request,
                                                                                         int]:
  _require(path, lineno, obj, _SESSION_FIELDS)
  sid = obj["session_id"]
  if not isinstance(sid, str) or not sid:
    raise TraceFormatError(path, lineno, f"session_id must be a non-empty string, got {sid!r}")
  _int_field(path, lineno, obj, "turn", 0)
  n = _int_field(path, lineno, obj, "input_length", 1)
  out = _int_field(path, lineno, obj, "output_length", 1)
  bs = _int_field(path, lineno, obj, "block_size", 1)
  if block_size is not None and bs != block_size:
    raise TraceFormatError(path, lineno, f"block_size {bs} differs from the file's {block_size} "
                           "(earlier lines): one block size per file")
  ids = _hash_ids(path, lineno, obj)
  if len(ids) not in (n // bs, -(-n // bs)):
    raise TraceFormatError(path, lineno, f"{len(ids)} hash_ids for input_length {n} and "
                           f"block_size {bs}: expected floor or ceil of {n} / {bs}")
  think = obj.get("think_time_s", 0.0)
  if not _is_number(think) or think < 0:
    raise TraceFormatError(path, lineno, f"think_time_s must be a number >= 0, got {think!r}")
  arrival = obj.get("arrival_s")
  if arrival is not None and (not _is_number(arrival) or arrival < 0):
    raise TraceFormatError(path, lineno, f"arrival_s must be a number >= 0, got {arrival!r}")
  return _Request(line=lineno, input_length=n, output_length=out, hash_ids=ids, session=sid,
                  think_s=float(think),
                  arrival_s=None if arrival is None else float(arrival)), bs


# --- Mooncake ----------------------------------------------------------------------------------


def _read_mooncake(path: str, lines, *, stem: str, vocab_size: int, sessions: bool,
                   max_sessions: int | None, seed: int, scale: int = 1) -> list[AgentTrajectory]:
  bt = MOONCAKE_BLOCK_TOKENS // scale
  id_key = _key(seed, 0x6D6F6F6E)     # "moon": global block-id scope of the file
  tail_key = _key(seed, 0x7461696C)   # "tail": request-unique tails, by line
  requests: list[_Request] = []
  last_time = 0.0
  for lineno, obj in lines:
    r = _parse_mooncake(path, lineno, obj, last_time)
    last_time = obj["timestamp"]
    requests.append(r)
    if not sessions and max_sessions is not None and len(requests) >= max_sessions:
      break

  def tokens(r: _Request, start: int) -> np.ndarray:
    full = r.input_length // bt
    keys = _block_keys(id_key, r.hash_ids[:full])
    return _tokens(keys, bt, _key(tail_key, r.line), start, r.input_length, vocab_size)

  if not sessions:
    return [AgentTrajectory(
        agent_id=f"{stem}-r{r.line:05d}", arrival_s=r.time_s,
        turns=(Turn(append_ids=tokens(r, 0), gen_tokens=r.output_length),))
        for r in (_scaled(r, scale) for r in requests)]

  chains = _mooncake_sessions(requests)
  if max_sessions is not None:
    chains = chains[:max_sessions]
  out = []
  for n, chain in enumerate(chains):
    rs = [_scaled(requests[i], scale) for i in chain]
    gaps = [b.time_s - a.time_s for a, b in itertools.pairwise(rs)]
    turns = _turns(rs, tokens, think=[0.0, *gaps])
    out.append(AgentTrajectory(agent_id=f"{stem}-s{n:05d}", turns=turns, arrival_s=rs[0].time_s))
  return out


def _mooncake_sessions(requests: list[_Request]) -> list[list[int]]:
  """Requests (indices) of each rebuilt session, sessions by first request."""
  bt = MOONCAKE_BLOCK_TOKENS
  by_prefix: dict[tuple[int, int], list[int]] = {}   # (full blocks k, id of block k-1) -> requests
  continued = [False] * len(requests)
  session_of = [0] * len(requests)
  chains: list[list[int]] = []
  for i, r in enumerate(requests):
    ids = r.hash_ids
    parent = None
    for k in range(len(ids), 1, -1):   # longest match first; k = 1 (block 0 only) is ignored
      candidates = [e for e in by_prefix.get((k, ids[k - 1]), ())
                    if requests[e].input_length < r.input_length
                    and requests[e].hash_ids[:k] == ids[:k]]
      if candidates:
        open_ = [e for e in candidates if not continued[e]]
        parent = open_[-1] if open_ else None
        break
    if parent is None:
      session_of[i] = len(chains)
      chains.append([i])
    else:
      continued[parent] = True
      session_of[i] = session_of[parent]
      chains[session_of[i]].append(i)
    full = r.input_length // bt
    if full >= 2:
      by_prefix.setdefault((full, ids[full - 1]), []).append(i)
  return chains


# --- session JSONL -----------------------------------------------------------------------------


def _read_sessions(path: str, lines, *, stem: str, vocab_size: int, block_tokens: int,
                   max_sessions: int | None, seed: int, scale: int = 1) -> list[AgentTrajectory]:
  block_size = None
  by_session: dict[str, list[_Request]] = {}
  arrival: dict[str, float | None] = {}
  for lineno, obj in lines:
    r, bs = _parse_session(path, lineno, obj, block_size)
    if block_size is None:
      block_size = bs
      if bs % scale or (bs // scale) % block_tokens:
        raise ValueError(f"{path}:{lineno}: block_tokens {block_tokens} does not divide the "
                         f"trace's block_size {bs} / scale {scale}: the trace's hits would not "
                         "carry over")
    turns = by_session.setdefault(r.session, [])
    if obj["turn"] != len(turns):
      what = (f"turn {obj['turn']} follows turn {len(turns) - 1}" if turns
              else f"starts with turn {obj['turn']}")
      raise TraceFormatError(path, lineno, f"session {r.session!r} {what}: a session's turns "
                             "must come as 0, 1, 2, ... in order")
    turns.append(r)
    if r.arrival_s is not None:
      if arrival.get(r.session) is not None and arrival[r.session] != r.arrival_s:
        raise TraceFormatError(path, lineno, f"session {r.session!r}: arrival_s {r.arrival_s} "
                               f"differs from its earlier {arrival[r.session]}")
      arrival[r.session] = r.arrival_s
  out = []
  used: set[str] = set()
  for n, (sid, rs) in enumerate(by_session.items()):
    if max_sessions is not None and n >= max_sessions:
      break
    scope = _key(seed, 0x73657373, _text_key(sid))   # "sess": ids are scoped to their session

    def tokens(r: _Request, start: int, scope=scope) -> np.ndarray:
      keys = _block_keys(scope, r.hash_ids)
      return _tokens(keys, block_size // scale, _key(scope, 0x7461696C, r.line), start,
                     r.input_length, vocab_size)

    name = f"{stem}-{re.sub(r'[^A-Za-z0-9._-]', '_', sid)}"
    if name in used:
      name = f"{name}-{n}"
    used.add(name)
    rs = [_scaled(r, scale) for r in rs]
    out.append(AgentTrajectory(agent_id=name, turns=_turns(rs, tokens, [r.think_s for r in rs]),
                               arrival_s=arrival.get(sid)))
  return out


# --- shared: turns and tokens ------------------------------------------------------------------


def _turns(rs: list[_Request], tokens, think: list[float]) -> tuple[Turn, ...]:
  """Replay-protocol turns of one session's requests (see the module docstring)."""
  turns = []
  prompt = 0
  for k, r in enumerate(rs):
    if k == 0:
      append = r.input_length
    else:
      append = max(1, r.input_length - (prompt + rs[k - 1].output_length))
      prompt += rs[k - 1].output_length
    prompt += append
    turns.append(Turn(append_ids=tokens(r, r.input_length - append), gen_tokens=r.output_length,
                      think_s=float(think[k])))
  return tuple(turns)


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
  """A 64-bit key mixing `parts` (ints, taken mod 2^64) in order."""
  k = np.zeros(1, np.uint64)
  for p in parts:
    k = _mix64(k ^ np.uint64(p & _MASK))
  return int(k[0])


def _text_key(text: str) -> int:
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _block_keys(scope: int, ids: list[int]) -> np.ndarray:
  """uint64 key of each block id in `scope`."""
  try:
    arr = np.array(ids, np.int64).astype(np.uint64)
  except OverflowError:
    arr = np.array([i & _MASK for i in ids], np.uint64)
  return _mix64(arr ^ np.uint64(scope))


def _tokens(block_keys: np.ndarray, block_size: int, tail_key: int, start: int, end: int,
            vocab_size: int) -> np.ndarray:
  """int32 tokens [start, end) of a prompt: position p is token p % block_size of block
  p // block_size's pseudo-random content where that block has a key, else unique to the request
  (from tail_key and p)."""
  pos = np.arange(start, end, dtype=np.uint64)
  base = np.uint64(tail_key) + pos
  n = block_keys.size
  if n:
    block = pos // np.uint64(block_size)
    keyed = block < np.uint64(n)
    own = block_keys[np.minimum(block, np.uint64(n - 1)).astype(np.intp)]
    base = np.where(keyed, own + pos % np.uint64(block_size), base)
  return (_mix64(base) % np.uint64(vocab_size)).astype(np.int32)
