"""Trace readers (workload/traces.py): Mooncake and session JSONL, session rebuilding, tokens,
malformed lines, and a smoke read of the real traces."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dualpath_jax.kvstore.hashing import chain_block_hashes
from dualpath_jax.workload import TraceFormatError, read_trace

VOCAB = 1000
TRACES = "/work/shared/traces/mooncake"


def _write(tmp_path, name: str, rows) -> str:
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _mc(ts, n, out, ids):
  return dict(timestamp=ts, input_length=n, output_length=out, hash_ids=ids)


# Sessions by hand (512-token blocks). Expected: S0 = lines 1, 3, 5, 6, 7; S1 = line 2 (matches
# line 1 only on block 0); S2 = line 4 (a fork: line 1, its best match, is already continued).
MOONCAKE_ROWS = [
    _mc(0, 1100, 10, [0, 1, 2]),            # 1: blocks 0, 1 full, 2 partial
    _mc(1000, 700, 5, [0, 3]),              # 2: shares block 0 only -> new session
    _mc(3000, 1700, 20, [0, 1, 4, 5]),      # 3: continues 1 (full blocks [0, 1])
    _mc(4000, 1200, 7, [0, 1, 6]),          # 4: matches 1, already continued -> fork
    _mc(6000, 2100, 9, [0, 1, 4, 7, 8]),    # 5: continues 3 (full blocks [0, 1, 4])
    _mc(7000, 2200, 3, [0, 1, 4, 7, 9]),    # 6: continues 5 (full blocks [0, 1, 4, 7])
    _mc(7500, 2201, 4, [0, 1, 4, 7, 10]),   # 7: continues 6, but 2201 < 2200 + 3 + 1
]


def test_mooncake_sessions_rebuilt(tmp_path):
  path = _write(tmp_path, "mc.jsonl", MOONCAKE_ROWS)
  trajs = read_trace(path, vocab_size=VOCAB)
  assert [t.agent_id for t in trajs] == ["mc-s00000", "mc-s00001", "mc-s00002"]
  s0, s1, s2 = trajs
  # Appends sized so that our prompt (previous prompt + generated + append) has the trace's length.
  assert [t.append_ids.shape[0] for t in s0.turns] == [1100, 1700 - 1110, 2100 - 1720,
                                                       2200 - 2109, 1]
  assert [t.gen_tokens for t in s0.turns] == [10, 20, 9, 3, 4]
  assert [t.think_s for t in s0.turns] == [0.0, 3.0, 3.0, 1.0, 0.5]
  assert (s0.arrival_s, s1.arrival_s, s2.arrival_s) == (0.0, 1.0, 4.0)
  assert [t.append_ids.shape[0] for t in s1.turns] == [700]
  assert [t.append_ids.shape[0] for t in s2.turns] == [1200]
  for t in trajs:
    for turn in t.turns:
      assert turn.append_ids.dtype == np.int32
      assert turn.append_ids.min() >= 0 and turn.append_ids.max() < VOCAB

  # Tokens follow the ids: a session's first prompt equals the request read alone, and a later
  # append is the tail of the trace request's prompt.
  alone = read_trace(path, vocab_size=VOCAB, sessions=False)
  assert [t.agent_id for t in alone] == [f"mc-r{i:05d}" for i in range(1, 8)]
  assert [t.arrival_s for t in alone] == [0.0, 1.0, 3.0, 4.0, 6.0, 7.0, 7.5]
  prompts = [t.turns[0].append_ids for t in alone]
  np.testing.assert_array_equal(s0.turns[0].append_ids, prompts[0])
  np.testing.assert_array_equal(s0.turns[1].append_ids, prompts[2][-590:])
  np.testing.assert_array_equal(s0.turns[4].append_ids, prompts[6][-1:])
  np.testing.assert_array_equal(s2.turns[0].append_ids, prompts[3])


def test_mooncake_tokens_shared_prefix(tmp_path):
  path = _write(tmp_path, "mc.jsonl", MOONCAKE_ROWS)
  p = [t.turns[0].append_ids for t in read_trace(path, vocab_size=VOCAB, sessions=False)]
  # Lines 1 and 4 share full blocks 0 and 1; line 1's block 2 is a partial, request-unique tail.
  np.testing.assert_array_equal(p[0][:1024], p[3][:1024])
  assert (p[0][1024:1100] != p[3][1024:1100]).mean() > 0.9
  np.testing.assert_array_equal(p[0][:512], p[1][:512])   # block 0 is everyone's
  assert (p[0][512:700] != p[1][512:700]).mean() > 0.9
  # The store's chained block hashes hit on the shared prefix and nowhere after it.
  for bt in (16, 64, 512):
    h0, h3 = chain_block_hashes(p[0], bt), chain_block_hashes(p[3], bt)
    shared = sum(a == b for a, b in zip(h0, h3))
    assert shared == 1024 // bt and h0[:shared] == h3[:shared]
  # Deterministic: same file, same seed -> same tokens; another seed -> other tokens.
  again = read_trace(path, vocab_size=VOCAB, sessions=False)
  for a, b in zip(p, again):
    np.testing.assert_array_equal(a, b.turns[0].append_ids)
  other = read_trace(path, vocab_size=VOCAB, sessions=False, seed=1)[0].turns[0].append_ids
  assert (other != p[0]).mean() > 0.9
  # Same ids in another file (another line too) -> same tokens.
  path2 = _write(tmp_path, "other.jsonl", [_mc(0, 300, 1, [77]), _mc(5, 1024, 2, [0, 1])])
  q = read_trace(path2, vocab_size=VOCAB, sessions=False)[1].turns[0].append_ids
  np.testing.assert_array_equal(q, p[0][:1024])


def test_mooncake_options(tmp_path):
  path = _write(tmp_path, "mc.jsonl", MOONCAKE_ROWS)
  assert len(read_trace(path, vocab_size=VOCAB, max_sessions=2)) == 2
  assert len(read_trace(path, vocab_size=VOCAB, sessions=False, max_sessions=3)) == 3
  # max_requests reads a time prefix: lines 1-3 give S0 = [1, 3], S1 = [2].
  trajs = read_trace(path, vocab_size=VOCAB, max_requests=3)
  assert [len(t.turns) for t in trajs] == [2, 1]
  assert read_trace(path, vocab_size=VOCAB, max_sessions=0) == []
  with pytest.raises(ValueError, match="block_tokens 48 does not divide"):
    read_trace(path, vocab_size=VOCAB, block_tokens=48)
  with pytest.raises(ValueError, match="format must be one of"):
    read_trace(path, vocab_size=VOCAB, format="csv")
  with pytest.raises(ValueError, match="vocab_size"):
    read_trace(path, vocab_size=0)


SESSION_ROWS = [
    dict(session_id="a/1", turn=0, input_length=150, output_length=10, hash_ids=[1, 2],
         block_size=64, arrival_s=2.5),
    dict(session_id="b", turn=0, input_length=150, output_length=4, hash_ids=[1, 2, 3],
         block_size=64),
    dict(session_id="a/1", turn=1, input_length=300, output_length=7, hash_ids=[1, 2, 5, 6],
         block_size=64, think_time_s=12.0, arrival_s=2.5),
    "   ",
    dict(session_id="b", turn=1, input_length=152, output_length=4, hash_ids=[1, 2],
         block_size=64, think_time_s=0.5, extra="ignored"),
]


def test_session_format(tmp_path):
  path = _write(tmp_path, "agentic trace.jsonl", SESSION_ROWS)
  a, b = read_trace(path, vocab_size=VOCAB)
  assert (a.agent_id, b.agent_id) == ("agentic_trace-a_1", "agentic_trace-b")
  assert "/" not in a.agent_id
  assert (a.arrival_s, b.arrival_s) == (2.5, None)
  assert [t.append_ids.shape[0] for t in a.turns] == [150, 300 - 160]
  assert [t.gen_tokens for t in a.turns] == [10, 7]
  assert [t.think_s for t in a.turns] == [0.0, 12.0]
  # b turn 1 (152 tokens) is shorter than b's turn 0 prompt + generated: a 1-token append.
  assert [t.append_ids.shape[0] for t in b.turns] == [150, 1]
  assert [t.think_s for t in b.turns] == [0.0, 0.5]
  # Ids are scoped to their session: id 1 in a and in b are different blocks.
  assert (a.turns[0].append_ids[:64] != b.turns[0].append_ids[:64]).mean() > 0.9
  # Deterministic, and a session's tokens do not depend on which others are read.
  again = read_trace(path, vocab_size=VOCAB, format="session", max_sessions=1)
  assert len(again) == 1
  for x, y in zip(a.turns, again[0].turns):
    np.testing.assert_array_equal(x.append_ids, y.append_ids)
  with pytest.raises(ValueError, match="block_tokens 128 does not divide"):
    read_trace(path, vocab_size=VOCAB, block_tokens=128)


def test_session_ids_within_a_session(tmp_path):
  # Turn 1 re-reads turn 0's blocks verbatim after a long gap of other tokens: equal ids at equal
  # positions give equal tokens, also for a partial last block that has an id.
  rows = [dict(session_id="s", turn=0, input_length=100, output_length=1, hash_ids=[7, 8],
               block_size=64),
          dict(session_id="s", turn=1, input_length=400, output_length=1,
               hash_ids=[7, 9, 10, 11, 12, 13, 14], block_size=64)]
  path = _write(tmp_path, "s.jsonl", rows)
  (s,) = read_trace(path, vocab_size=VOCAB)
  assert [t.append_ids.shape[0] for t in s.turns] == [100, 400 - 101]
  rows[1]["hash_ids"] = [7, 8, 10, 11, 12, 13]   # floor(400 / 64) ids: the tail is unique
  (s2,) = read_trace(_write(tmp_path, "s2.jsonl", rows), vocab_size=VOCAB)
  np.testing.assert_array_equal(s.turns[0].append_ids, s2.turns[0].append_ids)
  t1, u1 = s.turns[1].append_ids, s2.turns[1].append_ids   # trace positions 101..399
  np.testing.assert_array_equal(t1[128 - 101:384 - 101], u1[128 - 101:384 - 101])  # ids 10-13
  assert (t1[384 - 101:] != u1[384 - 101:]).mean() > 0.9   # id 14 vs a unique tail


def test_format_detection(tmp_path):
  mc = _write(tmp_path, "mc.jsonl", ["", *MOONCAKE_ROWS])
  se = _write(tmp_path, "se.jsonl", SESSION_ROWS)
  for path, fmt in ((mc, "mooncake"), (se, "session")):
    auto = read_trace(path, vocab_size=VOCAB)
    named = read_trace(path, vocab_size=VOCAB, format=fmt)
    assert [t.agent_id for t in auto] == [t.agent_id for t in named]
  assert read_trace(_write(tmp_path, "empty.jsonl", ["", " "]), vocab_size=VOCAB) == []
  with pytest.raises(TraceFormatError, match=r"se\.jsonl:1: missing field\(s\) 'timestamp'"):
    read_trace(se, vocab_size=VOCAB, format="mooncake")
  bad = _write(tmp_path, "bad.jsonl", ["", json.dumps(dict(input_length=5))])
  with pytest.raises(TraceFormatError, match=r"bad\.jsonl:2: cannot detect the trace format"):
    read_trace(bad, vocab_size=VOCAB)


GOOD_MC = _mc(1000, 600, 5, [0, 1])
GOOD_SE = dict(session_id="s", turn=0, input_length=100, output_length=5, hash_ids=[1],
               block_size=64)


@pytest.mark.parametrize("row,what", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({k: v for k, v in GOOD_MC.items() if k != "output_length"},
     "missing field(s) 'output_length'"),
    ({**GOOD_MC, "input_length": "600"}, "input_length must be an integer"),
    ({**GOOD_MC, "input_length": 600.0}, "input_length must be an integer"),
    ({**GOOD_MC, "output_length": True}, "output_length must be an integer"),
    ({**GOOD_MC, "input_length": -600}, "input_length must be >= 1"),
    ({**GOOD_MC, "output_length": 0}, "output_length must be >= 1"),
    ({**GOOD_MC, "hash_ids": [0, 1, 2]}, "3 hash_ids for input_length 600: expected ceil"),
    ({**GOOD_MC, "hash_ids": [0, "1"]}, "hash_ids must be a list of integers"),
    ({**GOOD_MC, "hash_ids": 3}, "hash_ids must be a list of integers"),
    ({**GOOD_MC, "hash_ids": [0, 1 << 64]}, "hash_ids must fit in 64 bits"),
    ({**GOOD_MC, "timestamp": -1}, "timestamp must be a number >= 0"),
    ({**GOOD_MC, "timestamp": "0"}, "timestamp must be a number >= 0"),
    ({**GOOD_MC, "timestamp": 999}, "timestamp 999 is before the previous line's 1000"),
])
def test_mooncake_malformed(tmp_path, row, what):
  path = _write(tmp_path, "t.jsonl", [GOOD_MC, "", row, GOOD_MC])
  with pytest.raises(TraceFormatError) as e:
    read_trace(path, vocab_size=VOCAB, format="mooncake")
  assert str(e.value).startswith(f"{path}:3: ")
  assert what in str(e.value)
  assert (e.value.path, e.value.line) == (path, 3)
  assert isinstance(e.value, ValueError)


A1 = {**GOOD_SE, "session_id": "a", "turn": 1}   # a valid turn 1 after line 1's turn 0 of "a"


@pytest.mark.parametrize("row,what", [
    ({k: v for k, v in A1.items() if k != "block_size"}, "missing field(s) 'block_size'"),
    ({**A1, "session_id": 5}, "session_id must be a non-empty string"),
    ({**A1, "session_id": ""}, "session_id must be a non-empty string"),
    ({**A1, "turn": 0}, "session 'a' turn 0 follows turn 0"),
    ({**A1, "turn": 2}, "session 'a' turn 2 follows turn 0"),
    ({**A1, "session_id": "new"}, "session 'new' starts with turn 1"),
    ({**A1, "turn": -1}, "turn must be >= 0"),
    ({**A1, "turn": 1.0}, "turn must be an integer"),
    ({**A1, "block_size": 32, "hash_ids": [1, 2, 3]}, "block_size 32 differs from"),
    ({**A1, "hash_ids": []}, "0 hash_ids for input_length 100 and block_size 64"),
    ({**A1, "hash_ids": [1, 2, 3]}, "3 hash_ids for input_length 100"),
    ({**A1, "input_length": 0, "hash_ids": []}, "input_length must be >= 1"),
    ({**A1, "output_length": -3}, "output_length must be >= 1"),
    ({**A1, "think_time_s": -1}, "think_time_s must be a number >= 0"),
    ({**A1, "think_time_s": "1"}, "think_time_s must be a number >= 0"),
    (json.dumps(A1)[:-1] + ', "think_time_s": NaN}', "think_time_s must be a number >= 0"),
    ({**A1, "arrival_s": "0"}, "arrival_s must be a number >= 0"),
    ({**A1, "arrival_s": 1.0}, "arrival_s 1.0 differs from its earlier 0.0"),
    ("null", "expected a JSON object, got NoneType"),
])
def test_session_malformed(tmp_path, row, what):
  first = {**GOOD_SE, "session_id": "a", "arrival_s": 0.0}
  path = _write(tmp_path, "t.jsonl", [first, "", row, GOOD_SE])
  with pytest.raises(TraceFormatError) as e:
    read_trace(path, vocab_size=VOCAB, format="session")
  assert str(e.value).startswith(f"{path}:3: ")
  assert what in str(e.value)


@pytest.mark.parametrize("name", ["conversation_trace.jsonl", "synthetic_trace.jsonl"])
def test_real_traces_smoke(name):
  path = os.path.join(TRACES, name)
  if not os.path.exists(path):
    pytest.skip(f"{path} not present")
  with open(path) as f:
    rows = [json.loads(next(f)) for _ in range(200)]
  alone = read_trace(path, vocab_size=VOCAB, sessions=False, max_sessions=50)
  assert len(alone) == 50
  for t, r in zip(alone, rows):
    assert t.turns[0].append_ids.shape[0] == r["input_length"]
    assert t.turns[0].gen_tokens == r["output_length"]
    assert t.arrival_s == r["timestamp"] / 1000
  trajs = read_trace(path, vocab_size=VOCAB, max_requests=200)
  assert sum(len(t.turns) for t in trajs) == 200
  assert len({t.agent_id for t in trajs}) == len(trajs)
  arrivals = [t.arrival_s for t in trajs]
  assert arrivals == sorted(arrivals)
  # A session's first turn is a whole trace prompt, its arrival that request's timestamp.
  starts = {(r["timestamp"] / 1000, r["input_length"]) for r in rows}
  for t in trajs:
    assert (t.arrival_s, t.turns[0].append_ids.shape[0]) in starts
    assert all(x.gen_tokens >= 1 and x.append_ids.shape[0] >= 1 for x in t.turns)
    assert all(x.think_s >= 0 for x in t.turns)
  first = read_trace(path, vocab_size=VOCAB, max_sessions=5)
  assert len(first) == 5 and all(t.turns for t in first)


def test_session_wide_ids(tmp_path):
  # Ids are names, not offsets: any 64-bit value (unsigned hashes, negatives) works.
  rows = [dict(session_id="w", turn=0, input_length=128, output_length=2,
               hash_ids=[(1 << 64) - 1, -5], block_size=64)]
  (t,) = read_trace(_write(tmp_path, "w.jsonl", rows), vocab_size=VOCAB)
  assert t.turns[0].append_ids.shape == (128,)


def test_scale_divides_lengths_and_keeps_shared_prefixes():
  path = os.path.join(TRACES, "conversation_trace.jsonl")
  if not os.path.exists(path):
    pytest.skip("the real Mooncake trace is not here")
  full = read_trace(path, vocab_size=512, max_requests=200, max_sessions=20)
  scaled = read_trace(path, vocab_size=512, max_requests=200, max_sessions=20, scale=8)
  assert [t.agent_id for t in full] == [t.agent_id for t in scaled]
  for a, b in zip(full, scaled):
    assert len(a.turns) == len(b.turns)
    assert len(b.turns[0].append_ids) == max(1, len(a.turns[0].append_ids) // 8)
  with pytest.raises(ValueError, match="scale"):
    read_trace(path, vocab_size=512, max_requests=10, scale=16)  # 512 / 16 = 32 < 64
