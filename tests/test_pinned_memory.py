"""transfer.pinned_memory: writable host arrays of each kind, and HostBuffer's pool on them."""

import jax
import numpy as np
import pytest

from dualpath_jax.runtime.host_buffer import HostBuffer
from dualpath_jax.transfer import pinned_memory


@pytest.mark.parametrize("kind", ["numpy", "jax_pinned"])
def test_allocate_gives_writable_host_bytes_that_reach_the_device(kind):
  a = pinned_memory.allocate(3 * 4096 + 5, kind)
  assert a.dtype == np.uint8 and a.shape == (3 * 4096 + 5,) and a.flags.writeable
  a[:] = np.arange(a.size) % 251
  x = jax.device_put(a.view(np.uint8).reshape(-1), jax.devices()[0])
  np.testing.assert_array_equal(np.asarray(x), np.arange(a.size) % 251)


def test_jax_pinned_blocks_are_distinct_and_outlive_their_owner_reference():
  blocks = [pinned_memory.allocate(1 << 16, "jax_pinned") for _ in range(3)]
  for i, b in enumerate(blocks):
    b[:] = i
  assert [int(b[-1]) for b in blocks] == [0, 1, 2]
  view = blocks[1][100:200].view(np.uint16)  # a view keeps the pinned array alive
  del blocks
  assert int(view[0]) == 257


def test_bad_kind_and_size_name_the_field():
  with pytest.raises(ValueError, match="host_memory"):
    pinned_memory.allocate(4096, "hugepages")
  with pytest.raises(ValueError, match="nbytes"):
    pinned_memory.allocate(0, "numpy")


def test_host_buffer_takes_its_pool_blocks_from_the_allocator():
  sizes = []

  def allocate(nbytes):
    sizes.append(nbytes)
    return pinned_memory.allocate(nbytes, "jax_pinned")

  buffer = HostBuffer(host_buffer_bytes=1 << 20, full_block_bytes=4096, allocate=allocate)
  with buffer.reserve(8192) as r:
    a = r.empty((2, 1024), np.float32)
    a[:] = 1.5
  with buffer.reserve(8192) as r:
    b = r.empty((2, 1024), np.float32)  # the same size class: the block is reused
  assert sizes == [8192] and buffer.pool_hits == 1 and b.base is not None


def test_page_locked_registry_covers_views_and_forgets_freed_memory():
  a = pinned_memory.allocate(1 << 16, "jax_pinned")
  assert pinned_memory.is_page_locked(a) and pinned_memory.is_page_locked(a[4096:8192])
  assert not pinned_memory.is_page_locked(np.empty(1 << 16, np.uint8))
  assert not pinned_memory.is_page_locked(pinned_memory.allocate(4096, "numpy"))
  start = a.ctypes.data
  view = a[4096:]
  import gc
  del a
  gc.collect()
  assert pinned_memory.is_page_locked(view)  # a view keeps the memory, and its registration
  del view
  gc.collect()
  assert start not in pinned_memory._locked


def test_arena_first_fit_merges_freed_neighbours():
  from dualpath_jax.runtime.host_buffer import Arena
  arena = Arena(np.zeros(10 * 4096, np.uint8))
  a, b, c = (arena.take(n) for n in (4096, 3 * 4096 - 7, 2 * 4096))
  assert [x.nbytes for x in (a, b, c)] == [4096, 3 * 4096, 2 * 4096]
  assert arena.take(5 * 4096) is None  # 4 pages left
  assert not arena.give(np.zeros(4096, np.uint8))  # not the arena's
  assert not arena.give(b[:4096])  # not a block take() returned
  assert arena.give(a) and arena.give(c)
  assert arena.take(7 * 4096) is None  # free runs of 1 and 6 pages, split by b
  d = arena.take(6 * 4096)  # c merged with the free tail
  assert d.ctypes.data == arena.memory.ctypes.data + 4 * 4096
  assert arena.give(d) and arena.give(b) and arena.free_bytes == 10 * 4096
  whole = arena.take(10 * 4096)  # everything merged into one run again
  assert whole is not None and whole.ctypes.data == arena.memory.ctypes.data


