#!/usr/bin/env bash
# One device-tool call of the GPU benchmark (issue: DualPath on a real multi-GPU host): each part
# a separate process with its own time limit, so that a part cut short still leaves its JSON
# (gpu_bench.json is rewritten after every measurement) and the next part runs.
# Each end-to-end job moves KV as configs/gpu_bench.py:e2e_h100x4 says (since record 6:
# page-locked node buffers, H2D 'direct', D2H 'cuda_memcpy'; up to record 6 the staging was
# picked from micro's data-plane components, whose D2H rows were wrong: jax caches a host copy).
#
#   OUT=/path bash scripts/gpu_bench_call.sh micro e2e:1P3D:6.25e9 e2e:2P2D:0
#
# Parts: 'micro' = ceilings, data plane and engine (configs/gpu_bench.py:h100x4, ~2-3 min);
# 'hostcopy' = scripts/bench_host_copy.py at 1-16 copy threads (< 1 min);
# 'store' = the KV store's landing read rate, memory driver, 1-8 reads in flight
# (scripts/bench_store.py --landing; STORE_INFLIGHT, default '1 2 4 8'; ~1-2 min);
# 'decode_cmdbuf' = decode at batch 32 under XLA command buffers over custom calls (~1 min);
# 'interference' = the DE's step time under its own KV traffic (bench/decode_interference.py;
# one GPU, ~5 min at the defaults: INTERFERENCE_LIMIT_S, default 420);
# 'e2e:<topology>:<link cap bytes/s, 0 = uncapped>' = one end-to-end job of
# configs/gpu_bench.py:e2e_h100x4 ('e2e:<topology>:<cap>:<s>' also sets the traffic manager's
# priority gate, runtime.kv_max_wait_s = s; the preset has it off; 'e2e:<topology>:<cap>:<s>:<kind>'
# also sets runtime.host_memory = kind, e.g. 'e2e:2P2D:6.25e9::numpy': pageable buffers with H2D
# staged through pinned memory and D2H 'pinned', record 6's baseline; a sixth field sets
# runtime.d2h_staging, e.g. 'e2e:1P1D:6.25e9::numpy:direct' for record 5's). Seconds per part:
# PART_LIMIT_S (default 280; micro 200).
# PREFILL_VARIANTS: micro's engine.prefill_variants (a flag given twice would append, not replace).
# MICRO_FLAGS / E2E_FLAGS: further flags of the micro / end-to-end runs, e.g.
# MICRO_FLAGS="--config.sections=('engine',)" E2E_FLAGS="--config.end_to_end.agents=8".
# Decode in the end-to-end jobs uses the Pallas paged-attention kernel unless micro's decode rows
# show that it failed on this card; the fallback ('gather') is logged and in the job's config.
# On the GPU image, ml_collections comes from wheels in .whl/ (no network there).
# The device tool brings back at most 8 files: everything a part writes goes under $RUN, and
# $OUT/gpu_bench_results.tar.gz (rewritten after every part) carries it all back.
set -u
OUT=${OUT:?set OUT to the output folder}
RUN=${RUN:-/tmp/gpu_bench_run}
mkdir -p "$RUN" "$OUT"
bundle() { tar czf "$OUT/gpu_bench_results.tar.gz" -C "$RUN" . ; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RUN/gpus.txt" 2>&1
paged=pallas
for part in "$@"; do
  case "$part" in
    micro)
      timeout "${MICRO_LIMIT_S:-200}" python3 experiments/gpu_bench.py \
          --config=configs/gpu_bench.py:h100x4 \
          --config.engine.prefill_variants="${PREFILL_VARIANTS:-('layerwise','layerwise_sdpa','layerwise_split')}" \
          ${MICRO_FLAGS:-} --out="$RUN/micro" > "$RUN/micro.log" 2>&1
      echo "micro: exit $?"
      paged="$(python3 - "$RUN/micro/gpu_bench.json" <<'EOF'
import json, sys
try:
  result = json.load(open(sys.argv[1]))
except Exception:  # no result: the default
  result = {}
