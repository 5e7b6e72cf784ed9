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