def test_host_buffer_arena_serves_blocks_and_falls_back_when_fragmented():
  calls = []

  def allocate(nbytes):
    calls.append(nbytes)
    return pinned_memory.allocate(nbytes, "jax_pinned")

  with pytest.raises(ValueError, match="arena_memory"):
    HostBuffer(host_buffer_bytes=8 * 4096, full_block_bytes=4096,
               arena_memory=np.empty(4096, np.uint8))
  buffer = HostBuffer(host_buffer_bytes=8 * 4096, full_block_bytes=4096, allocate=allocate,
                      arena_memory=pinned_memory.lease(8 * 4096, "jax_pinned"))
  assert calls == []
  r1, r2 = buffer.reserve(4 * 4096), buffer.reserve(4096)
  x = r1.empty((3, 4096), np.uint8)
  y = r2.empty((4096,), np.uint8)
  x[:] = 1
  y[:] = 2
  assert pinned_memory.is_page_locked(x) and int(x.sum()) == 3 * 4096 and int(y[0]) == 2
  r1.release()
  with buffer.reserve(6 * 4096) as r3:  # 7 pages free, split 3 + 4 around y: no run of 5
    z = r3.empty((5, 4096), np.uint8)
    assert buffer.arena_misses == 1 and calls == [5 * 4096]
    z[:] = 3
  r2.release()
  stats = buffer.stats()
  assert stats["arena"] and stats["peak_bytes"] == 7 * 4096 and stats["arena_misses"] == 1
  with buffer.reserve(8 * 4096) as r4:  # all freed: the arena is one run again
    r4.empty((8, 4096), np.uint8)
  assert buffer.arena_misses == 1


def test_median_seconds_setup_runs_outside_the_clock_before_each_call():
  from dualpath_jax.bench.timing import median_seconds
  made = []

  def setup():
    made.append(len(made))
    return made[-1]

  seen = []
  median_seconds(lambda arg: seen.append(arg), repeats=2, warmup=1, setup=setup)
  assert seen == [0, 1, 2]


def test_lease_reuses_what_was_given_back():
  a = pinned_memory.lease(3 * 4096, "jax_pinned")
  pinned_memory.give_back(a, "jax_pinned")
  assert pinned_memory.lease(3 * 4096, "jax_pinned") is a
  assert pinned_memory.lease(3 * 4096, "jax_pinned") is not a  # taken: a new one


def _memcpy2d(src: np.ndarray, base: np.ndarray, out: np.ndarray, geometry,
              src_offset: int = 0) -> None:
  """What cudaMemcpy2D does with `geometry`, on host bytes."""
  height, width, src_pitch, dst_pitch = geometry
  src_bytes = src.reshape(-1).view(np.uint8)
  dst_bytes = base.reshape(-1).view(np.uint8)
  offset = out.__array_interface__["data"][0] - base.__array_interface__["data"][0]
  for h in range(height):
    dst_bytes[offset + h * dst_pitch:offset + h * dst_pitch + width] = \
        src_bytes[src_offset + h * src_pitch:src_offset + h * src_pitch + width]


@pytest.mark.parametrize("batch_axis,layers", [(0, slice(1, 2)), (1, slice(None))])
def test_row_geometry_lands_one_batch_rows_head_like_numpy(batch_axis, layers):
  """A row of a batch array ([B, T, ...] one layer, or [L, B, T, ...]) copied straight out of
  it lands like numpy's x[row][:count] (the PE's handoff without a row cut on the device)."""
  rng = np.random.default_rng(1)
  base = rng.integers(0, 9, (3, 10, 2, 4), np.int16)  # a prompt's [L, T, 2, H] in a buffer
  out = base[layers, 2:7]  # 5 tokens land at rows 2..6
  shape = (4, 8, 2, 4) if batch_axis == 0 else (out.shape[0], 4, 8, 2, 4)  # batch of 4, T = 8
  x = rng.integers(0, 9, shape, np.int16)
  want = base.copy()
  want[layers, 2:7] = (x[2][None] if batch_axis == 0 else x[:, 2])[:, :5]
  offset, *geometry = pinned_memory.row_geometry(x.shape, x.dtype, 2, batch_axis, out)
  _memcpy2d(x, base, out, geometry, offset)
  np.testing.assert_array_equal(base, want)
  with pytest.raises(ValueError, match="row: 4"):
    pinned_memory.row_geometry(x.shape, x.dtype, 4, batch_axis, out)


