#!/usr/bin/env bash
# One device-tool call of the GPU benchmark (issue: DualPath on a real multi-GPU host): each part
# a separate process with its own time limit, so that a part cut short still leaves its JSON
# (gpu_bench.json is rewritten after every measurement) and the next part runs.
#
#   OUT=/path bash scripts/gpu_bench_call.sh micro e2e:1P3D:6.25e9 e2e:2P2D:0
#
# Parts: 'micro' = ceilings, data plane and engine (configs/gpu_bench.py:h100x4, ~2-3 min);
# 'hostcopy' = scripts/bench_host_copy.py at 1-16 copy threads (< 1 min);
# 'e2e:<topology>:<link cap bytes/s, 0 = uncapped>' = one end-to-end job of
# configs/gpu_bench.py:e2e_h100x4. Seconds per part: PART_LIMIT_S (default 280; micro 200).
# MICRO_FLAGS / E2E_FLAGS: further flags of the micro / end-to-end runs, e.g.
# MICRO_FLAGS="--config.sections=('engine',)" E2E_FLAGS="--config.end_to_end.agents=8".
# Decode in the end-to-end jobs uses the Pallas paged-attention kernel unless micro's decode rows
# show that it failed on this card; the fallback ('gather') is logged and in the job's config.
# On the GPU image, ml_collections comes from wheels in .whl/ (no network there).
set -u
OUT=${OUT:?set OUT to the output folder}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" 2>&1
paged=pallas
for part in "$@"; do
  case "$part" in
    micro)
      timeout "${MICRO_LIMIT_S:-200}" python3 experiments/gpu_bench.py \
          --config=configs/gpu_bench.py:h100x4 \
          --config.engine.prefill_variants="('layerwise','layerwise_sdpa')" \
          ${MICRO_FLAGS:-} --out="$OUT/micro" > "$OUT/micro.log" 2>&1
      echo "micro: exit $?"
      paged=$(python3 - "$OUT/micro/gpu_bench.json" <<'EOF'
import json, sys
try:
  rows = json.load(open(sys.argv[1]))["engine"]["decode"]
except Exception:  # no engine section: keep the kernel
  rows = []
pallas = [r for r in rows if r.get("paged_attention") == "pallas"]
print("gather" if pallas and all("error" in r for r in pallas) else "pallas")
EOF
)
      echo "end-to-end decode attention: $paged"
      ;;
    hostcopy)
      timeout 120 python3 scripts/bench_host_copy.py --threads=1,2,4,8,16 \
          --out="$OUT/host_copy.json" > "$OUT/host_copy.log" 2>&1
      echo "hostcopy: exit $?"
      ;;
    e2e:*)
      IFS=: read -r _ topology cap <<< "$part"
      name="e2e_${topology}_cap${cap}"
      timeout "${PART_LIMIT_S:-280}" python3 experiments/gpu_bench.py \
          --config=configs/gpu_bench.py:e2e_h100x4 \
          --config.end_to_end.topologies="('$topology',)" \
          --config.end_to_end.link_caps="($cap,)" \
          --config.end_to_end.model.paged_attention="$paged" \
          ${E2E_FLAGS:-} --out="$OUT/$name" > "$OUT/$name.log" 2>&1
      echo "$name: exit $?"
      for f in "$OUT/$name"/end_to_end/*/{summary.json,turns.jsonl,config.json}; do
        [ -f "$f" ] && cp "$f" "$OUT/${name}_$(basename "$f")"  # the device tool fetches 2 levels
      done
      ;;
    *)
      echo "unknown part: $part" >&2
      exit 2
      ;;
  esac
done
