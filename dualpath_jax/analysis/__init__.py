"""Analysis of experiment outputs: loaders, tables and matplotlib figures (Agg, no pyplot state).

  offline_plots.py  an offline job's workdir (config.json, summary.json, turns.jsonl, links.json,
                    ablation.json): JCT per mode with the speedup over basic, the TTFT breakdown,
                    storage-link utilisation over time, per-turn timelines, the ablation's rows
                    and bar chart against the paper's, plain-text tables (no pandas)
  online_plots.py   an online job's summary.json (experiments/online.py): latency against the
                    arrival rate, the TTFT breakdown per point, the sweep table

Nothing here imports jax: notebooks and experiment scripts load finished runs from disk.
"""
