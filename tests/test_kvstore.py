"""KV store invariants: chained hashes address prefixes; blocks come back exactly or not at all."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax.kvstore import KVBlockStore, KVLayout, StoreSpec, chain_block_hashes

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=64)
NS = "tenant-a"


def make_blocks(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, *LAYOUT.full_block_shape), np.uint8)


def make_hashes(n: int, seed: int = 0) -> list[str]:
  tokens = np.random.default_rng(seed).integers(0, 1000, n * LAYOUT.block_tokens)
  return chain_block_hashes(tokens, LAYOUT.block_tokens)


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
  spec = StoreSpec(driver="memory") if request.param == "memory" else StoreSpec(path=str(tmp_path))
  with KVBlockStore.open(spec, LAYOUT) as opened:
    yield opened


def chunk_file(folder, store: KVBlockStore, namespace: str, digest: str) -> str:
  """The file holding a block's bytes: c.<slot>.0.0.0 of its segment (written by this store)."""
  index = ts.KvStore.open(store.spec.kvstore_spec()).result()
  entry = json.loads(index.read(f"ns/{namespace}/index/{digest}").result().value)
  (path,) = glob.glob(os.path.join(folder, "ns", namespace, "segments", entry["segment"],
                                   f"c.{entry['slot']}.0.0.0"))
  return path


# --- hashing ---------------------------------------------------------------------------------------

token_lists = st.lists(st.integers(0, 7), max_size=24)  # a small alphabet, so prefixes often match


@settings(max_examples=200, deadline=None)
@given(token_lists, token_lists)
def test_equal_hashes_iff_equal_prefixes(a, b):
  ha, hb = chain_block_hashes(a, 4), chain_block_hashes(b, 4)
  assert len(ha) == len(a) // 4 and len(hb) == len(b) // 4
  for i in range(min(len(ha), len(hb))):
    assert (ha[i] == hb[i]) == (a[:4 * (i + 1)] == b[:4 * (i + 1)])


@settings(max_examples=100, deadline=None)
@given(token_lists, token_lists)
def test_partial_tail_ignored_and_chains_extend(a, b):
  whole = chain_block_hashes(a + b, 4)
  assert chain_block_hashes(a + b + [1, 2, 3], 4)[:len(whole)] == whole
  head = (len(a) // 4) * 4
  first = chain_block_hashes(a[:head], 4)
  parent = first[-1] if first else None
  assert first + chain_block_hashes((a + b)[head:], 4, parent=parent) == whole
  assert chain_block_hashes(np.asarray(a + b, np.int64), 4) == whole


def test_hash_errors():
  with pytest.raises(ValueError, match="block_tokens"):
    chain_block_hashes([1, 2], 0)
  with pytest.raises(ValueError, match="parent"):
    chain_block_hashes([1, 2], 2, parent="zz")
  with pytest.raises(ValueError, match="int32"):
    chain_block_hashes([2**40, 1], 2)


# --- spec ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, field", [
    ({"driver": "fle", "path": "x"}, "store.driver: unknown driver 'fle'; choose file, memory or"),
    ({"driver": "file"}, "store.path"),
    ({"driver": "file", "path": "x", "read_concurency": 4}, "store.read_concurency: unknown key"),
    ({"driver": "kvstore"}, "store.kvstore"),
    ({"driver": "memory", "io_concurrency": 0}, "store.io_concurrency"),
])
def test_bad_specs_name_the_field(config, field):
  with pytest.raises(ValueError, match=field.replace("(", r"\(")):
    StoreSpec.from_dict(config)


def test_spec_from_config_dict(tmp_path):
  config = ml_collections.ConfigDict({"driver": "kvstore", "path": "kv",
                                      "kvstore": {"driver": "file", "path": str(tmp_path)}})
  spec = StoreSpec.from_dict(config)
  assert spec.kvstore_spec() == {"driver": "file", "path": f"{tmp_path}/kv/"}
  with KVBlockStore.open(spec, LAYOUT) as store:
    store.write_blocks(NS, make_hashes(1), make_blocks(1))
  assert os.path.exists(tmp_path / "kv" / "dualpath_kvstore.json")


# --- block store -----------------------------------------------------------------------------------

