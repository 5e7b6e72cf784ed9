"""runtime/compile_events: compilations inside a window, per thread group and function."""

import threading

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.runtime.compile_events import CompileEvents


def _fresh_function(scale: float):
  def scaled_by_a_fresh_constant(x):
    return x * scale + 1.0
  return jax.jit(scaled_by_a_fresh_constant)


def test_compiles_in_the_window_are_counted_per_thread_and_function():
  before = _fresh_function(2.0)
  before(jnp.ones(3)).block_until_ready()  # compiled before start(): not counted
  events = CompileEvents().start()
  before(jnp.ones(3)).block_until_ready()  # cached: nothing to count

  def work():
    _fresh_function(3.0)(jnp.ones(5)).block_until_ready()

  thread = threading.Thread(target=work, name="pe7-send")
  thread.start()
  thread.join()
  stats = events.stop()
  _fresh_function(4.0)(jnp.ones(7)).block_until_ready()  # after stop(): not counted
  assert stats == events.stop()

  assert stats["by_thread"]["pe#-send"]["compiles"] >= 1
  assert stats["by_thread"]["pe#-send"]["seconds"] > 0
  mine = stats["by_function"]["scaled_by_a_fresh_constant"]
  assert mine["compiles"] == 1 and mine["threads"] == ["pe#-send"]
  assert stats["compiles"] == sum(t["compiles"] for t in stats["by_thread"].values())
  assert np.isclose(stats["seconds"], sum(t["seconds"] for t in stats["by_thread"].values()))
  assert np.isclose(stats["seconds"], sum(f["seconds"] for f in stats["by_function"].values()))


def test_a_window_without_compiles_reports_zero():
  f = _fresh_function(5.0)
  f(jnp.ones(3)).block_until_ready()
  events = CompileEvents().start()
  f(jnp.ones(3)).block_until_ready()
  stats = events.stop()
  assert stats["compiles"] == 0 and stats["by_function"] == {}
