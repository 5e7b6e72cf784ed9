"""Where the runtime's threads spend a run: a sampling profiler over every Python thread's stack.

A run's stage times (PrefillShard.stage_s) say how long a PE spent in 'gather' or 'send', not
why; on a GPU host without py-spy, this samples `sys._current_frames()` from a daemon thread at
`hz` and counts, per thread group (the thread's name with its digits replaced by '#': 'pe#-send',
'host-copy_#'), two things per sample:

  leaf     the innermost frame: what the thread is doing (a numpy copy, a lock's wait, a sleep)
  project  the innermost frame inside dualpath_jax with its dualpath_jax caller: which line of
           ours it is in

The sampler needs the GIL to take a sample, so a thread holding the GIL in a long C call delays
the samples (they then land late, not wrong); a sample of a thread waiting outside Python (a
device copy, a lock) is taken at once. Counts are samples, fractions are of the group's samples.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time

_PROJECT = os.sep + "dualpath_jax" + os.sep


def _where(frame) -> str:
  code = frame.f_code
  return f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"


def thread_group(name: str) -> str:
  return re.sub(r"\d+", "#", name)


class ThreadSampler:
  """Samples every other thread's stack at `hz` between start() and stop()."""

  def __init__(self, hz: float, top: int = 12):
    if not hz > 0:
      raise ValueError(f"ThreadSampler: hz must be positive, got {hz!r}")
    self.hz, self.top = float(hz), int(top)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._samples: collections.Counter = collections.Counter()  # group -> samples
    self._leaf: collections.Counter = collections.Counter()  # (group, where) -> samples
    self._project: collections.Counter = collections.Counter()
    self._wall_s = 0.0
    self._ticks = 0

  def start(self) -> "ThreadSampler":
    if self._thread is not None:
      raise RuntimeError("ThreadSampler: already started")
    self._t0 = time.perf_counter()
    self._thread = threading.Thread(target=self._run, name="thread-sampler", daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    period = 1.0 / self.hz
    me = threading.get_ident()
    while not self._stop.wait(period):
      names = {t.ident: t.name for t in threading.enumerate()}
      self._ticks += 1
      for ident, frame in sys._current_frames().items():
        if ident == me:
          continue
        group = thread_group(names.get(ident, "?"))
        self._samples[group] += 1
        self._leaf[(group, _where(frame))] += 1
        ours = []
        while frame is not None and len(ours) < 2:
          if _PROJECT in frame.f_code.co_filename:
            ours.append(_where(frame))
          frame = frame.f_back
        self._project[(group, " <- ".join(ours) or "(outside dualpath_jax)")] += 1

  def stop(self) -> dict:
    """Ends sampling; returns {wall_s, hz, ticks, groups: {group: {samples, leaf: [[where,
    fraction], ...], project: [...]}}}, the `top` entries of each, most samples first."""
    if self._thread is None:
      raise RuntimeError("ThreadSampler: not started")
    self._stop.set()
    self._thread.join()
    wall_s = time.perf_counter() - self._t0

    def top(counter, group, total):
      rows = [(where, n) for (g, where), n in counter.items() if g == group]
      rows.sort(key=lambda row: -row[1])
      return [[where, round(n / total, 4)] for where, n in rows[:self.top]]

    groups = {group: dict(samples=n, leaf=top(self._leaf, group, n),
                          project=top(self._project, group, n))
              for group, n in sorted(self._samples.items(), key=lambda kv: -kv[1])}
    return dict(wall_s=wall_s, hz=self.hz, ticks=self._ticks,
                meaning="per thread group (digits as '#'): the innermost frames by fraction of "
                        "that group's samples (runtime/thread_samples.py)",
                groups=groups)
