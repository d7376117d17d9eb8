#!/usr/bin/env bash
# Side by side on the device box, one command: hetero-moe against plain transformers (accelerate
# offload of the routed experts) on the same synthetic checkpoints, decode and prefill at 512, 2K and
# 8K prompt tokens, then the Markdown table and PNG chart. JSON per shape in $OUT (default ./bench-out).
# Checkpoints and INT4 caches go to $WORK and are deleted after each shape (64 GB of disk). The
# DeepSeek-V3 shape is written in bf16 (3 layers: 45 GB) so that transformers can offload it to the CPU.
# Usage: benchmarks/compare.sh [v2-lite|qwen3|v3]... [-- extra flags]
set -euo pipefail
out=${OUT:-bench-out}
work=${WORK:-/tmp/hetero-moe-bench}
mkdir -p "$out"
shapes=()
while [[ $# -gt 0 && $1 != -- ]]; do shapes+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#shapes[@]} -eq 0 ]] && shapes=(v2-lite qwen3 v3)
export HETERO_MOE_CACHE="$work/cache"
compare() { hetero-moe bench compare --checkpoint-dir "$work/checkpoints" --prefill 512,2048,8192 --json "$@"; }
for shape in "${shapes[@]}"; do
  case $shape in
    v2-lite) compare --arch deepseek-v2-lite "$@" > "$out/compare-v2-lite.json" ;;
    qwen3) compare --arch qwen3-30b-a3b --disk fp8 "$@" > "$out/compare-qwen3.json" ;;
    v3) compare --arch deepseek-v3 --layers 3 --disk bf16 "$@" > "$out/compare-v3.json" ;;  # 45 GB on disk
    *) echo "unknown shape $shape (v2-lite, qwen3, v3)" >&2; exit 2 ;;
  esac
  rm -rf "$work"
done
hetero-moe bench report "$out"
