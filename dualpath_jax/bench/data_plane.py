"""The project's layerwise KV load into one PE over both paths, against the raw ingest ceiling.

A prefix of `prefix_tokens` tokens sits on the host as Full Blocks [n, L, B, W] (the store's
unit). Its blocks are split into k + 1 equal parts: part 0 takes the PE path, part i the DE path
through GPU i. Every path runs the runtime's per-layer steps with the project's own functions,
one Python thread a path, layer after layer:

  PE path (GPU 0)  layout.layer_kv (gather one layer of the part's blocks on the host)
                   -> H2D onto the PE
  DE path (GPU i)  layout.layer_kv -> H2D onto DE i -> D2D onto the PE

Variants: 'transfer' calls transfer.host_to_device (pinned staging where the backend has it;
copy=False, the gathered buffer is fresh) and the DevicePutMover directly; 'transfer_direct' the
same with staging='direct' (jax.device_put from the gathered buffer itself); 'traffic' goes through
one runtime.traffic.TrafficManager per engine with its default chunking, as the PE worker does.
Achieved GB/s = all L layers' bytes over the time until every layer has landed on the PE; its
ratio to the raw ingest ceiling with the same k (ceilings.py) says how much of the hardware the
data plane uses. Components (gather alone, H2D alone, D2D alone, single thread, all layers)
show where the time goes.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from dualpath_jax.bench import hardware
from dualpath_jax.bench.timing import median_seconds
from dualpath_jax.kvstore.layout import KVLayout

VARIANTS = ("transfer", "transfer_direct", "traffic")


def _delete(arrays) -> None:
  for a in jax.tree_util.tree_leaves(arrays):
    if isinstance(a, jax.Array):
      a.delete()


def _engines(devices: Sequence[jax.Device]):
  """(PE destination, DE destinations, Engine records or None) over `devices`."""
  if len(devices) < 2:
    return SingleDeviceSharding(devices[0]), [], None
  from dualpath_jax.engines import TopologyConfig, build_topology
  topo = build_topology(TopologyConfig(num_prefill_engines=1,
                                       num_decode_engines=len(devices) - 1), devices)
  pe, des = topo.prefill_engines[0], list(topo.decode_engines)
  return pe, des, (pe, des)


def measure_data_plane(devices: Sequence[jax.Device], *, layout: KVLayout, prefix_tokens: int,
                       variants: Sequence[str] = VARIANTS, repeats: int, warmup: int,
                       ceiling_gbps: Mapping[int, float] | None = None,
                       target_ratio: float = 0.9, components: bool = True, seed: int = 0,
                       log: Callable[[str], None] = print,
                       out_of_time: Callable[[], bool] = lambda: False,
                       on_update: Callable[[dict], None] | None = None) -> dict:
  """Data plane GB/s per (k, variant), with ratios to `ceiling_gbps[k]` when given."""
  from dualpath_jax.transfer import host_to_device, make_mover

  unknown = set(variants) - set(VARIANTS)
  if unknown or not variants:
    raise ValueError(f"data_plane.variants: expected some of {VARIANTS}, got {variants}")
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
  mover = make_mover("device_put")
  result = dict(
      layout=dict(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                  head_dim=layout.head_dim, dtype=layout.dtype, block_tokens=layout.block_tokens),
      prefix_tokens=num_blocks * layout.block_tokens, num_blocks=num_blocks, bytes=total,
      layer_bytes=total // layout.num_layers, repeats=repeats, warmup=warmup,
      target_ratio=target_ratio, threads="one a path",
      note=("ratio = achieved GB/s / raw multipath ingest ceiling with the same k "
            "(ceilings.ingest); the same equal split of bytes over the paths"),
      rows=[])
  log(f"data_plane: {num_blocks} Full Blocks ({result['prefix_tokens']} tokens, "
      f"{total / 2**30:.2f} GiB, {result['layer_bytes'] / 2**20:.1f} MiB a layer), {n} device(s)")

  def update():
    if on_update:
      on_update(result)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(n, 1))
  try:
    if components and not out_of_time():
      result["components"] = _components(blocks, layout, pe, des, mover, repeats, warmup, log)
      update()
    for k in range(n):
      parts = np.array_split(blocks, k + 1)  # contiguous views along the block axis
      for variant in variants:
        if out_of_time():
          result.setdefault("skipped", []).append(dict(k=k, variant=variant,
                                                       why="time budget"))
          log(f"data_plane: out of time budget, k={k} {variant} skipped")
          continue
        if variant == "traffic" and engines is None:
          result.setdefault("skipped", []).append(dict(
              k=k, variant=variant, why="TrafficManager needs Engines: at least 2 devices"))
          continue
        run_path = _path_runner(variant, layout, pe, des, mover, engines, host_to_device)

        def run(parts=parts, run_path=run_path):
          futures = [pool.submit(run_path, p, part) for p, part in enumerate(parts)]
          return [f.result() for f in futures]

        try:
          s, _ = median_seconds(run, repeats, warmup, cleanup=_delete)
        except Exception as e:  # noqa: BLE001  (one variant failing must not end the section)
          result["rows"].append(dict(k=k, variant=variant, error=repr(e)))
          log(f"data_plane: k={k} {variant} FAILED: {e!r}")
          update()
          continue
        gbps = total / s / 1e9
        row = dict(k=k, paths=k + 1, variant=variant, gbps=gbps, median_s=s,
                   blocks_per_path=[len(p) for p in parts])
        ceiling = (ceiling_gbps or {}).get(k)
        if ceiling:
          row.update(ceiling_gbps=ceiling, ratio=gbps / ceiling,
                     met=bool(gbps / ceiling >= target_ratio))
        result["rows"].append(row)
        log(f"data_plane: k={k} {variant:8s} {gbps:7.2f} GB/s"
            + (f"  ratio {row['ratio']:.3f} of {ceiling:.2f}" if ceiling else ""))
        update()
  finally:
    pool.shutdown(wait=True)
  return result


def _path_runner(variant, layout, pe, des, mover, engines, host_to_device):
  """fn(path, part_blocks) -> the part's L layers on the PE (list of device arrays)."""
  if variant in ("transfer", "transfer_direct"):
    staging = "direct" if variant == "transfer_direct" else "auto"

    def run_path(p, part):
      out = []
      for layer in range(layout.num_layers):
        host = layout.layer_kv(part, layer)  # fresh buffer: nobody writes it again
        if p == 0:
          out.append(host_to_device(host, pe, copy=False, staging=staging))
        else:
          out.append(mover.move(host_to_device(host, des[p - 1], copy=False, staging=staging),
                                pe))
      return out
    return run_path

  from dualpath_jax.runtime.traffic import TrafficManager
  pe_engine, de_engines = engines
  managers = [TrafficManager(pe_engine, mover=mover)] + [
      TrafficManager(e, mover=mover) for e in de_engines]

  def run_path(p, part):
    tm, out = managers[p], []
    for layer in range(layout.num_layers):
      host = layout.layer_kv(part, layer)
      out.append(tm.h2d(host) if p == 0 else tm.d2d(tm.h2d(host), pe_engine))
    return out
  return run_path


