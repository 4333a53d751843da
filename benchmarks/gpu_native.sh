#!/usr/bin/env bash
# Issue 18's GPU table, prepared for a lent GPU machine: S-CFG against CFG at each denoiser's native size, in
# float16 and bfloat16, peak memory from torch.cuda.max_memory_allocated, methods interleaved (benchmarks/overhead.py).
#
#   bash benchmarks/gpu_native.sh [OUT_DIR] [MODELS...]     # default: sd15 sdxl pixart-sigma sd3
#
# Each run prints its table; all of them go to OUT_DIR/<model>-<dtype>.md. Random weights from the real configs,
# as on CPU. A model whose run fails (out of memory, a missing kernel) is reported and the others go on.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
shift || true
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(sd15 sdxl pixart-sigma sd3)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for model in "${models[@]}"; do
  for dtype in float16 bfloat16; do
    echo "== $model $dtype $(date -u +%T)"
    timeout 240 python benchmarks/overhead.py --model "$model" --device cuda --dtype "$dtype" --reps 5 --warmup 2 \
      --methods cfg scfg --memory-methods cfg scfg > "$out/$model-$dtype.md" 2> "$out/$model-$dtype.log" \
      || echo "   failed (exit $?): see $out/$model-$dtype.log"
    tail -n 6 "$out/$model-$dtype.md"
  done
done
