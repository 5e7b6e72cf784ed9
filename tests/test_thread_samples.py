"""The thread sampler sees what a thread is doing and which of our lines it is in."""

import threading
import time

import pytest

from dualpath_jax.runtime.thread_samples import ThreadSampler


def test_sampler_finds_a_sleeping_worker_and_groups_threads_by_name():
  stop = threading.Event()

  def worker():
    while not stop.is_set():
      time.sleep(0.005)

  threads = [threading.Thread(target=worker, name=f"pe{i}-send") for i in range(2)]
  sampler = ThreadSampler(hz=200).start()
  for t in threads:
    t.start()
  deadline = time.monotonic() + 60  # a liveness bound: wait for 20 samples, however slow
  while sampler._ticks < 20 and time.monotonic() < deadline:
    time.sleep(0.01)
  stop.set()
  for t in threads:
    t.join()
  result = sampler.stop()
  assert result["ticks"] >= 20 and result["wall_s"] > 0
  group = result["groups"]["pe#-send"]  # both workers in one group, digits as '#'
  assert group["samples"] > 10
  where, fraction = group["leaf"][0]
  assert where.startswith("worker (test_thread_samples.py:") and fraction > 0.5
  # the worker is not dualpath_jax code
  assert group["project"][0][0] == "(outside dualpath_jax)"
  assert "thread-sampler" not in result["groups"]  # the sampler does not sample itself


def test_sampler_rejects_a_bad_rate_and_a_stop_before_start():
  with pytest.raises(ValueError, match="hz must be positive"):
    ThreadSampler(hz=0)
  with pytest.raises(RuntimeError, match="not started"):
    ThreadSampler(hz=10).stop()
