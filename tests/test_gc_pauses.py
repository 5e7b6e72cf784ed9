"""runtime/gc_pauses: collections over a window are counted per generation; freeze is undone."""

import gc

from dualpath_jax.runtime.gc_pauses import GcPauses


def test_collections_are_counted_and_a_freeze_is_undone():
  keep = [[i] for i in range(1000)]  # objects alive at start: frozen with freeze=True
  before = gc.get_freeze_count()
  pauses = GcPauses(freeze=True).start()
  assert gc.get_freeze_count() >= len(keep)
  gc.collect(0)
  gc.collect(2)
  stats = pauses.stop()
  assert gc.get_freeze_count() == before  # unfrozen again
  assert stats["freeze"] and stats["frozen_objects"] >= len(keep)
  gens = stats["by_generation"]
  assert gens["0"]["count"] >= 1 and gens["2"]["count"] >= 1
  assert stats["seconds"] == sum(g["seconds"] for g in gens.values()) > 0
  assert all(g["max_s"] <= g["seconds"] for g in gens.values())
  gc.collect()  # after stop(): no longer counted
  assert pauses.stop()["by_generation"] == gens
