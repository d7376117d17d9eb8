#!/usr/bin/env bash
# CPU experts at the three real layer shapes and three formats; JSON per run in $OUT (default
# ./bench-out), then the Markdown table. Usage: benchmarks/experts.sh [extra bench flags, e.g. --threads 16]
set -euo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
for arch in deepseek-v3 deepseek-v2-lite qwen3-30b-a3b; do
  for quant in int4 fp8 bf16; do
    hetero-moe bench experts --arch "$arch" --quant "$quant" --tokens "${TOKENS:-1,8,64,512}" --json "$@" \
      > "$out/$arch-$quant.json"
  done
done
python "$(dirname "$0")/experts_table.py" "$out"/*.json
