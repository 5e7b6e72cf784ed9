"""The project's layerwise KV load into one PE over both paths, against the raw ingest ceiling.

A prefix of `prefix_tokens` tokens sits on the host as Full Blocks [n, L, B, W] (the store's
unit). Its blocks are split into k + 1 equal parts: part 0 takes the PE path, part i the DE path
through GPU i. Every path runs the runtime's per-layer steps with the project's own functions,
one Python thread a path, layer after layer:

  PE path (GPU 0)  layout.layer_kv (gather one layer of the part's blocks on the host)
                   -> H2D onto the PE
  DE path (GPU i)  layout.layer_kv -> H2D onto DE i -> D2D onto the PE

Gather buffers, as the PE shard keeps them (runtime/prefill_shard.py, PrefillShard._gather): each
path owns LAYERS_IN_FLIGHT (3) reused host buffers, layer l gathers into buffer l % 3, and before
it does, layer l - 3 (the buffer's last user) must have landed on the PE (block_until_ready on
that layer's PE array): the runtime's own rule, under which at most 3 layers are in flight per
path. The buffers are allocated and touched before the clock starts (the runtime's live for the
shard's lifetime), so the measurement carries no first-touch page faults.

Variants (each row's 'note' says the same):
  'layer_major'      the runtime since 2026-11-28: a read lands layer-major in its node buffer
                     (here KVLayout.full_blocks_to_kv, the one copy that used to stack the read
                     blocks; the runtime since has the store write into the buffer,
                     KVBlockStore.read_blocks_into; outside the clock here either way), so each
                     layer's part is one contiguous array that moves as it lies:
                     TrafficManager.h2d (+ d2d) as 'traffic', no gather, and layer l waits for
                     layer l - 3 to land (the runtime's LAYERS_IN_FLIGHT bound).
  'layer_major_direct'  the same landed layers, each moved whole by transfer.host_to_device
                     (staging='direct') + DevicePutMover, without a TrafficManager: what its
                     pieces, joins and records cost.
  'transfer'         transfer.host_to_device (staging 'auto': pinned where the backend has it;
                     copy=True, as TrafficManager.h2d: on CPU a device_put may alias the reused
                     buffer, elsewhere it makes no copy) and the DevicePutMover for the D2D.
  'transfer_direct'  the same with staging='direct' (jax.device_put from the gather buffer).
  'traffic'          one runtime.traffic.TrafficManager per engine, as the PE worker moves KV
                     (tm.h2d; tm.d2d(tm.h2d(...), PE)), with TrafficConfig(chunk_bytes,
                     max_kv_wait_s) from this section's config (default 64 MiB and 0 s, the GPU
                     end-to-end runtime's kv_chunk_bytes / kv_max_wait_s). Pieces of a move wait
                     for the previous piece to land. No model step runs here, so the priority
                     gate never waits and max_kv_wait_s only records the setting.
  'transfer_fresh_buffers'  'transfer' as this bench measured it up to 2026-11-27: every layer
                     gathered into a fresh numpy array (first-touch page faults; copy=False,
                     since nobody writes it again) and no wait between layers. Kept so that
                     older records stay comparable; the runtime no longer does this.
The 'layer_major' variants land the read in host memory of the section's `host_memory` kind
(transfer.pinned_memory: 'numpy' pageable as up to record 5, or page-locked), as the runtime's
node buffers do under runtime.host_memory.
Every run's PE arrays are checked outside the clock: their bytes add up to the prefix's, they
sit on the PE, and layers 0 and L - 1 equal layout.layer_kv of the host blocks (layer 0's buffer
is reused by layer 3, so a premature reuse shows there), compared on the PE (bench/verify.py:
from e2e4254 to 2026-11-29 the check copied the layers to the host, which slowed the next timed
run; the k = 0 rows of records 6 and 11 read 80-88% of the ceiling for that reason).
Achieved GB/s = all L layers' bytes over the time until every layer has landed on the PE; its
ratio to the raw ingest ceiling with the same k (ceilings.py) says how much of the hardware the
data plane uses; the target judges the runtime's variant ('layer_major') only, the others
report their ratios as diagnostics. Each row's path_host_s says, per path of its median run,
where the path's thread spent it: issue_s inside the load calls (dispatching the H2D / D2D,
the TrafficManager's own work included), issue_max_s the longest one, wait_s waiting for layer
l - bound to land, thread_s all of it (record 13: the TrafficManager path was 4 ms slower a run
at k = 1; this tells host-side dispatch from device time). Components (gather alone, H2D
alone, D2D alone, single thread, all layers) show where the time goes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from dualpath_jax.bench import hardware, verify
from dualpath_jax.bench.timing import median_seconds
from dualpath_jax.kvstore.layout import KVLayout
from dualpath_jax.runtime.prefill_shard import LAYERS_IN_FLIGHT
from dualpath_jax.runtime.traffic import row_slices
from dualpath_jax.transfer import pinned_memory

RUNTIME_VARIANT = "layer_major"
"""The variant that moves KV as the runtime does; the target (target_ratio of the ceiling) judges
its rows only: the others are diagnostics and older paths, reported with their ratios."""
VARIANTS = ("layer_major", "layer_major_direct", "transfer", "transfer_direct", "traffic",
            "transfer_fresh_buffers")
VARIANT_NOTES = {
    "layer_major": ("read landed layer-major (outside the clock, as the read's own copy); per "
                    "layer one contiguous array through one TrafficManager per engine with "
                    "TrafficConfig(chunk_bytes, max_kv_wait_s); no host gather; at most "
                    f"{LAYERS_IN_FLIGHT} layers in flight: the runtime since 2026-11-28"),
    "layer_major_direct": ("read landed layer-major (outside the clock); per layer one "
                           "contiguous array, transfer.host_to_device staging='direct' + "
                           "DevicePutMover, no TrafficManager; at most "
                           f"{LAYERS_IN_FLIGHT} layers in flight"),
    "transfer": (f"reused gather buffers ({LAYERS_IN_FLIGHT} a path, cycled by layer; one is "
                 "reused once its last layer landed on the PE); transfer.host_to_device "
                 "staging='auto' (copy=True) + DevicePutMover"),
    "transfer_direct": (f"reused gather buffers ({LAYERS_IN_FLIGHT} a path, as 'transfer'); "
                        "transfer.host_to_device staging='direct' + DevicePutMover"),
    "traffic": (f"reused gather buffers ({LAYERS_IN_FLIGHT} a path, as 'transfer'); one "
                "TrafficManager per engine with TrafficConfig(chunk_bytes, max_kv_wait_s) "
                "(no model steps run: the gate never waits)"),
    "transfer_fresh_buffers": ("every layer gathered into a fresh array (first-touch page "
                               "faults), no wait between layers; transfer.host_to_device "
                               "staging='auto' (copy=False) + DevicePutMover: the bench's "
                               "'transfer' up to 2026-11-27"),
}


def _delete(arrays) -> None:
  for a in jax.tree_util.tree_leaves(arrays):
    if isinstance(a, jax.Array):
      a.delete()


def _resident(nbytes: int) -> np.ndarray:
  """A uint8 host buffer whose pages are already mapped (a reused buffer's state)."""
  buffer = np.empty(nbytes, np.uint8)
  buffer.fill(0)
  return buffer


def _engines(devices: Sequence[jax.Device]):
  """(PE destination, DE destinations, (PE, DEs) Engine records) over `devices`; one device is a
  PE alone (k = 0 only)."""
  from dualpath_jax.engines import TopologyConfig, build_topology
  from dualpath_jax.engines.topology import single_engine
  if len(devices) < 2:
    pe = single_engine(devices[0], role="prefill")
    return pe, [], (pe, [])
  topo = build_topology(TopologyConfig(num_prefill_engines=1,
                                       num_decode_engines=len(devices) - 1), devices)
  pe, des = topo.prefill_engines[0], list(topo.decode_engines)
  return pe, des, (pe, des)


def measure_data_plane(devices: Sequence[jax.Device], *, layout: KVLayout, prefix_tokens: int,
                       variants: Sequence[str] = VARIANTS, repeats: int, warmup: int,
                       ceiling_gbps: Mapping[int, float] | None = None,
                       target_ratio: float = 0.9, components: bool = True, seed: int = 0,
                       chunk_bytes: int = 32 << 20, max_kv_wait_s: float = 0.0,
                       layers_in_flight: int = LAYERS_IN_FLIGHT,
                       host_memory: str = "numpy", h2d_staging: str = "",
                       log: Callable[[str], None] = print,
                       out_of_time: Callable[[], bool] = lambda: False,
                       on_update: Callable[[dict], None] | None = None) -> dict:
  """Data plane GB/s per (k, variant), with ratios to `ceiling_gbps[k]` when given.

  layers_in_flight: the bound of every variant but 'transfer_fresh_buffers' (the runtime's
  prefill_layers_in_flight; the note strings describe the default, LAYERS_IN_FLIGHT).
  chunk_bytes, max_kv_wait_s: the 'traffic' and 'layer_major' variants' TrafficConfig (the runtime's
  kv_chunk_bytes and kv_max_wait_s).
  h2d_staging: the TrafficManager variants' TrafficConfig.h2d_staging (the runtime's
  h2d_staging); '' picks 'direct' where the components show it faster, else the default.
  """
  from dualpath_jax.runtime.traffic import TrafficConfig
  from dualpath_jax.transfer import make_mover
  from dualpath_jax.transfer.device_move import destination_sharding

  if isinstance(layers_in_flight, bool) or not isinstance(layers_in_flight, int) \
      or layers_in_flight < 1:
    raise ValueError(f"data_plane.layers_in_flight: expected a positive int, got "
                     f"{layers_in_flight!r}")
  unknown = set(variants) - set(VARIANTS)
  if unknown or not variants:
    raise ValueError(f"data_plane.variants: expected some of {VARIANTS}, got {variants}")
  if host_memory not in pinned_memory.HOST_MEMORY_KINDS:
    raise ValueError(f"data_plane.host_memory: expected one of "
                     f"{list(pinned_memory.HOST_MEMORY_KINDS)}, got {host_memory!r}")
  from dualpath_jax.transfer.host_device import STAGING_MODES
  if h2d_staging and h2d_staging not in STAGING_MODES:
    raise ValueError(f"data_plane.h2d_staging: expected '' or one of {list(STAGING_MODES)}, got "
                     f"{h2d_staging!r}")
  traffic_config = TrafficConfig(chunk_bytes=chunk_bytes, max_kv_wait_s=float(max_kv_wait_s),
                                 **({"h2d_staging": h2d_staging} if h2d_staging else {}))
  devices = tuple(devices)
  n = len(devices)
  num_blocks = layout.num_full_blocks(prefix_tokens)
  if num_blocks < n:
    raise ValueError(f"data_plane.prefix_tokens: {prefix_tokens} tokens make {num_blocks} "
                     f"blocks, fewer than the {n} paths to split them over")
  blocks = hardware.random_normal_bits(num_blocks * layout.full_block_bytes, layout.dtype,
                                       seed).reshape(num_blocks, *layout.full_block_shape)
  total = blocks.nbytes  # every layer of every block crosses to the PE once
  pe, des, engines = _engines(devices)
  pe_devices = destination_sharding(pe).device_set
  mover = make_mover("device_put")
  check_layers = sorted({0, layout.num_layers - 1})
  expected = {layer: layout.layer_kv(blocks, layer).view(np.uint8).reshape(-1)
              for layer in check_layers}
  result = dict(
      layout=dict(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                  head_dim=layout.head_dim, dtype=layout.dtype, block_tokens=layout.block_tokens),
      prefix_tokens=num_blocks * layout.block_tokens, num_blocks=num_blocks, bytes=total,
      layer_bytes=total // layout.num_layers, repeats=repeats, warmup=warmup,
      target_ratio=target_ratio, threads="one a path",
      layers_in_flight=layers_in_flight, host_memory=host_memory,
      chunk_bytes=traffic_config.chunk_bytes,
      max_kv_wait_s=traffic_config.max_kv_wait_s, check_layers=check_layers,
      variant_notes={v: VARIANT_NOTES[v] for v in variants},
      note=("ratio = achieved GB/s / raw multipath ingest ceiling with the same k "
            "(ceilings.ingest); the same equal split of bytes over the paths. chunk_bytes and "
            "max_kv_wait_s: the 'traffic' and 'layer_major' variants' TrafficConfig. Every "
            "timed and warm-up run is checked outside the clock: loaded_bytes = the PE "
            "arrays' bytes, which sit on the PE, and check_layers equal the host's "
            "layout.layer_kv, compared on the PE (no D2H between timed runs)"),
      h2d_staging=traffic_config.h2d_staging, rows=[])
  log(f"data_plane: {num_blocks} Full Blocks ({result['prefix_tokens']} tokens, "
      f"{total / 2**30:.2f} GiB, {result['layer_bytes'] / 2**20:.1f} MiB a layer), {n} device(s)"
      f"; traffic pieces <= {chunk_bytes / 2**20:g} MiB, KV wait <= {max_kv_wait_s:g} s")

  def update():
    if on_update:
      on_update(result)

  on_pe = {}  # layer -> its expected bytes on the PE, placed at the first check

  def check(outs) -> dict:
    """What one run left on the PE, against the host blocks (outside the clock; compared on the
    PE: a D2H of the layers here slowed the next timed run, bench/verify.py)."""
    arrays = [x for path in outs for x in path]
    where = all(x.sharding.device_set == pe_devices for x in arrays)
    for layer, want in expected.items():
      if layer not in on_pe and where:
        on_pe[layer] = verify.expected_bytes(want, outs[0][layer])
    equal = where and all(verify.device_bytes_equal([path[layer] for path in outs], on_pe[layer])
                          for layer in expected)
    return dict(loaded_bytes=sum(x.nbytes for x in arrays), on_pe=where, kv_equal=bool(equal))

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(n, 1))
  try:
    if components and not out_of_time():
      result["components"] = comp = _components(blocks, layout, pe, des, mover, repeats,
                                                warmup, log, chunk_bytes, layers_in_flight)
      # The TrafficManager variants stage H2D the faster way, as the end-to-end runs do
      # (scripts/gpu_bench_call.sh picks their runtime.h2d_staging from these components).
      if not h2d_staging and comp.get("h2d_direct_gbps", 0) > comp.get("h2d_gbps", 0):
        traffic_config = dataclasses.replace(traffic_config, h2d_staging="direct")
      result["h2d_staging"] = traffic_config.h2d_staging
      update()
    for k in range(n):
      parts = np.array_split(blocks, k + 1)  # contiguous views along the block axis
      for variant in variants:
        if out_of_time():
          result.setdefault("skipped", []).append(dict(k=k, variant=variant,
                                                       why="time budget"))
          log(f"data_plane: out of time budget, k={k} {variant} skipped")
          continue
        checks: list[dict] = []
        try:
          run_path = _path_runner(variant, layout, parts, pe, des, mover, engines,
                                  traffic_config, layers_in_flight, host_memory)

          def run(parts=parts, run_path=run_path):
            futures = [pool.submit(run_path, p, part) for p, part in enumerate(parts)]
            return [f.result() for f in futures]

          def cleanup(outs, checks=checks, run_path=run_path):
            checks.append(check(outs))
            checks[-1]["path_host_s"] = [run_path.host_s[p] for p in range(len(outs))]
            _delete(outs)

          s, times = median_seconds(run, repeats, warmup, cleanup=cleanup)
          bad = [c for c in checks if not (c["kv_equal"] and c["on_pe"]
                                           and c["loaded_bytes"] == total)]
          if bad:
            raise RuntimeError(f"{len(bad)} of {len(checks)} runs left wrong KV on the PE: "
                               f"{bad[0]} (expected {total} bytes on the PE, layers "
                               f"{check_layers} equal to layout.layer_kv)")
        except Exception as e:  # noqa: BLE001  (one variant failing must not end the section)
          result["rows"].append(dict(k=k, variant=variant, error=repr(e)))
          log(f"data_plane: k={k} {variant} FAILED: {e!r}")
          update()
          continue
        gbps = total / s / 1e9
        row = dict(k=k, paths=k + 1, variant=variant, gbps=gbps, median_s=s, times_s=times,
                   blocks_per_path=[len(p) for p in parts],
                   gather_buffers=("none: landed layer-major" if variant.startswith("layer_major")
                                   else "fresh" if variant == "transfer_fresh_buffers"
                                   else f"reused, {layers_in_flight} a path"),
                   loaded_bytes=checks[-1]["loaded_bytes"], kv_checked_runs=len(checks),
                   path_host_s=checks[warmup + times.index(min(
                       times, key=lambda t: abs(t - s)))]["path_host_s"],
                   note=VARIANT_NOTES[variant])
        if variant in ("traffic", "layer_major"):
          row.update(chunk_bytes=traffic_config.chunk_bytes,
                     max_kv_wait_s=traffic_config.max_kv_wait_s,
                     h2d_staging=traffic_config.h2d_staging)
        ceiling = (ceiling_gbps or {}).get(k)
        if ceiling:
          row.update(ceiling_gbps=ceiling, ratio=gbps / ceiling)
          if variant == RUNTIME_VARIANT:
            row["met"] = bool(gbps / ceiling >= target_ratio)
        result["rows"].append(row)
        log(f"data_plane: k={k} {variant:22s} {gbps:7.2f} GB/s"
            + (f"  ratio {row['ratio']:.3f} of {ceiling:.2f}" if ceiling else ""))
        update()
  finally:
    pool.shutdown(wait=True)
  return result


