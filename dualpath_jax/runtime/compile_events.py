"""JAX compilations inside a timed run: which thread compiled what, and for how long.

The runtime compiles its programs before the clock starts (PrefillShard.precompile,
DecodeWorker.precompile). A shape that the precompile did not list compiles when it first comes,
inside the timed run, on the thread that dispatched it; its seconds then land in whatever stage
that thread was in (a PE's 'stack' or 'compute', a DE's 'admit'). This listens to jax.monitoring's
compile events between start() and stop() and adds them up per thread group (the thread's name
with digits replaced by '#', as runtime/thread_samples.py) and per function:

  compiles   XLA backend compilations ('/jax/core/compile/backend_compile_duration' events)
  seconds    tracing + lowering + backend compile ('jaxpr_trace_duration',
             'jaxpr_to_mlir_module_duration', 'backend_compile_duration'): the wall time the
             dispatching thread spent making the program
A trace without a backend compile (a jit cache miss served by the compilation cache) adds seconds
and no compile.
"""

from __future__ import annotations

import collections
import threading

import jax

from dualpath_jax.runtime.thread_samples import thread_group

_PREFIX = "/jax/core/compile/"
COMPILE_EVENT = _PREFIX + "backend_compile_duration"
PHASE_EVENTS = (_PREFIX + "jaxpr_trace_duration", _PREFIX + "jaxpr_to_mlir_module_duration",
                COMPILE_EVENT)


class CompileEvents:
  """Adds up compile events between start() and stop() (module docstring)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._by_thread: dict[str, collections.Counter] = {}
    self._by_function: dict[str, dict] = {}
    self._listening = False

  def _listener(self, event: str, duration_s: float, **kwargs) -> None:
    if event not in PHASE_EVENTS:
      return
    compiled = event == COMPILE_EVENT
    name = str(kwargs.get("fun_name", "?"))
    if name.startswith("jit(") and name.endswith(")"):
      name = name[4:-1]  # the trace event names the function bare, the later phases jit(...)
    thread = thread_group(threading.current_thread().name)
    with self._lock:
      t = self._by_thread.setdefault(thread, collections.Counter())
      t["compiles"] += compiled
      t["seconds"] += duration_s
      f = self._by_function.setdefault(name, dict(compiles=0, seconds=0.0, threads=set()))
      f["compiles"] += compiled
      f["seconds"] += duration_s
      f["threads"].add(thread)

  def start(self) -> "CompileEvents":
    if not self._listening:
      jax.monitoring.register_event_duration_secs_listener(self._listener)
      self._listening = True
    return self

  def stop(self) -> dict:
    """{'compiles': n, 'seconds': s, 'by_thread': {group: {compiles, seconds}},
    'by_function': {name: {compiles, seconds, threads}}} (functions by seconds, largest first)."""
    if self._listening:
      jax.monitoring.unregister_event_duration_listener(self._listener)
      self._listening = False
    with self._lock:
      by_thread = {g: dict(compiles=int(c["compiles"]), seconds=float(c["seconds"]))
                   for g, c in sorted(self._by_thread.items())}
      by_function = {n: dict(compiles=f["compiles"], seconds=f["seconds"],
                             threads=sorted(f["threads"]))
                     for n, f in sorted(self._by_function.items(),
                                        key=lambda item: -item[1]["seconds"])}
    return dict(compiles=sum(t["compiles"] for t in by_thread.values()),
                seconds=sum(t["seconds"] for t in by_thread.values()),
                by_thread=by_thread, by_function=by_function)
