#!/usr/bin/env bash
# The device-box benchmarks at the three real shapes. Usage:
#   benchmarks/shapes.sh decode  [v2-lite|qwen3|v3]... [-- extra flags]   # bench decode, JSON per run
#   benchmarks/shapes.sh compare [v2-lite|qwen3|v3]... [-- extra flags]   # against transformers, then
#                                                                          # the Markdown table and PNG chart
# JSON goes to $OUT (default ./bench-out). Synthetic checkpoints and their INT4 caches go to $WORK
# (default /tmp/hetero-moe-bench) and are deleted after each shape: the box has 64 GB of disk. Qwen3-30B-A3B
# is written in FP8 (its bf16 release would need 61 GB). For `compare` the DeepSeek-V3 shape is written in
# bf16, 3 layers (45 GB), so that transformers can offload it to the CPU.
set -euo pipefail
mode=${1:?usage: benchmarks/shapes.sh decode|compare [shapes] [-- flags]}
shift
out=${OUT:-bench-out}
work=${WORK:-/tmp/hetero-moe-bench}
mkdir -p "$out"
shapes=()
while [[ $# -gt 0 && $1 != -- ]]; do shapes+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#shapes[@]} -eq 0 ]] && shapes=(v2-lite qwen3 v3)
export HETERO_MOE_CACHE="$work/cache"
extra=()
[[ $mode == compare ]] && extra=(--prefill 512,2048,8192)
run() { hetero-moe bench "$mode" --checkpoint-dir "$work/checkpoints" "${extra[@]}" --json "$@"; }
for shape in "${shapes[@]}"; do
  case $mode/$shape in
    */v2-lite) run --arch deepseek-v2-lite "$@" > "$out/$mode-v2-lite.json" ;;
    */qwen3) run --arch qwen3-30b-a3b --disk fp8 "$@" > "$out/$mode-qwen3.json" ;;
    decode/v3)
      run --arch deepseek-v3 --layers 4 "$@" > "$out/decode-v3-fp8-gpu.json"
      run --arch deepseek-v3 --layers 4 --rules deepseek-v3-int4-gpu.yaml "$@" > "$out/decode-v3-int4-gpu.json"
      ;;
    compare/v3) run --arch deepseek-v3 --layers 3 --disk bf16 "$@" > "$out/compare-v3.json" ;;
    *) echo "unknown mode or shape: $mode $shape (decode|compare; v2-lite, qwen3, v3)" >&2; exit 2 ;;
  esac
  rm -rf "$work"
done
if [[ $mode == compare ]]; then
  hetero-moe bench report "$out"
fi
