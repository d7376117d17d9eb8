#!/usr/bin/env bash
# Downloads the wheels the device box lacks (pure Python but pydantic-core and llguidance) into
# benchmarks/device-wheels/ (ignored by git), for Python 3.12 on x86-64 Linux, so that a `run` call can
# carry them: carry ["benchmarks/device-wheels"]. benchmarks/device-check.sh installs them with
# `pip install --no-index --no-deps --target`. Run it here, where PyPI is reachable; it skips what is
# already there. Every step needs gguf (hetero_moe.llm imports the GGUF reader), the profile step
# py-spy; only the server needs the rest (fastapi and its kin, llguidance).
# Usage: benchmarks/device-wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/device-wheels}
py=${PYTHON:-python3}
# One version of each, the ones the development environment is tested with. The box already has
# anyio, click, h11, httpx, annotated-doc, tqdm and prometheus-client (KINDS.md), not these.
wheels=(
  fastapi==0.165.0
  starlette==1.10.0
  uvicorn==0.54.0
  sse-starlette==3.7.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  opentelemetry-api==1.45.2
  gguf==0.19.0
  llguidance==1.6.1
  py-spy==0.4.3
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$dir"
for w in "${wheels[@]}"; do
  name=${w%%==*}
  version=${w##*==}
  stem=${name//-/_}
  if compgen -G "$dir/${stem}-${version}-*.whl" > /dev/null; then
    continue
  fi
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$w"
done
ls -l "$dir"
du -sh "$dir"
