"""A prefill engine (PE): layerwise prefill with the prefix KV streamed in from either side.

Per request, in FIFO order among those whose storage read has completed:
  layerwise (dualpath, oracle): for each layer l, layer l+1's prefix KV is put in flight before
    layer l computes, so the PE holds at most two layers of prefix KV on its device:
      PE path  PE node buffer --H2D--> PE device
      DE path  DE node buffer --H2D--> DE device --D2D--> PE device
    after layer l, its KV goes on to the DE node buffer: all of it (hit + miss) on the PE path;
    only the miss tokens on the DE path, where the hit part already sits in that buffer.
  whole (basic): the whole prompt's prefix KV goes H2D before prefill starts; after the whole
    model, all of the prompt KV goes to the DE.
  oracle: no read, no H2D, no D2D, no D2H: the prefix KV is uninitialised zeros on the device.
The last token's logits give the first generated token; the request then goes to its DE.
"""

from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model.prefill import (embed_tokens, embed_tokens_jit, last_token_logits_jit,
                                        pad_axis, pow2_at_least, prefill_layer,
                                        prefill_layer_jit)
from dualpath_jax.runtime.request import TurnRequest



@functools.partial(jax.jit, static_argnames=("length", "axis"))
def _pad_to(x, length: int, axis: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("start", "stop", "axis"))
def _slice(x, start: int, stop: int, axis: int):
  return jax.lax.slice_in_dim(x, start, stop, axis=axis)


