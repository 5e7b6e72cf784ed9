"""The runtime: engines that run agent turns against the KV store.

  colocated.py       one device does a whole turn: the ground truth (and, without the store, the
                     no-cache full-recompute reference)
  config.py          RuntimeConfig: mode (basic | dualpath | oracle), topology, links, buffers
  cluster.py         the disaggregated runtime on one host: meshes, per-node storage links and host
                     buffers, per-engine traffic managers, placement of each turn
  prefill_worker.py  a PE: layerwise (or whole) prefill with the prefix KV from either side
  decode_worker.py   a DE: prompt KV into the paged pool, batched decode, block persistence
  storage_link.py    a node's store <-> host path: read queue, optional bandwidth cap (emulated NIC)
  host_buffer.py     a node's bounded host buffer
  traffic.py         a per-engine traffic manager: every KV move, model work first, byte counters
  offline.py         the offline job: all agents at t=0, JCT; the no-cache reference
  offline_job.py     config -> typed records -> runs -> config.json, summary.json, turns.jsonl
"""