def _path_runner(variant, layout, parts, pe, des, mover, engines, traffic_config,
                 in_flight=LAYERS_IN_FLIGHT, host_memory="numpy"):
  """fn(path, part_blocks) -> the part's L layers on the PE (list of device arrays).

  Except for 'transfer_fresh_buffers', path p gathers layer l into its buffer l %
  LAYERS_IN_FLIGHT, after layer l - LAYERS_IN_FLIGHT (that buffer's last user) has landed on the
  PE: PrefillShard._gather's buffers and the rule that makes reusing them safe.
  """
  from dualpath_jax.transfer import host_to_device
  from dualpath_jax.transfer.device_move import destination_sharding

  fresh = variant == "transfer_fresh_buffers"
  if variant in ("traffic", "layer_major"):
    from dualpath_jax.runtime.traffic import TrafficManager
    pe_engine, de_engines = engines
    managers = [TrafficManager(e, mover=mover, config=traffic_config)
                for e in (pe_engine, *de_engines)]

    def load(p, host):
      tm = managers[p]
      return tm.h2d(host) if p == 0 else tm.d2d(tm.h2d(host), pe_engine)
  else:
    staging = "direct" if variant in ("transfer_direct", "layer_major_direct") else "auto"

    def load(p, host):
      # A fresh buffer is never written again (copy=False); a reused one is, so copy=True, as
      # TrafficManager.h2d (only a CPU "device" copies: elsewhere device_put does not alias).
      x = host_to_device(host, pe if p == 0 else des[p - 1], copy=not fresh, staging=staging)
      return x if p == 0 else mover.move(x, pe)

  if variant.startswith("layer_major"):  # the read's landing: before the clock, as the read's copy
    def landing(p, nbytes):
      if host_memory == "numpy":
        return _resident(nbytes)
      engine = pe if p == 0 else des[p - 1]
      device = min(destination_sharding(engine).device_set, key=lambda d: d.id)
      return pinned_memory.allocate(nbytes, host_memory, device)
    landed = [layout.full_blocks_to_kv(part, out=landing(p, part.nbytes))
              for p, part in enumerate(parts)]
    buffers = None
  else:
    landed = None
    buffers = None if fresh else [
        [_resident(len(part) * layout.layer_block_bytes) for _ in range(in_flight)]
        for part in parts]

  def run_path(p, part):
    out = []
    began = time.perf_counter()
    issue_s, issue_max_s, wait_s = 0.0, 0.0, 0.0
    for layer in range(layout.num_layers):
      t0 = time.perf_counter()
      if landed is not None:
        if layer >= in_flight:  # the runtime's bound on layers in flight
          jax.block_until_ready(out[layer - in_flight])
        host = landed[p][layer]
      elif fresh:
        host = layout.layer_kv(part, layer)  # fresh buffer: nobody writes it again
      else:
        if layer >= in_flight:  # the buffer's last layer must have landed on the PE
          jax.block_until_ready(out[layer - in_flight])
        host = layout.layer_kv(part, layer, out=buffers[p][layer % in_flight])
      t1 = time.perf_counter()
      out.append(load(p, host))
      t2 = time.perf_counter()
      wait_s += t1 - t0
      issue_s += t2 - t1
      issue_max_s = max(issue_max_s, t2 - t1)
    run_path.host_s[p] = dict(thread_s=time.perf_counter() - began, issue_s=issue_s,
                              issue_max_s=issue_max_s, wait_s=wait_s)
    return out
  run_path.host_s = {}
  return run_path


