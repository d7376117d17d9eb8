#!/usr/bin/env bash
# Whole-model decode at the three real shapes on the device box; JSON per run in $OUT (default
# ./bench-out). Synthetic checkpoints and their INT4 caches go to $WORK (default /tmp/hetero-moe-bench)
# and are deleted after each shape: the box has 64 GB of disk. Qwen3-30B-A3B is written in FP8 (its
# bf16 release would need 61 GB). Usage: benchmarks/decode.sh [v2-lite|qwen3|v3]... [-- extra flags]
set -euo pipefail
out=${OUT:-bench-out}
work=${WORK:-/tmp/hetero-moe-bench}
mkdir -p "$out"
shapes=()
while [[ $# -gt 0 && $1 != -- ]]; do shapes+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#shapes[@]} -eq 0 ]] && shapes=(v2-lite qwen3 v3)
export HETERO_MOE_CACHE="$work/cache"
bench() { hetero-moe bench decode --checkpoint-dir "$work/checkpoints" --json "$@"; }
for shape in "${shapes[@]}"; do
  case $shape in
    v2-lite) bench --arch deepseek-v2-lite "$@" > "$out/decode-v2-lite.json" ;;
    qwen3) bench --arch qwen3-30b-a3b --disk fp8 "$@" > "$out/decode-qwen3.json" ;;
    v3)
      bench --arch deepseek-v3 --layers 4 "$@" > "$out/decode-v3-fp8-gpu.json"
      bench --arch deepseek-v3 --layers 4 --rules deepseek-v3-int4-gpu.yaml "$@" > "$out/decode-v3-int4-gpu.json"
      ;;
    *) echo "unknown shape $shape (v2-lite, qwen3, v3)" >&2; exit 2 ;;
  esac
  rm -rf "$work"
done
