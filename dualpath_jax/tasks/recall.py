"""Synthetic long-range associative recall: prompts whose next tokens depend on far-back context.

The vocabulary is cut in three ranges (`RecallVocab`): filler tokens, key tokens and value tokens.
A stream is filler with two kinds of spans in it:
  definition  key k, then its value v_1 .. v_A (A = answer_tokens), the first time k appears
  query       key k again, then the same v_1 .. v_A: copied from wherever k appeared before
Within one stream (one prompt, one agent) every key has one value, and no value token is used by
two keys, so after a key that appeared before, each next token is fixed by the earlier context: the
token that followed the previous occurrence of the current token (an induction copy). A prompt ends
with a query key whose definition lies far back, and the answer is its value. A model that
reaches high accuracy on such prompts can only do so by reading that far-back KV, so "generated
tokens equal the reference" becomes evidence that loaded KV is right, and corrupting the KV block
that holds the answer changes the output (tests/test_recall.py).

The same stream makes multi-turn agent trajectories (`recall_trajectories`): every turn's append
ends with a query key whose value lies in an earlier turn, so the first generated tokens of turn k
are a copy of tokens thousands of positions back in the context the store holds. Keys defined in
an append are queried inside that append only (near queries); far keys are queried only by a turn's
final query, so their one definition is the only place the answer is.

Everything here is numpy and deterministic in the seed; the trained checkpoints and the model-side
evaluation are in tasks/trained.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dualpath_jax.workload.synthetic import AgentTrajectory, Turn

DEFAULT_ANSWER_TOKENS = 4
"""Value span length A: the answer a query must reproduce."""
DEFAULT_DEF_RATE = 1 / 32
"""Chance that a definition starts at a given position (while keys and values last)."""
DEFAULT_QUERY_RATE = 1 / 32
"""Chance that a query of an earlier key starts at a given position (training streams)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecallVocab:
  """The three token ranges of a vocabulary: filler [0, F), keys [F, F + K), values [F + K, V)."""

  vocab_size: int
  """Model vocabulary size V."""
  answer_tokens: int = DEFAULT_ANSWER_TOKENS
  """Value span length A."""

  def __post_init__(self):
    if self.vocab_size < 64 or self.vocab_size % 4:
      raise ValueError(f"recall: vocab_size must be a multiple of 4 and >= 64, got "
                       f"{self.vocab_size}")
    if not 1 <= self.answer_tokens <= self.vocab_size // 8:
      raise ValueError(f"recall: answer_tokens must be in [1, {self.vocab_size // 8}], got "
                       f"{self.answer_tokens}")

  @property
  def filler(self) -> tuple[int, int]:
    return 0, self.vocab_size // 4

  @property
  def keys(self) -> tuple[int, int]:
    return self.vocab_size // 4, self.vocab_size // 2

  @property
  def values(self) -> tuple[int, int]:
    return self.vocab_size // 2, self.vocab_size

  @property
  def max_pairs(self) -> int:
    """Most key -> value pairs one stream can define (distinct keys, disjoint value spans)."""
    (k0, k1), (v0, v1) = self.keys, self.values
    return min(k1 - k0, (v1 - v0) // self.answer_tokens)


class _Stream:
  """One stream under construction: the pairs it has defined and the tokens emitted so far."""

  def __init__(self, rng: np.random.Generator, vocab: RecallVocab, def_rate: float,
               query_rate: float, far_query_prob: float = 0.0):
    self.rng, self.vocab = rng, vocab
    self.def_rate, self.query_rate = def_rate, query_rate
    self.far_query_prob = far_query_prob
    k0, k1 = vocab.keys
    v0, _ = vocab.values
    a = vocab.answer_tokens
    self._keys = (k0 + rng.permutation(k1 - k0)).astype(np.int32)
    spans = v0 + rng.permutation(vocab.max_pairs * a).astype(np.int32)
    self._values = spans.reshape(vocab.max_pairs, a)
    self.pairs: list[tuple[int, np.ndarray, int]] = []  # (key, value [A], position of key)
    self._value: dict[int, np.ndarray] = {}  # key -> value, in definition order
    self._last_seen: dict[int, int] = {}  # key -> position of its latest occurrence
    self.queries: dict[int, int] = {}  # key -> times queried
    self.tokens: list[int] = []
    self.recall: list[bool] = []  # token i is a value copied from earlier context

  def new_pair(self) -> tuple[int, np.ndarray] | None:
    n = len(self.pairs)
    if n >= self.vocab.max_pairs:
      return None
    key, value = int(self._keys[n]), self._values[n]
    self.pairs.append((key, value, len(self.tokens)))
    self._value[key] = value
    self._last_seen[key] = len(self.tokens)
    return key, value

  def emit(self, count: int, *, query_keys=None) -> None:
    """Appends `count` tokens of filler, definitions and queries.

    A span that would not fit before the end is not started (filler instead): a cut definition or
    query would give its key or a value token a second, different follower.
    query_keys: a function () -> list of keys that a query may pick (None: every defined key).
    """
    end = len(self.tokens) + count
    f0, f1 = self.vocab.filler
    # One draw of each kind per position, in bulk (each iteration emits at least one token).
    kinds, picks = self.rng.random(count), self.rng.random(count)
    oldest = self.rng.random(count) if self.far_query_prob else np.ones(count)
    fillers = self.rng.integers(f0, f1, count)
    i = 0
    while len(self.tokens) < end:
      r = kinds[i]
      span, copied = None, False
      fits = end - len(self.tokens) > self.vocab.answer_tokens
      if r < self.def_rate and fits:
        pair = self.new_pair()
        if pair is not None:
          span = [pair[0], *pair[1].tolist()]
      elif self.def_rate <= r < self.def_rate + self.query_rate and fits:
        keys = list(self._value) if query_keys is None else query_keys()
        if keys and oldest[i] < self.far_query_prob:  # the key seen longest ago
          keys, picks[i] = [min(keys, key=self._last_seen.__getitem__)], 0.0
        if keys:
          key = keys[int(picks[i] * len(keys))]
          span, copied = [key, *self._value[key].tolist()], True
          self._last_seen[key] = len(self.tokens)
          self.queries[key] = self.queries.get(key, 0) + 1
      if span is None:
        span = [int(fillers[i])]
      i += 1
      self.tokens.extend(span)
      self.recall.extend([False] + [copied] * (len(span) - 1))

  def define_at(self, count_before: int, *, query_keys=None) -> tuple[int, np.ndarray]:
    """Emits `count_before` tokens, then a definition; returns its (key, value)."""
    self.emit(count_before, query_keys=query_keys)
    pair = self.new_pair()
    if pair is None:
      raise ValueError("recall: no key left for a definition")
    self.tokens.extend([pair[0], *pair[1].tolist()])
    self.recall.extend([False] * (1 + self.vocab.answer_tokens))
    return pair

  def value_of(self, key: int) -> np.ndarray:
    return self._value[key]


def make_stream(rng: np.random.Generator, *, vocab_size: int, length: int,
                answer_tokens: int = DEFAULT_ANSWER_TOKENS, def_rate: float = DEFAULT_DEF_RATE,
                query_rate: float = DEFAULT_QUERY_RATE,
                far_query_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """A training stream: (tokens int32 [length], recall bool [length]).

  recall[i] is True where tokens[i] is a value token of a query, i.e. fixed by tokens[:i] (the
  positions whose prediction needs recall). A query picks, with probability far_query_prob,
  the key seen longest ago (the longest distance to a copy of its value), else any earlier key.
  """
  if length <= 0:
    raise ValueError(f"recall: length must be positive, got {length}")
  stream = _Stream(rng, RecallVocab(vocab_size=vocab_size, answer_tokens=answer_tokens),
                   def_rate, query_rate, far_query_prob)
  stream.emit(length)
  return np.array(stream.tokens, np.int32), np.array(stream.recall, bool)


def make_batch(rng: np.random.Generator, *, batch: int, vocab_size: int, length: int,
               answer_tokens: int = DEFAULT_ANSWER_TOKENS, def_rate: float = DEFAULT_DEF_RATE,
               query_rate: float = DEFAULT_QUERY_RATE,
               far_query_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """`batch` training streams (make_stream): (tokens int32 [batch, length], recall bool)."""
  rows = [make_stream(rng, vocab_size=vocab_size, length=length, answer_tokens=answer_tokens,
                      def_rate=def_rate, query_rate=query_rate,
                      far_query_prob=far_query_prob) for _ in range(batch)]
  return np.stack([t for t, _ in rows]), np.stack([r for _, r in rows])


def _example(rng, vocab_size, length, answer_tokens, min_distance, def_rate, query_rate):
  a = answer_tokens
  min_distance = length // 2 if min_distance is None else min_distance
  latest = length - 1 - min_distance - (1 + a)  # last start of the target definition
  if latest < 0:
    raise ValueError(f"recall: length {length} has no room for a definition {min_distance} "
                     f"tokens before its query")
  stream = _Stream(rng, RecallVocab(vocab_size=vocab_size, answer_tokens=a), def_rate, query_rate)
  target = None

  def others():
    return [p[0] for p in stream.pairs if p[0] != target]

  target, value = stream.define_at(int(rng.integers(0, latest + 1)), query_keys=others)
  stream.emit(length - 1 - len(stream.tokens), query_keys=others)
  return stream, target, value


def make_example(rng: np.random.Generator, *, vocab_size: int, length: int,
                 answer_tokens: int = DEFAULT_ANSWER_TOKENS, min_distance: int | None = None,
                 def_rate: float = DEFAULT_DEF_RATE,
                 query_rate: float = DEFAULT_QUERY_RATE) -> tuple[np.ndarray, np.ndarray]:
  """A held-out prompt: (prompt int32 [length], answer int32 [answer_tokens]).

  The prompt ends with a key that occurs exactly once before, at least `min_distance` tokens
  before the end (default length // 2), and the answer is the value that followed it there. The
  rest of the prompt is a stream like training's (other definitions and queries, filler).
  """
  stream, target, value = _example(rng, vocab_size, length, answer_tokens, min_distance,
                                   def_rate, query_rate)
  return np.array(stream.tokens + [target], np.int32), value.copy()


def make_example_stream(rng: np.random.Generator, *, vocab_size: int, length: int,
                        answer_tokens: int = DEFAULT_ANSWER_TOKENS,
                        min_distance: int | None = None, def_rate: float = DEFAULT_DEF_RATE,
                        query_rate: float = DEFAULT_QUERY_RATE) -> tuple[np.ndarray, np.ndarray]:
  """A make_example prompt followed by its answer, as a training stream like make_stream's:
  (tokens int32 [length], recall bool [length]); the prompt is length - answer_tokens long."""
  a = answer_tokens
  stream, target, value = _example(rng, vocab_size, length - a, a, min_distance, def_rate,
                                   query_rate)
  tokens = np.array(stream.tokens + [target, *value.tolist()], np.int32)
  return tokens, np.array(stream.recall + [False] + [True] * a, bool)


def answer_position(prompt: np.ndarray) -> int:
  """Position in `prompt` of the answer's first token: right after the first occurrence of the
  prompt's last token (the query key). Works for make_example prompts and for trajectory prompts
  (context + append), where the first occurrence is the key's definition."""
  prompt = np.asarray(prompt)
  hits = np.flatnonzero(prompt[:-1] == prompt[-1])
  if hits.size == 0:
    raise ValueError("recall: the prompt's last token does not occur earlier in it")
  return int(hits[0]) + 1


def answer_block(prompt: np.ndarray, block_tokens: int = 64) -> int:
  """Index of the KV block (of `block_tokens` tokens) that holds the answer's first token: the
  block whose KV a correct answer has to read (corrupt it and the answer changes)."""
  return answer_position(prompt) // block_tokens


def recall_trajectories_with_answers(
    *, agents: int, turns: int, first_append_tokens: int, append_tokens: int, gen_tokens: int,
    vocab_size: int, seed: int = 0, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    def_rate: float = DEFAULT_DEF_RATE, query_rate: float = DEFAULT_QUERY_RATE,
) -> tuple[list[AgentTrajectory], list[list[np.ndarray]]]:
  """`recall_trajectories` plus, per agent and turn, the answer: the first min(A, gen_tokens)
  tokens that turn should generate."""
  for name, value in (("agents", agents), ("turns", turns), ("append_tokens", append_tokens),
                      ("first_append_tokens", first_append_tokens), ("gen_tokens", gen_tokens),
                      ("vocab_size", vocab_size)):
    if value <= 0:
      raise ValueError(f"workload.{name} must be positive, got {value}")
  a = answer_tokens
  if first_append_tokens < 2 * (a + 2):
    raise ValueError(f"workload.first_append_tokens must be >= {2 * (a + 2)} for recall prompts, "
                     f"got {first_append_tokens}")
  trajectories, answers = [], []
  for agent in range(agents):
    rng = np.random.default_rng([seed, agent, 0x7eca11])
    stream = _Stream(rng, RecallVocab(vocab_size=vocab_size, answer_tokens=a), def_rate,
                     query_rate)
    agent_turns, agent_answers = [], []
    far: set[int] = set()  # keys defined in earlier turns (or the reserved first target)
    for t in range(turns):
      n = first_append_tokens if t == 0 else append_tokens
      start = len(stream.tokens)

      def near():
        return [p[0] for p in stream.pairs if p[0] not in far]

      if t == 0:
        # The first target: defined in the first half of the first append.
        latest = (n - 1) // 2 - (1 + a)
        key, _ = stream.define_at(int(rng.integers(0, latest + 1)), query_keys=near)
        far.add(key)
      stream.emit(start + n - 1 - len(stream.tokens), query_keys=near)
      # Final query: the earliest far key queried least often.
      key = min(far, key=lambda k: (stream.queries.get(k, 0),
                                    next(pos for kk, _, pos in stream.pairs if kk == k)))
      stream.queries[key] = stream.queries.get(key, 0) + 1
      stream.tokens.append(key)
      stream.recall.append(False)
      agent_turns.append(Turn(append_ids=np.array(stream.tokens[start:], np.int32),
                              gen_tokens=gen_tokens))
      agent_answers.append(stream.value_of(key)[:gen_tokens].copy())
      # Every key defined so far is far for later turns. The turn's generated tokens come next in
      # the context; they are not known here and need not be (queries go by key, not position).
      far.update(p[0] for p in stream.pairs)
    trajectories.append(AgentTrajectory(agent_id=f"agent{agent:05d}", turns=tuple(agent_turns)))
    answers.append(agent_answers)
  return trajectories, answers


def recall_trajectories(*, agents: int, turns: int, first_append_tokens: int, append_tokens: int,
                        gen_tokens: int, vocab_size: int, seed: int = 0,
                        answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[AgentTrajectory]:
  """Agent trajectories (same arguments as workload.simple_trajectories) of recall prompts.

  Turn k's append is a recall stream that ends with a query key whose only definition is in an
  earlier turn (turn 0: in the first half of the first append), earliest and least-queried first,
  so the turn's first min(A, gen_tokens) generated tokens should be that key's value, read from
  far back. Each agent's stream has its own random generator, so agents never share a prefix.
  `recall_trajectories_with_answers` also returns the expected answers.
  """
  return recall_trajectories_with_answers(
      agents=agents, turns=turns, first_append_tokens=first_append_tokens,
      append_tokens=append_tokens, gen_tokens=gen_tokens, vocab_size=vocab_size, seed=seed,
      answer_tokens=answer_tokens)[0]