def test_round_trip_and_longest_prefix(store):
  hashes, blocks = make_hashes(5), make_blocks(5)
  blocks[2] = 0  # an all-zero block is still stored (not elided as the fill value)
  assert store.longest_prefix(NS, hashes) == 0
  assert store.write_blocks(NS, hashes[:3], blocks[:3]) == 3
  assert store.longest_prefix(NS, hashes) == 3
  assert store.write_blocks(NS, hashes, blocks) == 2  # idempotent: the first 3 are skipped
  assert store.write_blocks(NS, hashes[:1], make_blocks(1, seed=9)) == 0  # no overwrite
  got = store.read_blocks_async(NS, hashes + ["0" * 32]).result()
  for block, expected in zip(got, blocks):
    assert block.shape == LAYOUT.full_block_shape and block.dtype == np.uint8
    np.testing.assert_array_equal(block, expected)
  assert got[-1] is None
  assert store.longest_prefix(NS, hashes[:2] + ["0" * 32] + hashes[3:]) == 2
  assert store.read_blocks("other-tenant", hashes[:1]) == [None]  # namespaces are disjoint
  stats = store.stats
  assert (stats.blocks_written, stats.blocks_read, stats.misses, stats.corrupt) == (5, 5, 2, 0)
  assert stats.bytes_read == stats.bytes_written == 5 * LAYOUT.full_block_bytes


def test_memory_store_shared_through_context():
  context = ts.Context()
  hashes, blocks = make_hashes(2), make_blocks(2)
  with KVBlockStore.open(StoreSpec(driver="memory"), LAYOUT, context=context) as writer:
    writer.write_blocks(NS, hashes, blocks)
  with KVBlockStore.open(StoreSpec(driver="memory", io_concurrency=2), LAYOUT,
                         context=context) as reader:
    np.testing.assert_array_equal(np.stack(reader.read_blocks(NS, hashes)), blocks)


def test_bad_arguments_name_the_argument(store):
  hashes = make_hashes(2)
  for namespace in ("", "a/b", ".."):
    with pytest.raises(ValueError, match="namespace"):
      store.read_blocks(namespace, hashes)
  with pytest.raises(ValueError, match=r"hashes\[1\]"):
    store.longest_prefix(NS, [hashes[0], "x/y"])
  with pytest.raises(ValueError, match="blocks: expected uint8 Full Blocks"):
    store.write_blocks(NS, hashes, make_blocks(2).view(np.int8))
  with pytest.raises(ValueError, match="blocks: expected uint8 Full Blocks"):
    store.write_blocks(NS, hashes, make_blocks(2)[:, :1])
  with pytest.raises(ValueError, match="hashes: got 1 hashes for 2 blocks"):
    store.write_blocks(NS, hashes[:1], make_blocks(2))
  assert store.stats.blocks_written == 0


def test_layout_mismatch_on_reopen(tmp_path):
  KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT).close()
  other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=64)
  with pytest.raises(ValueError, match="layout.dtype: .* created with dtype='float32'"):
    KVBlockStore.open(StoreSpec(path=str(tmp_path)), other)
  with pytest.raises(ValueError, match="no KV store"):
    KVBlockStore.open(StoreSpec(path=str(tmp_path / "absent")), LAYOUT, create=False)


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_kvstore import LAYOUT, NS, make_blocks, make_hashes
    from dualpath_jax.kvstore import KVBlockStore, StoreSpec
    mode, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with KVBlockStore.open(StoreSpec(path={folder!r}), LAYOUT) as store:
      hashes, blocks = make_hashes(n, seed), make_blocks(n, seed)
      if mode == "write":
        for i in range(n):  # one block per write: many small commits interleave with the other writer
          assert store.write_blocks(NS, hashes[i:i + 1], blocks[i:i + 1]) == 1
      else:
        got = store.read_blocks(NS, hashes)
        assert all(g is not None and np.array_equal(g, b) for g, b in zip(got, blocks))
