r"""Host-to-device copies onto one device, by source memory, piece size, total and bound.

The data plane's PE path (layers landed layer-major in page-locked memory, each layer moved by
jax.device_put with at most 3 layers in flight) read 42-46 GB/s on an H200 where the ceilings'
H2D moved 53 (docs/perf/gpu_bench.md record 11). The two differ in the source (numpy arrays in
page-locked memory against jax arrays in XLA's pinned_host memory), the piece (64 MiB layers
against 32 MiB chunks), the total (1.75 GiB against 1 GiB) and the bound (3 layers in flight
against none). This sweeps each of them, interleaving every configuration's repeats so that a
drift of the host shows in all of them alike. Record 12: every configuration moved 52-55 GB/s;
what slowed the data plane was its own check between runs (see --before).

Sources (what a piece's bytes sit in):
  jax_pinned_array  jax arrays in XLA's pinned_host memory, one a piece (the ceilings' source)
  jax_pinned        numpy views of jax pinned_host arrays (transfer.pinned_memory 'jax_pinned')
  cuda_registered   numpy page-locked by cudaHostRegister ('cuda_registered', the GPU preset's)
  dma_mapped        numpy page-locked by the PJRT client's dma_map ('dma_mapped')
  numpy             pageable numpy
Every numpy source is one allocation of --total bytes with the pieces as views into it (a
landed read's layers), as the runtime's node buffer holds them.

Copies:
  device_put        jax.device_put(piece, SingleDeviceSharding(device))
  engine            transfer.host_to_device(piece, a PE engine, staging='direct', copy=False):
                    the data plane's own call, onto the engine's NamedSharding
  cuda_memcpy       A DIAGNOSTIC, not a runtime path: cudaMemcpyAsync from the page-locked piece
                    into a device buffer allocated before the clock (no allocation in the
                    clock, no XLA in the copy): what the link gives the memory itself

Dtypes: the pieces seen as arrays of that dtype (the data plane's are bfloat16 KV).
Shapes: 'flat' (1-D) or 'kv' ([tokens, 2, 4, 128]: a layer part of Qwen2.5-7B's KV, as the data
plane's pieces are shaped; tokens from the piece's bytes).
Issuers: 'main' issues a run from the main thread; 'pool' from a worker thread of a
ThreadPoolExecutor (the data plane's paths run that way), the main thread waiting for it.

Before: what runs outside the clock right before each timed run (A DIAGNOSTIC of the harness):
  none          nothing
  asarray       np.asarray of a fresh 64 MiB device array (a D2H into fresh host memory)
  pinned        transfer.device_to_host(staging='pinned') of one into a resident numpy array
  cuda_memcpy   transfer.device_to_host(staging='cuda_memcpy') of one into page-locked memory
(the benchmarks' checks used np.asarray up to 2026-11-29, and it slowed the run after it).

Bound: the most bytes unfinished at once (0: back to back); issuing a piece past it first waits
for the piece that many bytes earlier (the runtime's layers-in-flight rule, in bytes: 3 layers
of 64 MiB = 192 MiB). The first and last piece of every configuration are checked against the
source after its last repeat. Writes JSON (one row a configuration, every repeat's seconds).

  python scripts/bench_h2d.py --out=/tmp/h2d.json                      # GPU defaults
  python scripts/bench_h2d.py --sources=numpy,jax_pinned_array --copies=device_put,engine \
      --total_mib=64 --piece_mib=8,16 --out=/tmp/h2d.json               # CPU
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags

SOURCES = ("jax_pinned_array", "jax_pinned", "cuda_registered", "dma_mapped", "numpy")
COPIES = ("device_put", "engine", "cuda_memcpy")
ISSUERS = ("main", "pool")
BEFORE = ("none", "asarray", "pinned", "cuda_memcpy")
SHAPES = ("flat", "kv")
KV_ROW = (2, 4, 128)  # K/V, kv heads, head dim: Qwen2.5-7B's KV of one token

_SOURCES = flags.DEFINE_list("sources", ["jax_pinned_array", "cuda_registered", "dma_mapped"],
                             f"Source memories, of {SOURCES}.")
_COPIES = flags.DEFINE_list("copies", ["device_put", "engine", "cuda_memcpy"],
                            f"Copies, of {COPIES} (cuda_memcpy: page-locked sources on a GPU).")
_TOTAL_MIB = flags.DEFINE_list("total_mib", ["1024", "1792"], "Bytes moved a run, MiB.")
_PIECE_MIB = flags.DEFINE_list("piece_mib", ["16", "32", "64", "128"], "Piece sizes, MiB.")
_BOUND_MIB = flags.DEFINE_list("bound_mib", ["0", "192"],
                               "Most bytes unfinished at once, MiB (0: back to back).")
_DTYPES = flags.DEFINE_list("dtypes", ["uint8"], "Dtypes the pieces are seen as (1-D).")
_SHAPES = flags.DEFINE_list("shapes", ["flat"], f"Piece shapes, of {SHAPES}.")
_ISSUERS = flags.DEFINE_list("issuers", ["main"], f"Issuing threads, of {ISSUERS}.")
_BEFORE = flags.DEFINE_list("before", ["none"], f"D2H before each run, of {BEFORE}.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs a configuration.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs a configuration first.")
_OUT = flags.DEFINE_string("out", None, "Output JSON.", required=True)

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


def _positive_ints(name: str, values, allow_zero: bool = False) -> list[int]:
  out = []
  for v in values:
    try:
      n = int(v)
    except ValueError:
      n = -1
    if n < 0 or (n == 0 and not allow_zero):
      sys.exit(f"error: --{name}: expected {'non-negative' if allow_zero else 'positive'} "
               f"ints, got {v!r}")
    out.append(n)
  if not out:
    sys.exit(f"error: --{name}: expected at least one value")
  return out


def _choices(name: str, values, allowed) -> list[str]:
  bad = [v for v in values if v not in allowed]
  if bad or not values:
    sys.exit(f"error: --{name}: expected some of {list(allowed)}, got {values}")
  return list(values)


def main(argv):
  del argv
  sources = _choices("sources", _SOURCES.value, SOURCES)
  copies = _choices("copies", _COPIES.value, COPIES)
  totals = _positive_ints("total_mib", _TOTAL_MIB.value)
  pieces = _positive_ints("piece_mib", _PIECE_MIB.value)
  bounds = _positive_ints("bound_mib", _BOUND_MIB.value, allow_zero=True)
  issuers = _choices("issuers", _ISSUERS.value, ISSUERS)
  shapes = _choices("shapes", _SHAPES.value, SHAPES)
  befores = _choices("before", _BEFORE.value, BEFORE)
  if _REPEATS.value <= 0 or _WARMUP.value < 0:
    sys.exit("error: --repeats must be positive and --warmup non-negative")
  import concurrent.futures
  import ctypes

  import jax
  import ml_dtypes  # noqa: F401  (bfloat16 and friends as numpy dtypes)
  import numpy as np
  from jax.sharding import SingleDeviceSharding

  from dualpath_jax.engines.topology import single_engine
  from dualpath_jax.transfer import device_to_host, host_to_device, pinned_memory

  dtypes = []
  for name in _DTYPES.value:
    try:
      dtypes.append(np.dtype(name))
    except TypeError:
      sys.exit(f"error: --dtypes: {name!r} is not a numpy dtype")
  if not dtypes:
    sys.exit("error: --dtypes: expected at least one dtype")
  kinds = [(dtype, shape) for dtype in dtypes for shape in shapes]

  def shaped(piece, dtype, shape):
    piece = piece.view(dtype)
    return piece if shape == "flat" else piece.reshape(-1, *KV_ROW)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  device = jax.devices()[0]
  sharding = SingleDeviceSharding(device)
  engine = single_engine(device, role="prefill")
  on_gpu = device.platform == "gpu"
  mib = 1 << 20
  rng = np.random.default_rng(0)
  result = dict(device=str(device), device_kind=device.device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), repeats=_REPEATS.value, warmup=_WARMUP.value,
                gb="1e9 bytes", timing="wall clock from the first issue until every piece is "
                "ready; median of the repeats, interleaved over the configurations of a total",
                command=" ".join(sys.argv), unavailable=[], rows=[])

  def cuda_copier():
    """fn(pieces, outs, bound_pieces): cudaMemcpyAsync of each piece into its device buffer on
    one non-blocking stream, syncing an event `bound_pieces` back before issuing past the
    bound; then a stream sync."""
    lib = pinned_memory.cuda_runtime()
    ordinal = getattr(device, "local_hardware_id", None)
    ordinal = device.id if ordinal is None else ordinal
    if lib.cudaSetDevice(ctypes.c_int(ordinal)) != 0:
      raise RuntimeError("cudaSetDevice failed")
    stream = ctypes.c_void_p()
    if lib.cudaStreamCreateWithFlags(ctypes.byref(stream), ctypes.c_uint(1)) != 0:
      raise RuntimeError("cudaStreamCreateWithFlags failed")

    def run(host_pieces, outs, bound_pieces):
      if lib.cudaSetDevice(ctypes.c_int(ordinal)) != 0:
        raise RuntimeError("cudaSetDevice failed")
      events = []
      for i, (h, out) in enumerate(zip(host_pieces, outs)):
        if bound_pieces and i >= bound_pieces:
          status = lib.cudaEventSynchronize(events[i - bound_pieces])
          if status:
            raise RuntimeError(f"cudaEventSynchronize: CUDA error {status}")
        status = lib.cudaMemcpyAsync(
            ctypes.c_void_p(out.unsafe_buffer_pointer()),
            ctypes.c_void_p(h.__array_interface__["data"][0]), ctypes.c_size_t(h.nbytes),
            ctypes.c_int(_HOST_TO_DEVICE), stream)
        if status:
          raise RuntimeError(f"cudaMemcpyAsync: CUDA error {status}")
        if bound_pieces:
          event = ctypes.c_void_p()
          status = (lib.cudaEventCreateWithFlags(ctypes.byref(event), ctypes.c_uint(2))  # no timing
                    or lib.cudaEventRecord(event, stream))
          if status:
            raise RuntimeError(f"cudaEventCreateWithFlags / cudaEventRecord: CUDA error {status}")
          events.append(event)
      status = lib.cudaStreamSynchronize(stream)
      for event in events:
        lib.cudaEventDestroy(event)
      if status:
        raise RuntimeError(f"cudaStreamSynchronize: CUDA error {status}")
      return outs
    return run

  copier = None
  probe_host = rng.integers(0, 256, 64 * mib, np.uint8)
  probe = jax.device_put(probe_host, sharding)
  fresh_copy = jax.jit(lambda x: x + np.uint8(0))  # a new device array: np.asarray caches
  resident = np.zeros_like(probe_host)
  locked = pinned_memory.allocate(probe_host.nbytes, "cuda_registered") if (
      "cuda_memcpy" in befores and on_gpu) else None

  def d2h_before(kind):
    if kind == "none":
      return
    x = fresh_copy(probe)
    x.block_until_ready()
    if kind == "asarray":
      got = np.asarray(x)
    elif kind == "pinned":
      got = device_to_host(x, resident, staging="pinned")
    elif locked is None:
      raise SystemExit("error: --before=cuda_memcpy needs a CUDA GPU")
    else:
      got = device_to_host(x, locked, staging="cuda_memcpy")
    if not np.array_equal(got, probe_host):
      raise SystemExit(f"error: --before={kind}: the D2H landed wrong bytes")
    x.delete()
  for total_mib in totals:
    total = total_mib * mib
    data = rng.integers(0, 256, total, np.uint8)
    configs = []  # (source, copy, piece_bytes, bound_bytes, fn, check)
    held = []
    targets = {}  # piece MiB -> device buffers the cuda_memcpy copies land in
    for source in sources:
      try:
        if source == "jax_pinned_array":
          by_piece = {}
          for piece_mib in pieces:
            n = total // (piece_mib * mib)
            for dtype, shape in kinds:
              by_piece[piece_mib, dtype, shape] = [
                  jax.device_put(shaped(data[i * piece_mib * mib:(i + 1) * piece_mib * mib],
                                        dtype, shape),
                                 SingleDeviceSharding(device, memory_kind="pinned_host"))
                  for i in range(n)]
              jax.block_until_ready(by_piece[piece_mib, dtype, shape])
          held.append(by_piece)
        else:
          buffer = pinned_memory.allocate(total, source, device)
          buffer[:] = data
          held.append(buffer)
          by_piece = {(p, dtype, shape): [shaped(buffer[i * p * mib:(i + 1) * p * mib], dtype,
                                                 shape) for i in range(total // (p * mib))]
                      for p in pieces for dtype, shape in kinds}
      except Exception as e:  # noqa: BLE001  (a kind this backend does not have)
        result["unavailable"].append(dict(source=source, total_mib=total_mib,
                                          error=f"{type(e).__name__}: {e}"[:300]))
        print(f"bench_h2d: {source} unavailable: {e}", file=sys.stderr)
        continue
      for copy in copies:
        if copy == "cuda_memcpy" and (source in ("jax_pinned_array", "numpy") or not on_gpu):
          continue
        if copy == "engine" and source == "jax_pinned_array":
          continue  # transfer.host_to_device takes host (numpy) arrays
        for (piece_mib, dtype, shape), host_pieces in by_piece.items():
          if not host_pieces:
            continue
          for bound_mib in bounds:
            bound_pieces = -(-bound_mib // piece_mib) if bound_mib else 0
            if copy == "cuda_memcpy":
              if copier is None:
                copier = cuda_copier()
              if piece_mib not in targets:  # shared: the configurations run one at a time
                targets[piece_mib] = [jax.device_put(np.zeros(piece_mib * mib, np.uint8),
                                                     sharding) for _ in host_pieces]
                jax.block_until_ready(targets[piece_mib])
              outs = targets[piece_mib]
              run = (lambda hp=host_pieces, outs=outs, b=bound_pieces: copier(hp, outs, b))
            else:
              def run(hp=host_pieces, b=bound_pieces, copy=copy):
                moved = []
                for h in hp:
                  if b and len(moved) >= b:
                    jax.block_until_ready(moved[-b])
                  moved.append(jax.device_put(h, sharding) if copy == "device_put" else
                               host_to_device(h, engine, copy=False, staging="direct"))
                return moved
            for issuer, before in ((i, b) for i in issuers for b in befores):
              fn = run if issuer == "main" else (lambda run=run: pool.submit(run).result())
              configs.append(dict(source=source, copy=copy, dtype=dtype.name, shape=shape,
                                  issuer=issuer, before=before,
                                  total_bytes=total, piece_bytes=piece_mib * mib,
                                  pieces=len(host_pieces), bound_bytes=bound_mib * mib,
                                  bound_pieces=bound_pieces, fn=fn, first=host_pieces[0],
                                  last=host_pieces[-1], times=[]))
    print(f"bench_h2d: total {total_mib} MiB: {len(configs)} configurations, "
          f"{_WARMUP.value} + {_REPEATS.value} runs each", file=sys.stderr, flush=True)
    for r in range(_WARMUP.value + _REPEATS.value):
      for c in configs:
        d2h_before(c["before"])
        t0 = time.perf_counter()
        out = c["fn"]()
        jax.block_until_ready(out)
        s = time.perf_counter() - t0
        if r >= _WARMUP.value:
          c["times"].append(s)
        if r == _WARMUP.value + _REPEATS.value - 1:
          c["bytes_equal"] = bool(all(
              np.array_equal(np.asarray(out[i]).reshape(-1).view(np.uint8),
                             np.asarray(h).reshape(-1).view(np.uint8))
              for i, h in ((0, c["first"]), (len(out) - 1, c["last"]))))
        if c["copy"] != "cuda_memcpy":
          for x in out:
            x.delete()
        del out
    for c in configs:
      s = statistics.median(c["times"])
      row = {k: v for k, v in c.items() if k not in ("fn", "first", "last")}
      row.update(median_s=s, gbps=total / s / 1e9,
                 best_gbps=total / min(c["times"]) / 1e9)
      result["rows"].append(row)
      print(f"bench_h2d: {total_mib:5d} MiB {row['source']:17s} {row['copy']:11s} piece "
            f"{row['piece_bytes'] // mib:4d} MiB bound {row['bound_bytes'] // mib:4d} MiB "
            f"{row['dtype']} {row['shape']} {row['issuer']} before {row['before']}: "
            f"{row['gbps']:6.2f} GB/s (best {row['best_gbps']:6.2f})"
            + ("" if row["bytes_equal"] else "  WRONG BYTES"), file=sys.stderr, flush=True)
    del held, configs, targets
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  pool.shutdown()
  bad = [r for r in result["rows"] if not r["bytes_equal"]]
  if bad:
    sys.exit(f"error: {len(bad)} configuration(s) moved wrong bytes")


if __name__ == "__main__":
  app.run(main)
