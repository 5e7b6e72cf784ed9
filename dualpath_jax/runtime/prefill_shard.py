"""One PE engine (a data-parallel shard of its PE group): runs one batched prefill forward.

A batch is a list of chunks (request, cached, new): `new` prompt tokens computed on top of `cached`
tokens whose KV exists. A request's first chunk has cached = its storage hit, whose KV comes from
the reads (the leading `pe` blocks on the PE's node, the rest on the DE's node); a later chunk
(chunked prefill) finds its whole prefix in the DE node buffer, where every earlier chunk sent it.

  layerwise (dualpath, oracle): for each layer l, layer l+1's prefix KV of every row is put in
    flight before layer l is dispatched, and joined, padded and stacked after it:
      PE path  PE node buffer --H2D--> PE device
      DE path  DE node buffer --H2D--> DE device --D2D--> PE device
    (a copy onto a device waits for the work queued on that device's compute stream when it is
    issued: XLA's GPU client runs its devices compute-synchronized. Until 2026-11-29 layer
    l+1's pads and stack were queued before layer l, so layer l waited for layer l+1's copy
    and the loads and the layers ran one after the other: one 18K-token row of Qwen2.5-7B took
    49 ms a forward where its layers alone took 27 and its H2D ~20, 1x H200,
    scripts/bench_pe_layer.py, docs/perf/gpu_bench.md record 14);
    (under runtime.de_path_h2d 'forward', not the default, the DE path's H2D of every layer is
    issued at the forward's start, and only its D2D layer by layer: an H2D onto a decoding GPU
    waits for the step in flight);
    after layer l, each row's new KV goes D2H from the PE straight into its DE node buffer (and,
    on a first chunk, the PE-read part of its hit, which the DE buffer does not hold yet), on the
    shard's sender thread while this thread loads the next layers; the PE holds at most
    runtime.prefill_layers_in_flight (default 3) layers of prefix KV.
  whole (basic): every layer's prefix KV goes H2D before the forward starts; after the whole model
    the same KV goes to the DE.
  oracle: no read, no H2D, no D2D, no D2H: the prefix KV is uninitialised zeros on the device.
A request's last chunk gives its first generated token (logits of its last prompt token).

`stage_s` adds up this PE's wall time per stage of its forwards (the thread runs them one after
another, so together they are the forwards' time): 'begin' (waiting for a first chunk's reads
to land: the store writes them layer-major into their node buffers, and the links' workers copy
the DE-read part into the prompt KV, Cluster.land_read); loading the prefix KV, split three
ways: 'h2d' (onto the PE over the PE path; each layer's
prefix is contiguous in the buffer, so nothing is gathered on the host since 2026-11-28), 'de_path'
(H2D onto the DE, then D2D to the PE), 'stack' (rows padded and stacked on the PE; the oracle's
zeros); 'compute' (dispatching the layers), 'send' (each layer's KV to the DE buffer; layerwise, the
wait for the sender thread: the part of the sends that the loads did not hide), 'logits' (the last
tokens' logits, which waits for all the device work queued before it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.model.prefill import (embed_tokens_jit, last_token_logits_jit, pow2_at_least,
                                        prefill_layer_jit)
from dualpath_jax.runtime import profile_window
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.request import TurnRequest


@functools.partial(jax.jit, static_argnames=("length", "axis"))
def _pad_to(x, length: int, axis: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("length", "axis"))
def _pad_one_row(x, length: int, axis: int):
  """A batch of one row: x padded to `length` along `axis`, the batch axis added there (one
  program where a pad and a stack were two dispatches, docs/perf/gpu_bench.md record 14)."""
  return jnp.expand_dims(_pad_to(x, length, axis), axis)


LAYERS_IN_FLIGHT = RuntimeConfig.prefill_layers_in_flight
"""Layerwise prefill's default bound (RuntimeConfig.prefill_layers_in_flight): layer l computes
while layer l+1 loads and layer l-1's KV goes to the DE (on the shard's sender thread), so at
most three layers of prefix KV sit on the PE."""


class _StagedRegion:
  """One DE-path region of a layerwise forward (runtime.de_path_h2d 'forward'): region(layer) is
  its host array of that layer; arrays[layer] its copy on the DE, until sent on to the PE."""

  def __init__(self, region, layer_bytes: int, num_layers: int):
    self.region = region
    self.layer_bytes = layer_bytes
    self.arrays: list = [None] * num_layers
    self.next = 0  # the first layer not yet staged


class PrefillShard:
  """One PE: executes the batches its group leader selects for it (no thread of its own)."""

  def __init__(self, cluster, engine, model):
    self.cluster = cluster
    self.engine = engine
    self.model = model
    self.tm = cluster.traffic[engine.name]
    self.resident_layers = 0
    """Layers of prefix KV on this PE's device now."""
    self.max_resident_layers = 0
    """Most layers of prefix KV ever on this PE's device at once (layerwise: at most
    runtime.prefill_layers_in_flight)."""
    self.stage_s: collections.Counter = collections.Counter()
    """Seconds of this PE's forwards per stage (module docstring)."""
    self._sender = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix=f"{engine.name}-send")
    """Runs each layer's D2H to the DE buffer while this thread loads the next layers."""
    self.compiled_shapes: set[tuple[int, int, int]] = set()
    """(rows, tp, tn) batch shapes this PE has compiled (precompiled or run)."""
    self.rounded_batches = 0
    """Batches run in a larger compiled shape than their own (batch_shape), not compiled anew."""
    self._de_staged: dict | None = None
    """In a layerwise forward under runtime.de_path_h2d 'forward': per DE-path region (request,
    side), its layers staged on the DE device and not yet sent on to this PE (_via_de)."""
    self._de_staged_bytes: dict[str, int] = {}
    """Per DE: bytes of this forward's staged layers not yet sent on (runtime.de_path_stage_bytes
    bounds it)."""
    self.max_de_staged_bytes = 0
    """Most bytes of staged DE-path layers one DE held for this PE at once (the cost of 'forward';
    the layer being sent on is not counted once its D2D is issued)."""

  @contextlib.contextmanager
  def _stage(self, name: str):
    start = time.perf_counter()
    try:
      with profile_window.span(f"{self.engine.name} {name}"):
        yield
    finally:
      self.stage_s[name] += time.perf_counter() - start

  def release_device_memory(self) -> None:
    """Drops this PE's model copy, stops its sender (after its group has stopped)."""
    self.model = None
    self._sender.shutdown(wait=True)

  def run_batch(self, chunks: list[tuple[TurnRequest, int, int]]) -> float:
    """Prefills `chunks` in one forward; returns its wall time. Sets first_token on last chunks."""
    start = time.perf_counter()
    config = self.cluster.runtime_config
    with self._stage("begin"):
      for request, cached, _ in chunks:
        if cached == request.hit_tokens:
          self._begin(request)
    rows, tp, tn = self.batch_shape(chunks)
    tokens = np.zeros((rows, tn), np.int32)
    prefix_len = np.zeros((rows,), np.int32)
    new_len = np.ones((rows,), np.int32)  # padding rows: one dummy token, no prefix
    for i, (request, cached, new) in enumerate(chunks):
      tokens[i, :new] = request.prompt[cached:cached + new]
      prefix_len[i], new_len[i] = cached, new
    place = functools.partial(jax.device_put, device=self.engine.replicated_sharding)
    args = (place(tokens), place(prefix_len), place(new_len))
    if config.layerwise:
      x = self._layerwise(chunks, rows, tp, *args)
    else:
      x = self._whole(chunks, rows, tp, *args)
    with self._stage("logits"), self.tm.model_step():
      logits = last_token_logits_jit(self.model, x, args[2])
      first = np.asarray(jnp.argmax(logits, axis=-1))
    for i, (request, cached, new) in enumerate(chunks):
      if cached == request.hit_tokens:
        request.release_reads()  # the hit blocks were consumed by this first chunk
      if cached + new == request.prompt_tokens:
        request.first_token = int(first[i])
    return time.perf_counter() - start

  def batch_shape(self, chunks: list[tuple[TurnRequest, int, int]]) -> tuple[int, int, int]:
    """The (rows, tp, tn) a batch of `chunks` runs in: its own padding (powers of 2), or, if
    that was never compiled here, the smallest compiled shape with the same tp that holds it
    (more rows or new tokens, masked as padding). A chunked prefill's remainder (a few new
    tokens: a tn the precompile did not list) then costs a little padded compute instead of a
    compile inside the timed run (2.4 s for one layer program in an oracle run, 2x H200,
    2026-11-28, docs/perf/gpu_bench.md record 8). tp is never rounded: a longer prefix would
    move more bytes."""
    block_tokens = self.cluster.layout.block_tokens
    rows = pow2_at_least(len(chunks))
    tp = max(cached for _, cached, _ in chunks)
    tp = pow2_at_least(tp, block_tokens) if tp else 0
    tn = pow2_at_least(max(new for _, _, new in chunks), block_tokens)
    shape = (rows, tp, tn)
    if shape not in self.compiled_shapes:
      holders = [s for s in self.compiled_shapes if s[1] == tp and s[0] >= rows and s[2] >= tn]
      if holders:
        shape = min(holders, key=lambda s: (s[0] * s[2], s[2]))
        self.rounded_batches += 1
      else:
        self.compiled_shapes.add(shape)
    return shape

  def precompile(self, shapes) -> list[tuple[tuple[int, int, int], str]]:
    """Compiles this PE's forward programs (embed, one layer, last-token logits and argmax) for
    each (rows, tp, tn) batch shape by running them once on zeros, so that a timed run does not
    compile them on its first batch of that shape (runtime/offline.prefill_shapes). On 2x H100 a
    PE spent 35% of an oracle run compiling (thread samples, docs/perf/gpu_bench.md record 4).
    The shapes are a cross product, wider than any one run may need: a shape the device cannot
    run (out of memory, e.g. einsum attention's scores at 8 rows x 32K) is skipped, and a batch
    of it would fail the same way when it comes. Returns the skipped (shape, error) pairs."""
    layout = self.cluster.layout
    place = functools.partial(jax.device_put, device=self.engine.replicated_sharding)
    skipped = []
    for rows, tp, tn in shapes:
      prefix = None
      try:
        tokens = place(np.zeros((rows, tn), np.int32))
        prefix_len = place(np.full((rows,), tp, np.int32))
        new_len = place(np.ones((rows,), np.int32))
        prefix = place(np.zeros((rows, tp, *layout.token_kv_shape), layout.np_dtype))
        if self.cluster.runtime_config.skips_kv_io:  # the oracle's prefix (Cluster.zeros_on)
          jnp.zeros(prefix.shape, prefix.dtype).delete()
        x = embed_tokens_jit(self.model, tokens)
        x, _ = prefill_layer_jit(self.model.layers[0], x, prefix, prefix_len, new_len)
        logits = last_token_logits_jit(self.model, x, new_len)
        jax.block_until_ready(jnp.argmax(logits, axis=-1))
        self.compiled_shapes.add((rows, tp, tn))
      except jax.errors.JaxRuntimeError as e:
        skipped.append(((rows, tp, tn), str(e).splitlines()[0][:200]))
      finally:
        if prefix is not None:
          prefix.delete()
    if not self.cluster.runtime_config.skips_kv_io:
      skipped += self._precompile_moves(shapes)
    return skipped

  def _precompile_moves(self, shapes) -> list[tuple[tuple[int, int, int], str]]:
    """Compiles the small programs around the forward for each batch shape: padding a row's
    prefix to tp (_pad_to, for every one-sided read length up to tp; _pad_one_row for a
    one-row batch) and stacking the rows,
    the row cut for each send (TrafficManager.precompile_d2h_rows), the cuts and joins of a
    move's pieces (on zeros, moving no bytes: TrafficManager.precompile_moves), and in
    whole-prefix prefill
    the per-layer index and the stack of the new KV. Before they were, the PE thread spent
    21-32% of basic's timed samples and 9-11% of dualpath's compiling (2x H200, record 6 of
    docs/perf/gpu_bench.md). A prefix read on both sides, or a later chunk's prefix from the DE
    buffer, keeps its exact length and still compiles its pad when it comes."""
    layout = self.cluster.layout
    kv_shape = layout.token_kv_shape
    whole = not self.cluster.runtime_config.layerwise
    lead = (layout.num_layers,) if whole else ()
    axis = 1 if whole else 0
    sharding = self.engine.replicated_sharding

    def zeros(shape):
      return jnp.zeros(shape, layout.np_dtype, device=sharding)

    de_tms = ([self.cluster.traffic[e.name] for e in self.cluster.topology.decode_engines]
              if self.cluster.runtime_config.dual_path else [])
    page_locked = self.cluster.runtime_config.host_memory != "numpy"
    skipped, moved, padded, padded_one = [], set(), set(), set()
    for rows, tp, tn in shapes:
      try:
        # a prefix read on one side lands Cluster.read_rows long: an admit_tokens bucket
        lengths = sorted({self.cluster.admit_tokens(n) for n in range(
            layout.block_tokens, tp + 1, layout.block_tokens)})  # each <= tp, a power of 2
        for length in lengths:
          shape = (*lead, length, *kv_shape)
          if length not in moved:  # one row's prefix to this PE: PE path, DE paths
            moved.add(length)
            self.tm.precompile_moves(shape, layout.np_dtype, page_locked=page_locked)
            for de_tm in de_tms:
              de_tm.precompile_moves(shape, layout.np_dtype, page_locked=page_locked,
                                     d2d_to=self.engine)
          if (length, tp) not in padded:
            padded.add((length, tp))
            _pad_to(zeros(shape), tp, axis).delete()
          if rows == 1 and (length, tp) not in padded_one:
            padded_one.add((length, tp))
            _pad_one_row(zeros(shape), tp, axis).delete()
        prefix = jnp.stack([self.cluster.zeros_on(self.engine, (*lead, tp, *kv_shape))] * rows,
                           axis=axis)
        new_kv = zeros((*lead, rows, tn, *kv_shape))
        if whole:
          layer_kv = [zeros((rows, tn, *kv_shape)) for _ in range(layout.num_layers)]
          jax.block_until_ready((prefix[0], jnp.stack(layer_kv)))
        self.tm.precompile_d2h_rows(prefix, axis)
        self.tm.precompile_d2h_rows(new_kv, axis)
        prefix.delete()
        new_kv.delete()
      except jax.errors.JaxRuntimeError as e:
        skipped.append(((rows, tp, tn), "moves: " + str(e).splitlines()[0][:200]))
    return skipped

  # --- per request -------------------------------------------------------------------------------

  def _begin(self, request: TurnRequest) -> None:
    """First chunk: its reads have landed (Cluster.land_read, on the links' workers); waits for
    any still landing and re-raises a read's error."""
    request.times["prefill_start"] = time.perf_counter()
    request.read_kv = {side: future.result() for side, future in request.read_futures.items()}

  def _de(self, request: TurnRequest):
    de_engine = self.cluster.topology.decode_engines[request.decode_engine]
    return de_engine, self.cluster.traffic[de_engine.name]

  def _via_de(self, request: TurnRequest, region, layers, key) -> jax.Array:
    """region(layers): a host array in the DE node buffer -> DE device -> this PE's device;
    with runtime.de_read_route 'pe_host_link' (a diagnostic) straight onto this PE's device.
    In a layerwise forward under runtime.de_path_h2d 'forward', the first layer asked for of a
    region (`key`) puts every layer of it on the DE device at once (their H2Ds then wait for
    one decode step together), and each layer's D2D takes its staged array."""
    host = region(layers)
    request.add_bytes("h2d", host.nbytes)
    if self.cluster.runtime_config.de_read_route == "pe_host_link":
      return self.tm.h2d(host)
    _, de_tm = self._de(request)
    request.add_bytes("d2d", host.nbytes)
    if self._de_staged is None or not isinstance(layers, int) or de_tm.gated:
      # (gated, every piece waits on this thread for the one before: issued at once, the
      # forward's first layer would wait for the whole DE-side prefix)
      return de_tm.d2d(de_tm.h2d(host), self.engine)
    staged = self._de_staged.get(key)
    if staged is None:
      staged = self._de_staged[key] = _StagedRegion(region, host.nbytes,
                                                    self.cluster.layout.num_layers)
    self._stage_on_de(staged, de_tm, need=layers)
    on_de, staged.arrays[layers] = staged.arrays[layers], None  # freed once its D2D has read it
    self._de_staged_bytes[de_tm.engine.name] -= staged.layer_bytes
    return de_tm.d2d(on_de, self.engine)

  def _stage_on_de(self, staged: _StagedRegion, de_tm, need: int) -> None:
    """H2Ds of `staged`'s next layers onto its DE: up to layer `need` always, and further ahead
    while the DE's staged bytes stay within runtime.de_path_stage_bytes (0: every layer, at the
    region's first use). Issued together, they wait for the DE's step in flight together."""
    budget = self.cluster.runtime_config.de_path_stage_bytes
    de_name = de_tm.engine.name
    held = self._de_staged_bytes.get(de_name, 0)
    while staged.next < len(staged.arrays):
      if staged.next > need and budget and held + staged.layer_bytes > budget:
        break
      staged.arrays[staged.next] = de_tm.h2d(staged.region(staged.next))
      held += staged.layer_bytes
      staged.next += 1
    self._de_staged_bytes[de_name] = held
    self.max_de_staged_bytes = max(self.max_de_staged_bytes, held)

  def _prefix_parts(self, request: TurnRequest, cached: int, layers) -> list[jax.Array]:
    """The moves of the row's prefix KV onto this PE, issued: its parts in token order, each
    [tokens, 2, H, D] for one layer (int) or [L, tokens, 2, H, D] for all (slice(None)); none
    when there is no prefix. _stack_rows joins and pads them."""
    layout = self.cluster.layout
    if not cached:
      return []
    if cached > request.hit_tokens:  # a later chunk: the prefix sits in the DE node buffer
      with self._stage("de_path"):
        return [self._via_de(request, lambda ls: request.prompt_kv[ls, :cached], layers,
                             (request, "prompt_kv"))]
    parts = []
    for side in ("pe", "de"):
      if side not in request.read_kv:
        continue
      kv = request.read_kv[side]  # [L, Cluster.read_rows, 2, H, D], layer-major (_begin)
      # A prefix read on one side is padded on the host (Cluster.read_rows), so that the device
      # pads and stacks it with a handful of programs; a prefix read on both sides is
      # concatenated on the device and keeps its exact lengths.
      tokens = kv.shape[1]
      if len(request.read_kv) == 1:
        tokens = min(tokens, pow2_at_least(cached, layout.block_tokens))
      if side == "pe":
        host = kv[layers, :tokens]  # one layer: contiguous rows of the buffer, no copy
        request.add_bytes("h2d", host.nbytes)  # what moves, the bucket's padding included
        with self._stage("h2d"):
          parts.append(self.tm.h2d(host))
      else:
        with self._stage("de_path"):
          parts.append(self._via_de(request, lambda ls, kv=kv, n=tokens: kv[ls, :n], layers,
                                    (request, side)))
    return parts

  def _send_rows(self, chunks, prefix, new_kv, batch_axis: int, layers) -> list:
    """Each row's new KV into its request's prompt KV in the DE node buffer; on a first chunk
    also the PE-read part of its hit (the DE-read part is there already). x: [B, T, ...] for one
    layer (`layers` an int), [L, B, T, ...] for all (slice(None)). Returns (request, bytes
    moved) pairs, for the caller's thread to count (TurnRequest.add_bytes is not thread-safe).

    D2Hs from this PE's device straight into the DE node's buffer: the paper's steps (5)-(7)
    (the PE's CNIC reads HBM, the DE's CNIC writes DE DRAM) never touch the DE's GPU. Routing
    them through the DE's device (D2D, then D2H there) queued them with the decode steps' own
    copies and made them up to 2x slower (4x H200, docs/perf/gpu_bench.md).
    """
    if isinstance(layers, int):  # one layer: its KV goes to [l:l+1]
      layers = slice(layers, layers + 1)
    hits, news = [], []
    for i, (request, cached, new) in enumerate(chunks):
      pe_tokens = request.read_split[0] * request.block_tokens
      if cached == request.hit_tokens and pe_tokens:
        hits.append((request, i, request.prompt_kv[layers, :pe_tokens]))
      news.append((request, i, request.prompt_kv[layers, cached:cached + new]))
    moved = []
    for x, copies in ((prefix, hits), (new_kv, news)):
      if copies:
        nbytes = self.tm.d2h_rows(x, [(i, out) for _, i, out in copies], batch_axis)
        moved += [(request, n) for (request, _, _), n in zip(copies, nbytes)]
    return moved

  def _send_layer(self, chunks, prefix, new_kv, layer: int) -> list:
    """On the sender thread: layer `layer`'s sends, then its prefix KV leaves the device."""
    try:
      with profile_window.span(f"{self.engine.name} send layer {layer}"):
        return self._send_rows(chunks, prefix, new_kv, 0, layer)
    finally:
      prefix.delete()

  def _finish_send(self, future) -> None:
    """Waits for one layer's sends (re-raising their error) and counts their bytes."""
    for request, nbytes in future.result():
      request.add_bytes("d2h", nbytes)
    self.resident_layers -= 1

  def _stack_rows(self, prefixes, rows: int, tp: int, axis: int, layers: int | None):
    """Each row's prefix parts (_prefix_parts) joined, padded to tp and the rows stacked along
    the batch axis (zeros for rows without a prefix and padding rows)."""
    layout = self.cluster.layout
    lead = () if layers is None else (layers,)
    empty = self.cluster.zeros_on(self.engine, (*lead, tp, *layout.token_kv_shape))
    with self._stage("stack"):
      padded = []
      for parts in prefixes:
        if not parts:
          padded.append(empty)
          continue
        row = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
        if rows == 1:  # pad and batch axis in one program
          return _pad_one_row(row, tp, axis)
        padded.append(_pad_to(row, tp, axis))
      padded += [empty] * (rows - len(padded))
      return jnp.stack(padded, axis=axis)

  # --- one forward -------------------------------------------------------------------------------

  def _issue_layer(self, chunks, layer: int) -> list[list[jax.Array]] | None:
    """Issues the moves of layer `layer`'s prefix KV of every row onto this PE (None for the
    oracle, which moves nothing); _assemble_layer stacks them once they are issued."""
    self.resident_layers += 1
    self.max_resident_layers = max(self.max_resident_layers, self.resident_layers)
    if self.cluster.runtime_config.skips_kv_io:
      return None
    return [self._prefix_parts(request, cached, layer) for request, cached, _ in chunks]

  def _assemble_layer(self, issued, rows: int, tp: int) -> jax.Array:
    """[rows, tp, 2, H, D]: the issued rows' parts joined, padded and stacked on this PE (the
    oracle's zeros)."""
    if issued is None:
      with self._stage("stack"):
        return self.cluster.zeros_on(self.engine, (rows, tp, *self.cluster.layout.token_kv_shape))
    return self._stack_rows(issued, rows, tp, axis=0, layers=None)

  def _layerwise(self, chunks, rows, tp, tokens, prefix_len, new_len):
    skip_io = self.cluster.runtime_config.skips_kv_io
    in_flight = self.cluster.runtime_config.prefill_layers_in_flight
    layers = self.model.layers
    with self._stage("compute"), self.tm.model_step():
      x = embed_tokens_jit(self.model, tokens)
    self._de_staged = {} if self.cluster.runtime_config.de_path_h2d == "forward" else None
    self._de_staged_bytes = {}
    sends: dict[int, concurrent.futures.Future] = {}
    try:
      current = self._assemble_layer(self._issue_layer(chunks, 0), rows, tp)
      for l, layer in enumerate(layers):
        # At most `in_flight` layers of prefix KV on the device: a layer's prefix leaves it
        # once its send is done (_send_layer), so layer l+1 waits for that of l+1-in_flight.
        if (done := l + 1 - in_flight) in sends:
          with self._stage("send"):
            self._finish_send(sends.pop(done))
        # Layer l+1's moves are issued before layer l is dispatched, and joined, padded and
        # stacked after it (module docstring: queued before layer l, they serialized the two).
        issued = self._issue_layer(chunks, l + 1) if l + 1 < len(layers) else None
        with self._stage("compute"), self.tm.model_step():
          x, new_kv = prefill_layer_jit(layer, x, current, prefix_len, new_len)
        if skip_io:
          self.resident_layers -= 1
        else:  # layer l's D2H runs on the sender while this thread loads the next layers
          sends[l] = self._sender.submit(self._send_layer, chunks, current, new_kv, l)
        current = (self._assemble_layer(issued, rows, tp) if l + 1 < len(layers) else None)
    finally:
      self._de_staged = None  # the staged layers of a failed forward go with it
      self._de_staged_bytes = {}
      if sends:
        with self._stage("send"):
          for l in sorted(sends):
            self._finish_send(sends.pop(l))
    return x

  def _whole(self, chunks, rows, tp, tokens, prefix_len, new_len):
    layout = self.cluster.layout
    skip_io = self.cluster.runtime_config.skips_kv_io
    self.resident_layers = self.max_resident_layers = layout.num_layers
    if skip_io:
      prefix = self.cluster.zeros_on(
          self.engine, (layout.num_layers, rows, tp, *layout.token_kv_shape))
    else:
      prefixes = [self._prefix_parts(request, cached, slice(None))
                  for request, cached, _ in chunks]
      prefix = self._stack_rows(prefixes, rows, tp, axis=1, layers=layout.num_layers)
    # Layer by layer over the resident prefix: the same compiled layer as the layerwise path
    # (one whole-model program per shape would compile for minutes on large models).
    with self._stage("compute"), self.tm.model_step():
      x = embed_tokens_jit(self.model, tokens)
      new_kv = []
      for l, layer in enumerate(self.model.layers):
        x, kv = prefill_layer_jit(layer, x, prefix[l], prefix_len, new_len)
        new_kv.append(kv)
      new_kv = jnp.stack(new_kv)
    if not skip_io:
      with self._stage("send"):
        for request, nbytes in self._send_rows(chunks, prefix, new_kv, 1, slice(None)):
          request.add_bytes("d2h", nbytes)
      prefix.delete()
    self.resident_layers = 0
    return x