rows = (result.get("engine") or {}).get("decode") or []
pallas = [r for r in rows if r.get("paged_attention") == "pallas"]
print("gather" if pallas and all("error" in r for r in pallas) else "pallas")
EOF
)"
      echo "end-to-end: decode attention $paged"
      ;;
    decode_cmdbuf)
      # Decode at batch 32 (Pallas, the default blocking) and its fixed-cost row once more, with
      # XLA's command buffers (CUDA graphs) also over custom calls (the Pallas kernel) and for
      # graphs of any size: is the fixed cost above the weights' roofline kernel launches?
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" \
      timeout "${DECODE_LIMIT_S:-150}" python3 experiments/gpu_bench.py \
          --config=configs/gpu_bench.py:h100x4 --config.sections="('engine',)" \
          --config.engine.prefill_contexts="()" --config.engine.peak_context=0 \
          --config.engine.decode_attentions="('pallas',)" --config.engine.decode_batches="(32,)" \
          --config.engine.pallas_blockings="()" \
          --out="$RUN/decode_cmdbuf" > "$RUN/decode_cmdbuf.log" 2>&1
      echo "decode_cmdbuf: exit $?"
      ;;
    store)
      # The KV store's read rate on this host: scripts/bench_store.py --landing, memory driver
      # (as the end-to-end jobs use), 0.5 GB reads (136 Full Blocks) with 1-8 reads in flight
      for n in ${STORE_INFLIGHT:-1 2 4 8}; do
        timeout 100 python3 scripts/bench_store.py --landing --driver=memory --total_gb=4 \
            --batch_blocks=136 --inflight="$n" --passes=3 \
            --out="$RUN/store_landing_memory_inflight$n.json" >> "$RUN/store.log" 2>&1
        echo "store inflight $n: exit $?"
      done
      grep -h "landing" "$RUN/store.log"
      ;;
    interference)
      # The DE's step time while its own KV traffic (H2D, D2H, both; gate off and on) or its
      # own admissions run on its device: bench/decode_interference.py, one GPU (~2.5 min a
      # shape at the defaults; 240 s cut the second shape). INTERFERENCE_FLAGS: more flags,
      # e.g. --config.decode_interference.shapes="((32,8192),)".
      timeout "${INTERFERENCE_LIMIT_S:-420}" python3 experiments/gpu_bench.py \
          --config=configs/gpu_bench.py:h100x4 --config.sections="('decode_interference',)" \
          ${INTERFERENCE_FLAGS:-} --out="$RUN/interference" > "$RUN/interference.log" 2>&1
      echo "interference: exit $?"
      grep -h "^| decode_interference " "$RUN/interference/gpu_bench.md" 2>/dev/null | cut -c1-200
      ;;
    hostcopy)
      timeout 120 python3 scripts/bench_host_copy.py --threads=1,2,4,8,16 \
          --out="$RUN/host_copy.json" > "$RUN/host_copy.log" 2>&1
      echo "hostcopy: exit $?"
      ;;
    e2e:*)
      IFS=: read -r _ topology cap gate memory part_d2h <<< "$part"
      name="e2e_${topology}_cap${cap}"
      part_flags=()
      if [ -n "${gate:-}" ]; then  # e2e:<topology>:<cap>:<s>: the priority gate's cap, seconds
        name="${name}_gate${gate}"
        part_flags=(--config.end_to_end.runtime.kv_max_wait_s="$gate")
      fi
      if [ -n "${memory:-}" ]; then  # e2e:<topology>:<cap>:<s>:<kind>: the node buffers' memory
        name="${name}_${memory}"
        part_flags+=(--config.end_to_end.runtime.host_memory="$memory")
        if [ "$memory" = numpy ]; then  # pageable: staged through pinned memory, as before;
          # D2H 'pinned' unless the sixth field says (cuda_memcpy into pageable memory is no
          # baseline the records measured)
          part_flags+=(--config.end_to_end.runtime.h2d_staging=auto
                       --config.end_to_end.runtime.d2h_staging=pinned)
        fi
      fi
      if [ -n "${part_d2h:-}" ]; then  # ...:<kind>:<d2h staging>
        name="${name}_d2h${part_d2h}"
        part_flags+=(--config.end_to_end.runtime.d2h_staging="$part_d2h")
      fi
      timeout "${PART_LIMIT_S:-280}" python3 experiments/gpu_bench.py \
          --config=configs/gpu_bench.py:e2e_h100x4 "${part_flags[@]}" \
          --config.end_to_end.topologies="('$topology',)" \
          --config.end_to_end.link_caps="($cap,)" \
          --config.end_to_end.model.paged_attention="$paged" \
          ${E2E_FLAGS:-} --out="$RUN/$name" > "$RUN/$name.log" 2>&1
      echo "$name: exit $?"
      # a device trace (end_to_end.device_trace) comes back as perfetto JSON only
      find "$RUN/$name" \( -name '*.xplane.pb' -o -name '*.trace.json.gz' \) -delete 2>/dev/null
      grep -h "^| end_to_end " "$RUN/$name/gpu_bench.md" 2>/dev/null | cut -c1-200
      ;;
    *)
      echo "unknown part: $part" >&2
      exit 2
      ;;
  esac
  bundle
done