def _components(blocks, layout, pe, des, mover, repeats, warmup, log) -> dict:
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
  # D2H into the DE buffer (the PE's handoff, PrefillShard._send): the layers as on the PE, into
  # reused host memory (the node buffer's pool) or into fresh arrays, direct or through pinned.
  from dualpath_jax.transfer import device_to_host
  on_pe = [host_to_device(h, pe, copy=False) for h in layers]
  jax.block_until_ready(on_pe)
  targets = [np.empty_like(h) for h in layers]
  for h in targets:
    h.fill(0)  # resident, as a reused pool block is
  for staging in ("direct", "pinned"):
    try:
      s, _ = median_seconds(lambda: [device_to_host(x, t, staging=staging)
                                     for x, t in zip(on_pe, targets)], repeats, warmup)
      out[f"d2h_{staging}_gbps"] = total / s / 1e9
      s, _ = median_seconds(lambda: [device_to_host(x, np.empty(x.shape, x.dtype),
                                                    staging=staging) for x in on_pe],
                            repeats, warmup)
      out[f"d2h_{staging}_fresh_buffer_gbps"] = total / s / 1e9
    except Exception as e:  # noqa: BLE001  (a backend without pinned host memory)
      out[f"d2h_{staging}_error"] = f"{type(e).__name__}: {e}"[:300]
  _delete(on_pe)
  del targets
  if des:
    on_de = [host_to_device(h, des[0], copy=False) for h in layers]
    s, _ = median_seconds(lambda: [mover.move(x, pe) for x in on_de], repeats, warmup,
                          cleanup=_delete)
    out["d2d_gbps"] = total / s / 1e9
    _delete(on_de)
  out["note"] = ("one thread, all layers: gather = layout.layer_kv on the host; h2d = "
                 "transfer.host_to_device of the gathered layers onto the PE (h2d_direct: "
                 "staging='direct'); d2h_<staging> = transfer.device_to_host of the layers "
                 "on the PE into resident host arrays (the node buffer's reused pool blocks), "
                 "d2h_<staging>_fresh_buffer into new arrays (first-touch page faults); d2d = "
                 "DevicePutMover from DE 0 to the PE")
  log("data_plane: components (one thread) " + ", ".join(
      f"{k} {v:.2f}" for k, v in out.items() if k.endswith("gbps")) + " GB/s")
  return out
