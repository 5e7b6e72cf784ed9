"""The runtime: engines that run agent turns against the KV store.

  colocated.py       one device does a whole turn: the ground truth (and, without the store, the
                     no-cache full-recompute reference)
  config.py          RuntimeConfig: mode (basic | dualpath | oracle) and technique switches,
                     topology, links, buffers, batch selection
  cluster.py         the disaggregated runtime on one host: meshes, per-node storage links and host
                     buffers, per-engine traffic managers, PE groups, DE workers, the scheduler
  global_scheduler.py  runs the scheduling policies (scheduler/) on measured state: PE, DE, read
                     side of each turn; host-buffer room; queues the reads
  prefill_group.py   a PE group: one batch per data-parallel shard (compute quota or token
                     budget, chunked prefill), lock-step forwards, per-shard forward times
  prefill_shard.py   one PE: a batched layerwise (or whole) forward, prefix KV from either side
  cost_profile.py    profiles PE forwards on this device kind; the batch selector's cost model
  metrics.py         storage-link balance and attention balance of a run
  decode_worker.py   a DE: prompt KV into the paged pool, batched decode, block persistence
  storage_link.py    a node's store <-> host path: read queue, optional bandwidth cap (emulated NIC)
  host_buffer.py     a node's bounded host buffer
  traffic.py         a per-engine traffic manager: every KV move, model work first, byte counters
  offline.py         the offline job: all agents at t=0, JCT; the no-cache reference
  offline_job.py     config -> typed records -> runs -> config.json, summary.json, turns.jsonl,
                     links.json
  online.py          online serving: Poisson (or trace) agent arrivals, think times, TTFT, TTST,
                     TPOT and the TTFT breakdown per turn, the paper's stopping rule
  online_job.py      an APS sweep per mode: the largest SLO-compliant APS
"""