def _components(blocks, layout, pe, des, mover, repeats, warmup, log, chunk_bytes,
                in_flight) -> dict:
  """Single-thread GB/s of each step over all layers of all blocks: where the time goes."""
  from dualpath_jax.transfer import host_to_device
  total = blocks.nbytes
  out = {}
  s, _ = median_seconds(
      lambda: [layout.layer_kv(blocks, layer) for layer in range(layout.num_layers)],
      repeats, warmup)
  out["gather_gbps"] = total / s / 1e9
  reused = np.empty(blocks.shape[0] * layout.layer_block_bytes, np.uint8)
  s, _ = median_seconds(
      lambda: [layout.layer_kv(blocks, layer, out=reused) for layer in range(layout.num_layers)],
      repeats, warmup)
  out["gather_reused_buffer_gbps"] = total / s / 1e9  # what the PE shard does (prefill_shard.py)
  layers = [layout.layer_kv(blocks, layer) for layer in range(layout.num_layers)]
  s, _ = median_seconds(lambda: [host_to_device(h, pe, copy=False) for h in layers],
                        repeats, warmup, cleanup=_delete)
  out["h2d_gbps"] = total / s / 1e9
  s, _ = median_seconds(lambda: [host_to_device(h, pe, copy=False, staging="direct")
                                 for h in layers], repeats, warmup, cleanup=_delete)
  out["h2d_direct_gbps"] = total / s / 1e9
  # Where the layer_major rows lose against h2d_direct (record 5: 13.9 against 32 GB/s at k = 0,
  # the same H2D of whole layers from one thread): the source (layer views of one landed buffer
  # against separate arrays) or the bound of 3 layers in flight.
  landed = layout.full_blocks_to_kv(blocks, out=_resident(blocks.nbytes))
  sources = dict(separate=layers, landed_views=[landed[layer] for layer in range(len(layers))])
  out["h2d_direct_by_source"] = {}
  for name, source in sources.items():
    for bound in (None, in_flight):
      def issue(source=source, bound=bound):
        moved = []
        for h in source:
          if bound and len(moved) >= bound:
            jax.block_until_ready(moved[-bound])
          moved.append(host_to_device(h, pe, copy=False, staging="direct"))
        return moved
      s, _ = median_seconds(issue, repeats, warmup, cleanup=_delete)
      key = f"{name}_{'back_to_back' if bound is None else f'{bound}_in_flight'}_gbps"
      out["h2d_direct_by_source"][key] = total / s / 1e9
  del landed, sources
  # Each layer cut into pieces along the token axis (the TrafficManager's cut), issued back to
  # back (its rule with the gate off) at a few sizes, and at chunk_bytes also each piece after
  # the previous one landed (its rule with the gate on).
  out["h2d_pieces"] = []
  for piece_bytes in sorted({8 << 20, 32 << 20, chunk_bytes}):
    pieces = [h[rows] for h in layers for rows in row_slices(h.shape, h.itemsize, piece_bytes)]
    row = dict(piece_bytes=piece_bytes, pieces=len(pieces))
    for staging in ("auto", "direct"):
      s, _ = median_seconds(lambda staging=staging, pieces=pieces: [
          host_to_device(h, pe, copy=False, staging=staging) for h in pieces],
          repeats, warmup, cleanup=_delete)
      row[f"{staging}_back_to_back_gbps"] = total / s / 1e9
      if piece_bytes != chunk_bytes:
        continue

      def waiting(staging=staging, pieces=pieces):
        landed = []
        for h in pieces:
          if landed:
            jax.block_until_ready(landed[-1])
          landed.append(host_to_device(h, pe, copy=False, staging=staging))
        return landed
      s, _ = median_seconds(waiting, repeats, warmup, cleanup=_delete)
      row[f"{staging}_one_at_a_time_gbps"] = total / s / 1e9
    out["h2d_pieces"].append(row)
  # D2H into the DE buffer (the PE's handoff, PrefillShard._send): the layers as on the PE, into
  # reused host memory (the node buffer's pool) or into fresh arrays, direct or through pinned.
  from dualpath_jax.transfer import device_to_host
  def on_pe():  # new device arrays each run: jax caches an array's host copy after a D2H
    return [host_to_device(h, pe, copy=False) for h in layers]

  targets = [np.empty_like(h) for h in layers]
  for h in targets:
    h.fill(0)  # resident, as a reused pool block is
  for staging in ("direct", "pinned"):
    try:
      s, _ = median_seconds(lambda xs, staging=staging: [
          device_to_host(x, t, staging=staging) for x, t in zip(xs, targets)],
          repeats, warmup, setup=on_pe)
      out[f"d2h_{staging}_gbps"] = total / s / 1e9
      s, _ = median_seconds(lambda xs, staging=staging: [
          device_to_host(x, np.empty(x.shape, x.dtype), staging=staging) for x in xs],
          repeats, warmup, setup=on_pe)
      out[f"d2h_{staging}_fresh_buffer_gbps"] = total / s / 1e9
    except Exception as e:  # noqa: BLE001  (a backend without pinned host memory)
      out[f"d2h_{staging}_error"] = f"{type(e).__name__}: {e}"[:300]
  if des:
    on_de = [host_to_device(h, des[0], copy=False) for h in layers]
    s, _ = median_seconds(lambda: [mover.move(x, pe) for x in on_de], repeats, warmup,
                          cleanup=_delete)
    out["d2d_gbps"] = total / s / 1e9
    _delete(on_de)
  out["note"] = ("one thread, all layers: gather = layout.layer_kv on the host; h2d = "
                 "transfer.host_to_device of the gathered layers onto the PE (h2d_direct: "
                 "staging='direct'); h2d_direct_by_source: whole layers, staging 'direct', from "
                 "separate arrays or from layer views of one landed buffer, back to back or "
                 f"with at most {in_flight} in flight; h2d_pieces: the same layers in "
                 "piece_bytes pieces, "
                 "issued back to back (the TrafficManager with the gate off) or, at chunk_bytes, "
                 "each after the previous landed (gate on), staging 'auto' or 'direct'; "
                 "d2h_<staging> = transfer.device_to_host of the layers, placed on the PE anew "
                 "before each run (jax caches a host copy: up to record 5 the 'direct' rows "
                 "timed only the host copy), into resident host arrays (the node buffer's "
                 "reused pool blocks), "
                 "d2h_<staging>_fresh_buffer into new arrays (first-touch page faults); d2d = "
                 "DevicePutMover from DE 0 to the PE")
  log("data_plane: components (one thread) " + ", ".join(
      f"{k} {v:.2f}" for k, v in out.items() if k.endswith("gbps")) + " GB/s")
  return out