class PrefillWorker(threading.Thread):
  """One PE: a thread that prefills the requests placed on it."""

  def __init__(self, cluster, engine, model):
    super().__init__(name=f"prefill-{engine.name}", daemon=True)
    self.cluster = cluster
    self.engine = engine
    self.model = model
    self.tm = cluster.traffic[engine.name]
    self._cond = threading.Condition()
    self._queue: list[TurnRequest] = []
    self._stopping = False
    self.resident_layers = 0
    """Layers of prefix KV on this PE's device now."""
    self.max_resident_layers = 0
    """Most layers of prefix KV ever on this PE's device at once (layerwise: at most 2)."""
    self.unfinished_tokens = 0
    """Prompt tokens of queued and running requests (scheduler state)."""

  def submit(self, request: TurnRequest) -> None:
    with self._cond:
      self._queue.append(request)
      self.unfinished_tokens += request.new_tokens
      self._cond.notify_all()

  def wake(self, *_):
    with self._cond:
      self._cond.notify_all()

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()

  def _next(self) -> TurnRequest | None:
    with self._cond:
      while not self._stopping:
        for i, request in enumerate(self._queue):
          if request.read_future is None or request.read_future.done():
            return self._queue.pop(i)
        self._cond.wait(0.05)
      return None

  def run(self) -> None:
    while (request := self._next()) is not None:
      try:
        self._prefill(request)
      except BaseException as e:  # surfaced by the runner; the thread keeps serving
        request.error = e
        request.done.set()
        self.cluster.on_turn_done(request)
      finally:
        with self._cond:
          self.unfinished_tokens -= request.new_tokens

  # --- one request -------------------------------------------------------------------------------

  def _prefill(self, request: TurnRequest) -> None:
    config = self.cluster.runtime_config
    layout = self.cluster.layout
    request.times["prefill_start"] = time.perf_counter()
    blocks = None
    if request.read_future is not None:
      blocks = request.read_future.result()
      if any(b is None for b in blocks):  # a block went missing or corrupt: recompute from there
        raise RuntimeError(f"{request.agent_id} turn {request.turn}: a hit block could not be "
                           "read back; the runtime does not yet re-plan a shrunken hit")
      blocks = np.stack(blocks)
    hit, new = request.hit_tokens, request.new_tokens
    tp = pow2_at_least(hit, layout.block_tokens) if hit else 0
    tn = pow2_at_least(new, layout.block_tokens)
    de_engine = self.cluster.topology.decode_engines[request.decode_engine]
    de_tm = self.cluster.traffic[de_engine.name]
    place = functools.partial(jax.device_put, device=self.engine.replicated_sharding)
    tokens = place(pad_axis(request.prompt[hit:], tn, 0)[None])
    prefix_len = place(np.array([hit], np.int32))
    new_len = place(np.array([new], np.int32))
    if not config.skips_kv_io:
      request.prompt_kv = request.de_reservation.hold(
          np.empty((layout.num_layers, request.prompt_tokens, *layout.token_kv_shape),
                   layout.np_dtype))
      if request.read_side == "de" and hit:  # merge the hit KV already in the DE buffer
        request.prompt_kv[:, :hit] = layout.full_blocks_to_kv(blocks)
    if config.layerwise:
      x = self._layerwise(request, blocks, tokens, prefix_len, new_len, tp, de_engine, de_tm)
    else:
      x = self._whole(request, blocks, tokens, prefix_len, new_len, tp, de_engine, de_tm)
    with self.tm.model_step():
      logits = last_token_logits_jit(self.model, x, new_len)
      request.first_token = int(jnp.argmax(logits[0]))
    if request.read_reservation is not None:
      request.read_reservation.release()
    request.times["prefill_done"] = time.perf_counter()
    self.cluster.decode_workers[request.decode_engine].submit(request)

  def _load_layer(self, request, blocks, layer: int, tp: int, de_engine, de_tm):
    """Layer `layer`'s prefix KV [Tp, 2, H, D] on this PE's device."""
    layout = self.cluster.layout
    self.resident_layers += 1
    self.max_resident_layers = max(self.max_resident_layers, self.resident_layers)
    if self.cluster.runtime_config.skips_kv_io or not request.hit_tokens:
      return self.cluster.zeros_on(self.engine, (tp, *layout.token_kv_shape))
    host = layout.layer_kv(blocks, layer)  # n Layer Blocks gathered: [hit, 2, H, D]
    if request.read_side == "pe":
      on_pe = self.tm.h2d(host)
      request.add_bytes("h2d", host.nbytes)
    else:
      on_pe = de_tm.d2d(de_tm.h2d(host), self.engine)
      request.add_bytes("h2d", host.nbytes)
      request.add_bytes("d2d", host.nbytes)
    return _pad_to(on_pe, tp, 0)

  def _send_layer(self, request, layer: int, prefix, new_kv, de_engine, de_tm) -> None:
    """Layer KV to the DE node buffer: hit + miss (PE path) or only the miss tokens (DE path)."""
    hit, new = request.hit_tokens, request.new_tokens
    miss = _slice(new_kv, 0, new, 0)
    if request.read_side == "pe" and hit:
      out = request.prompt_kv[layer]
      part = _slice(prefix, 0, hit, 0)
      de_tm.d2h(self.tm.d2d(part, de_engine), out=out[:hit])
      request.add_bytes("d2d", part.nbytes)
      request.add_bytes("d2h", part.nbytes)
    de_tm.d2h(self.tm.d2d(miss, de_engine), out=request.prompt_kv[layer, hit:])
    request.add_bytes("d2d", miss.nbytes)
    request.add_bytes("d2h", miss.nbytes)

  def _layerwise(self, request, blocks, tokens, prefix_len, new_len, tp, de_engine, de_tm):
    skip_io = self.cluster.runtime_config.skips_kv_io
    layers = self.model.layers
    with self.tm.model_step():
      x = embed_tokens_jit(self.model, tokens)
    current = self._load_layer(request, blocks, 0, tp, de_engine, de_tm)
    for l, layer in enumerate(layers):
      # Put layer l+1 in flight before layer l computes (dispatch is asynchronous).
      following = (self._load_layer(request, blocks, l + 1, tp, de_engine, de_tm)
                   if l + 1 < len(layers) else None)
      with self.tm.model_step():
        x, new_kv = prefill_layer_jit(layer, x, current[None], prefix_len, new_len)
      if not skip_io:
        self._send_layer(request, l, current, new_kv[0], de_engine, de_tm)
      if not skip_io and request.hit_tokens:  # cached zeros are shared; loaded layers are not
        current.delete()
      self.resident_layers -= 1
      current = following
    return x

  def _whole(self, request, blocks, tokens, prefix_len, new_len, tp, de_engine, de_tm):
    layout = self.cluster.layout
    hit, new = request.hit_tokens, request.new_tokens
    if hit:
      host = layout.full_blocks_to_kv(blocks)  # [L, hit, 2, H, D]
      prefix = _pad_to(self.tm.h2d(host), tp, 1)
      request.add_bytes("h2d", host.nbytes)
    else:
      prefix = self.cluster.zeros_on(self.engine, (layout.num_layers, 0, *layout.token_kv_shape))
    self.resident_layers = self.max_resident_layers = layout.num_layers
    with self.tm.model_step():
      x, new_kv = _prefill_hidden(self.model, tokens, prefix[:, None], prefix_len, new_len)
    full = _join_prompt_kv(prefix, new_kv[:, 0], hit=hit, new=new)  # [L, T, 2, H, D]
    de_tm.d2h(self.tm.d2d(full, de_engine), out=request.prompt_kv)
    request.add_bytes("d2d", full.nbytes)
    request.add_bytes("d2h", full.nbytes)
    if hit:
      prefix.delete()
    self.resident_layers = 0
    return x


@jax.jit
def _prefill_hidden(model, tokens, prefix_kv, prefix_len, new_len):
  """Whole-model prefill up to the final hidden states (the logits come from last_token_logits)."""
  x = embed_tokens(model, tokens)
  new_kv = []
  for l, layer in enumerate(model.layers):
    x, kv = prefill_layer(layer, x, prefix_kv[l], prefix_len, new_len)
    new_kv.append(kv)
  return x, jnp.stack(new_kv)


@functools.partial(jax.jit, static_argnames=("hit", "new"))
def _join_prompt_kv(prefix, new_kv, *, hit: int, new: int):
  return jnp.concatenate([prefix[:, :hit], new_kv[:, :new]], axis=1)