@pytest.mark.parametrize("layers,axis", [(slice(1, 2), 1), (slice(None), 1), (slice(0, 2), None)])
def test_memcpy2d_geometry_lands_the_head_rows_like_numpy(layers, axis):
  rng = np.random.default_rng(0)
  base = rng.integers(0, 9, (3, 10, 2, 4), np.int16)  # a prompt's [L, T, 2, H] in a buffer
  want = base.copy()
  if axis is None:
    out = base[layers]
    x = rng.integers(0, 9, out.shape, np.int16)
    want[layers] = x
  else:
    out = base[layers, 2:7]  # 5 tokens land at rows 2..6
    x = rng.integers(0, 9, (out.shape[0], 8, 2, 4), np.int16)  # padded to 8 on the device
    want[layers, 2:7] = x[:, :5]
  _memcpy2d(x, base, out, pinned_memory.memcpy2d_geometry(x.shape, x.dtype, out, axis))
  np.testing.assert_array_equal(base, want)


def test_cuda_memcpy_needs_a_gpu_and_a_fitting_out():
  x = jax.device_put(np.zeros((2, 3), np.float32), jax.devices()[0])
  with pytest.raises(ValueError, match="cuda_memcpy"):
    pinned_memory.cuda_copy_to_host(x, np.empty((2, 3), np.float32))
  with pytest.raises(ValueError, match="out"):
    pinned_memory.memcpy2d_geometry((2, 3), np.float32, np.empty((2, 4), np.float32), 1)
  with pytest.raises(ValueError, match="C-contiguous"):
    pinned_memory.memcpy2d_geometry((2, 3), np.float32, np.empty((2, 6), np.float32)[:, ::2], 1)
  with pytest.raises(ValueError, match="C-contiguous"):  # shorter along axis 1, last axis strided
    pinned_memory.memcpy2d_geometry((2, 3), np.float32, np.empty((2, 4), np.float32)[:, :4:2], 1)


def test_host_memory_bench_flags_wrong_bytes(monkeypatch):
  """The host_memory section checks what landed: a copy that lands other bytes is reported."""
  from dualpath_jax.bench import host_memory
  real = host_memory._issue

  def corrupting(sources, device, bound):
    moved = real(sources, device, bound)
    return [m + 1 if i == 0 else m for i, m in enumerate(moved)]  # layer 0 lands wrong

  monkeypatch.setattr(host_memory, "_issue", corrupting)
  result = host_memory.measure_host_memory(jax.devices()[0], layer_bytes=4096, num_layers=3,
                                           bounds=(None, 1), sources=("numpy",), repeats=1,
                                           warmup=0, log=lambda _: None)
  assert [r["bytes_equal"] for r in result["h2d"]] == [False, False]
  with pytest.raises(ValueError, match="host_memory.sources"):
    host_memory.measure_host_memory(jax.devices()[0], layer_bytes=4096, num_layers=1,
                                    sources=("hugepages",), repeats=1, warmup=0)


def test_dma_mapped_names_the_kind_where_the_client_cannot_map():
  """'dma_mapped' asks the PJRT client to map the memory; the CPU client cannot, and says so."""
  if jax.devices()[0].platform != "cpu":
    pytest.skip("the CPU client's answer")
  assert "dma_mapped" in pinned_memory.HOST_MEMORY_KINDS
  with pytest.raises(RuntimeError, match="host_memory 'dma_mapped'.*cpu client"):
    pinned_memory.allocate(4096, "dma_mapped")