""")


def run_children(folder, *argvs):
  code = _CHILD.format(tests=os.path.dirname(__file__), folder=str(folder))
  children = [subprocess.Popen([sys.executable, "-c", code, *map(str, argv)],
                               stderr=subprocess.PIPE, text=True) for argv in argvs]
  for child in children:
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err


def test_reopen_from_a_fresh_process(tmp_path):
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    store.write_blocks(NS, make_hashes(3, seed=5), make_blocks(3, seed=5))
  run_children(tmp_path, ("read", 3, 5))


def test_two_processes_write_disjoint_blocks_concurrently(tmp_path):
  run_children(tmp_path, ("write", 20, 1), ("write", 20, 2))
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    for seed in (1, 2):
      got = store.read_blocks(NS, make_hashes(20, seed))
      np.testing.assert_array_equal(np.stack(got), make_blocks(20, seed))
  assert len(glob.glob(str(tmp_path / "ns" / NS / "segments" / "*"))) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_block_is_a_corrupt_miss_and_is_rewritten(tmp_path, damage):
  hashes, blocks = make_hashes(3), make_blocks(3)
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    store.write_blocks(NS, hashes, blocks)
    path = chunk_file(tmp_path, store, NS, hashes[1])
  data = bytearray(open(path, "rb").read())
  if damage == "flip":
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(data)
  elif damage == "truncate":
    open(path, "wb").write(data[:-100])
  else:
    os.remove(path)
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    got = store.read_blocks(NS, hashes)
    assert got[1] is None
    np.testing.assert_array_equal(got[0], blocks[0])
    np.testing.assert_array_equal(got[2], blocks[2])
    assert (store.stats.misses, store.stats.corrupt) == (1, 1)
    # The caller recomputes the block and writes it again: found corrupt, it is not skipped.
    assert store.longest_prefix(NS, hashes) == 1
    assert store.write_blocks(NS, hashes, blocks) == 1
    np.testing.assert_array_equal(store.read_blocks(NS, hashes[1:2])[0], blocks[1])


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_read_into_lands_each_block_in_a_strided_view_and_reports_a_damaged_one(tmp_path, damage):
  """read_blocks_into writes every block straight into its view of a layer-major buffer (block
  i at rows [i*B, (i+1)*B) of every layer), as read_blocks + a copy would; a damaged block is
  False and counted corrupt, like read_blocks' None."""
  hashes, blocks = make_hashes(3), make_blocks(3)
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    store.write_blocks(NS, hashes, blocks)
    path = chunk_file(tmp_path, store, NS, hashes[1])
  bt = LAYOUT.block_tokens
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    raw = np.zeros((LAYOUT.num_layers, 4 * bt, LAYOUT.token_layer_bytes), np.uint8)  # 1 spare
    views = [raw[:, i * bt:(i + 1) * bt] for i in range(3)]
    assert store.read_blocks_into(NS, hashes, views) == [True, True, True]
    for i in range(3):
      np.testing.assert_array_equal(views[i], blocks[i])
    assert not raw[:, 3 * bt:].any()  # nothing written past the blocks
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
      data[len(data) // 2] ^= 0xFF
      open(path, "wb").write(data)
    else:
      os.remove(path)
  with KVBlockStore.open(StoreSpec(path=str(tmp_path)), LAYOUT) as store:
    raw[:] = 0
    assert store.read_blocks_into(NS, hashes, views) == [True, False, True]
    np.testing.assert_array_equal(views[2], blocks[2])
    assert (store.stats.blocks_read, store.stats.misses, store.stats.corrupt) == (2, 1, 1)
    with pytest.raises(ValueError, match=r"outs\[0\]: expected uint8"):
      store.read_blocks_into(NS, hashes[:1], [raw[:, :bt - 1]])
    with pytest.raises(ValueError, match="outs: 1 destinations for 2 hashes"):
      store.read_blocks_into(NS, hashes[:2], views[:1])


def test_index_pointing_to_nothing_is_a_corrupt_miss(store):
  hashes = make_hashes(2)
  store.write_blocks(NS, hashes[:1], make_blocks(1))
  index = store._root  # the store's own kvstore, so that a memory store is the same one
  record = f'{{"segment": "nope", "slot": 3, "nbytes": {LAYOUT.full_block_bytes}}}'
  index.write(f"ns/{NS}/index/{hashes[1]}", record.encode()).result()
  index.write(f"ns/{NS}/index/{hashes[0]}x", b"not json").result()
  got = store.read_blocks(NS, [hashes[1], hashes[0] + "x", hashes[0]])
  assert got[:2] == [None, None] and got[2] is not None
  assert (store.stats.misses, store.stats.corrupt) == (2, 2)
