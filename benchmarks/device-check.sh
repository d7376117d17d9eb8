#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called through run_step
# The GPU path's first run, in one call of the device tool (issue 16). It installs the project from
# this tree (and the wheels in benchmarks/device-wheels/, if carried), then runs these steps, each
# within its own time limit and all within one budget (570 s: the script ends inside 10 minutes):
#   setup      copy the package, `pip install --no-index --no-deps --target`, check it, probe the box
#   tests      tests/test_triton.py, test_triton_mla.py, test_gpu_ops.py, test_gpu.py: one pytest per
#              file under `timeout` (and pytest-timeout per test where it is installed)
#   decode     bench decode, DeepSeek-V2-Lite shape on deepseek-v2-lite.yaml: 8 of its 27 layers
#              (1 dense, 7 MoE), bf16 on disk, extrapolated to 27; tok/s against the DRAM roofline and
#              the GPU / CPU experts / waiting split
#   prefill    the same checkpoint, prompts of 512 and 2,048 tokens (time to first token)
#   profile    the decode bench again under py-spy (carried as a wheel; `record --idle -f raw`): where a
#              step's time goes, by frame (the GPU path's decode step was host-bound on the first run)
#   v3-memory  DeepSeek-V3 on deepseek-v3-int4-gpu.yaml with a KV pool of 8,192 tokens: 2 real-size
#              layers (1 dense, 1 MoE with 64 of its 256 routed experts: they live on the CPU), the
#              GPU memory measured (torch's peak; nvidia-smi sampled meanwhile) and extrapolated to 61
#              layers by `rules check`'s predictions
# Each step writes $OUT/NN-step.json as it ends (status, time, commands, result, and the log's tail
# when it failed), and $OUT/summary.json is rewritten after each step; $OUT/device-check.log holds
# every command's output. 8 files at most (all the device tool brings back). Exit code 0 when every
# step that ran is ok.
#
# Usage: benchmarks/device-check.sh [--dry-run] [--only STEP[,STEP...]]
#   --dry-run   the same steps on the CPU at tiny sizes (tiny checkpoints, CPU rules, the GPU tests
#               skipped), with the environment's own install: tests/test_device_check.py runs it in CI
#   --only      run only these of: tests, decode, prefill, profile, v3-memory (setup always runs)
# Environment: OUT (default /tmp/device-check-out), WORK (the scratch folder goes in WORK/hetero-moe-check,
# default /tmp), PYTHON (default python3), DC_BUDGET (seconds for the whole run), DC_LIMIT_<STEP> (a
# step's limit in seconds, e.g. DC_LIMIT_DECODE=60, DC_LIMIT_V3_MEMORY=100), KEEP_WORK=1 (keep the
# scratch folder). docs/benchmarks.md, "Device check", has the device-tool call and reads the output.
set -uo pipefail
export LC_ALL=C PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 # PYTHONSAFEPATH: ./hetero_moe never shadows the install
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 # no network there: never wait for it

usage() { sed -n '3,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root" || exit 2

mode=real
only=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) mode=dry ;;
    --only)
      only=${2:-}
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "unknown argument: $1" >&2
      usage >&2
      exit 2
      ;;
  esac
  shift
done
steps=(tests decode prefill profile v3-memory)
if [[ -n $only ]]; then
  IFS=, read -r -a chosen <<< "$only"
  for s in "${chosen[@]}"; do
    if [[ " ${steps[*]} " != *" $s "* ]]; then
      echo "--only takes a comma-separated list of: ${steps[*]}; got '$s'" >&2
      exit 2
    fi
  done
fi

py=${PYTHON:-python3}
out=${OUT:-/tmp/device-check-out}
work=${WORK:-/tmp}/hetero-moe-check # always this subfolder: it is deleted whole
site=$work/site
ck=$work/checkpoints
hm=("$py" -m hetero_moe.cli)
helper=("$py" "$here/device_check.py")
log=$out/device-check.log
started=$(date +%s)
export HETERO_MOE_CACHE=$work/cache # converted INT4 experts: written by decode, reused by prefill

# The checkpoints (arch,layers,disk format), the same in both modes: only their contents differ.
v2_ck=deepseek-v2-lite,8,bf16
v3_ck=deepseek-v3,2,fp8
IFS=, read -r a l d <<< "$v2_ck"
v2=(--arch "$a" --layers "$l" --disk "$d")
IFS=, read -r a l d <<< "$v3_ck"
v3=(--arch "$a" --layers "$l" --disk "$d")
if [[ $mode == real ]]; then
  budget=${DC_BUDGET:-570}
  # file:seconds; the Triton kernels compile on first use
  test_files=(tests/test_triton.py:40 tests/test_triton_mla.py:40 tests/test_gpu_ops.py:70 tests/test_gpu.py:150)
  per_test=45
  v2_rules=deepseek-v2-lite.yaml
  decode_steps=32
  profile_steps=8 # under py-spy the load alone took 60 s (16 threads sampled)
  prefill=512,2048
  v3_rules=deepseek-v3-int4-gpu.yaml
  v3_context=8192
  v3_prefill=512 # the server's default prefill chunk
  v3_experts=64
  declare -A limit=([setup]=60 [tests]=270 [decode]=110 [prefill]=70 [profile]=120 [v3-memory]=140)
else
  export CUDA_VISIBLE_DEVICES="" # the CPU, even on a box with a GPU
  budget=${DC_BUDGET:-900} # generous: CI never fails on a slow machine, only on a broken step
  test_files=(tests/test_gpu.py:300) # all skipped without a GPU: checks the runner and the JUnit parsing
  per_test=60
  v2_rules=cpu-only-int4.yaml
  decode_steps=2
  profile_steps=24 # steps of ~2 ms: enough that py-spy (200 a second) samples some on a busy CI machine
  prefill=16,32
  v3_rules=cpu-only-int4.yaml
  v3_context=1024
  v3_prefill=16
  v3_experts=""
  declare -A limit=([setup]=300 [tests]=300 [decode]=300 [prefill]=300 [profile]=300 [v3-memory]=300)
fi
for s in setup "${steps[@]}"; do
  var=DC_LIMIT_$(tr 'a-z-' 'A-Z_' <<< "$s")
  limit[$s]=${!var:-${limit[$s]}}
done

mkdir -p "$out"
: > "$log"
rm -rf "$work"
mkdir -p "$work/junit" "$ck"

failed=0
step_end=0
step_result=""
step_note=""
step_cmds=()
smi_pid=""

say() { echo "[$(($(date +%s) - started))s] $*" | tee -a "$log"; }

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# Seconds a command of the current step may run: what is left of the step, at most $1 when given.
tlimit() {
  local l=$((step_end - $(date +%s)))
  ((l < 1)) && l=1
  if [[ $# -gt 0 ]] && (($1 < l)); then l=$1; fi
  echo "$l"
}

# A command under the step's time limit, logged with its time and kept for the step's record.
timed() {
  local rc t0=$EPOCHREALTIME
  step_cmds+=("$*")
  echo "[$(($(date +%s) - started))s] + $*" >&2
  timeout -s INT -k 10 "$(tlimit)" "$@" # SIGINT: a pytest killed at its limit still prints its failures
  rc=$?
  echo "[$(($(date +%s) - started))s] rc $rc in $(elapsed "$t0") s" >&2
  return "$rc"
}

record() { "${helper[@]}" record --out "$out" --mode "$mode" --started "$started" --env "$work/env.json" "$@"; }

selected() { [[ $1 == setup || -z $only || ,$only, == *,$1,* ]]; }

# run_step NAME FUNCTION: the step within its limit and what is left of the budget; its record in $OUT.
run_step() {
  local name=$1 fn=$2 lim=${limit[$1]} now avail offset t0 rc secs status c
  selected "$name" || return 0
  now=$(date +%s)
  avail=$((started + budget - 10 - now)) # 10 s kept for the summary
  offset=$(stat -c %s "$log")
  if ((avail < 5)); then
    say "$name: skipped, the budget is spent"
    record --step "$name" --rc 0 --seconds 0 --limit "$((avail > 0 ? avail : 0))" --status skipped > /dev/null
    failed=1
    return 0
  fi
  ((lim > avail)) && lim=$avail
  say "$name: start, limit ${lim} s"
  step_end=$((now + lim))
  step_result=""
  step_note=""
  step_cmds=()
  t0=$EPOCHREALTIME
  "$fn" >> "$log" 2>&1
  rc=$?
  secs=$(elapsed "$t0")
  local args=(--step "$name" --rc "$rc" --seconds "$secs" --limit "$lim" --log "$log" --log-offset "$offset")
  [[ -n $step_result ]] && args+=(--result "$step_result")
  [[ -n $step_note ]] && args+=(--note "$step_note")
  for c in "${step_cmds[@]}"; do args+=(--command "$c"); done
  status=$(record "${args[@]}") || status="unrecorded"
  [[ $status == ok ]] || failed=1
  say "$name: $status (rc $rc) in ${secs} s"
}

# The checkpoint folder `seed` wrote for an architecture.
seeded() { awk -v a="$1" '$1 == a { print $2 }' "$work/seeded.txt"; }

step_setup() {
  mkdir -p "$work/src"
  cp -r pyproject.toml README.md hetero_moe kernels rules configs "$work/src/" || return
  find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
  local wheels=(benchmarks/device-wheels/*.whl) carried=()
  if [[ ! -e ${wheels[0]} ]]; then
    step_note="no wheels in benchmarks/device-wheels (benchmarks/device-wheels.sh): the box lacks gguf, which every step imports"
  elif [[ $mode == real ]]; then
    carried=("${wheels[@]}")
  fi
  # One pip call: a second `--target` install into the same folder skips its bin/ (py-spy's) with a warning
  timed "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" "$work/src" \
    "${carried[@]}" || return
  if [[ -e ${wheels[0]} && $mode != real ]]; then # they are for the box's Python: check that pip there would take them
    timed "$py" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      --target "$work/wheel-check" "${wheels[@]}" || step_note="the wheels would not install on Python 3.12"
  fi
  # the installed copy imports and holds the rules and presets; the box, probed with it
  PYTHONPATH=$site timed "${helper[@]}" env --work "$work" --site "$site" > "$work/env.json" || return
  step_result=$work/env.json
  if [[ $mode == real ]]; then
    export PYTHONPATH=$site
    timed "$py" -c 'import hetero_moe.server.app' \
      || step_note="${step_note:+$step_note; }the server does not import (no step needs it)"
  else
    # The dry run goes on with the environment's own install (editable in CI): Numba caches compiled
    # kernels beside their source files, and a fresh copy would compile them all again. Its tiny
    # checkpoints, written once here, stand where bench decode looks for its real-size ones.
    timed "${helper[@]}" seed --root "$ck" --tiny --checkpoint "$v2_ck" --checkpoint "$v3_ck" \
      > "$work/seeded.txt" || return
  fi
}

step_tests() {
  local timeout_flag=() spec file lim rc t0 bad=0
  if "$py" -c 'import pytest_timeout' 2> /dev/null; then timeout_flag=(--timeout="$per_test"); fi
  : > "$work/tests.tsv"
  for spec in "${test_files[@]}"; do
    file=${spec%:*}
    lim=$(tlimit "${spec##*:}")
    t0=$EPOCHREALTIME
    timed "$py" -m pytest -v -rfEs --durations=10 -p no:cacheprovider \
      --junitxml="$work/junit/$(basename "$file" .py).xml" "${timeout_flag[@]}" "$file"
    rc=$?
    echo "$file $rc $(elapsed "$t0") $lim" >> "$work/tests.tsv"
    ((rc != 0 && rc != 5)) && bad=1
  done
  "${helper[@]}" tests --table "$work/tests.tsv" --junit-dir "$work/junit" > "$work/tests.json" || return
  step_result=$work/tests.json
  return "$bad"
}

step_decode() {
  step_result=$work/decode.json
  timed "${hm[@]}" -v bench decode "${v2[@]}" --rules "$v2_rules" --steps "$decode_steps" --checkpoint-dir "$ck" \
    --json > "$work/decode.json"
}

step_prefill() {
  step_result=$work/prefill.json
  timed "${hm[@]}" -v bench decode "${v2[@]}" --rules "$v2_rules" --steps 2 --prefill "$prefill" \
    --checkpoint-dir "$ck" --json > "$work/prefill.json"
}

step_profile() {
  local spy
  spy=$(command -v py-spy || true)
  [[ -x $site/bin/py-spy ]] && spy=$site/bin/py-spy # the carried wheel's
  if [[ -z $spy ]]; then
    step_note="py-spy is not installed (benchmarks/device-wheels.sh carries it for the box): no profile"
    return 0
  fi
  step_result=$work/profile.json
  # py-spy writes what it has when `timed` interrupts it: a cut recording still says where steps went
  local rc=0
  timed "$spy" record --idle -r 200 -f raw -o "$work/decode.folded" -- "${hm[@]}" bench decode "${v2[@]}" \
    --rules "$v2_rules" --steps "$profile_steps" --checkpoint-dir "$ck" --json > /dev/null || rc=$?
  [[ -s $work/decode.folded ]] || return "$rc"
  ((rc == 0)) || step_note="the recording was cut at the step's limit (rc $rc): its profile covers fewer steps"
  timed "${helper[@]}" profile --folded "$work/decode.folded" > "$work/profile.json" || return
  return "$rc"
}

stop_smi() {
  if [[ -n $smi_pid ]]; then
    kill "$smi_pid" 2> /dev/null
    wait "$smi_pid" 2> /dev/null
    smi_pid=""
  fi
}

step_v3_memory() {
  local rc smi=() experts=()
  if [[ $mode == real ]]; then
    rm -rf "$ck"/deepseek-v2-lite-* "$HETERO_MOE_CACHE/converted" # the disk the V2-Lite steps took
    timed "${helper[@]}" seed --root "$ck" --experts "$v3_experts" --checkpoint "$v3_ck" >> "$work/seeded.txt" \
      || return
    experts=(--experts "$v3_experts")
  fi
  # rules check's GPU bytes (weights, one sequence's KV cache) for the run and for the full model
  timed "${helper[@]}" predict --model "$(seeded deepseek-v3)" --model deepseek-v3 --rules "$v3_rules" \
    --max-context "$v3_context" > "$work/v3-predicted.json"
  if [[ $mode == real ]] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$work/smi-before.csv"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$work/smi.csv" 2>&1 &
    smi_pid=$!
    smi=(--smi "$work/smi.csv" --smi-before "$work/smi-before.csv")
  fi
  timed "${hm[@]}" -v bench decode "${v3[@]}" --rules "$v3_rules" --steps 4 --max-context "$v3_context" \
    --prefill "$v3_prefill" --checkpoint-dir "$ck" --json > "$work/v3-bench.json"
  rc=$?
  stop_smi
  timeout 30 "${helper[@]}" v3-memory --bench "$work/v3-bench.json" --predicted "$work/v3-predicted.json" \
    "${smi[@]}" "${experts[@]}" > "$work/v3-memory.json"
  step_result=$work/v3-memory.json
  return "$rc"
}

trap stop_smi EXIT

say "device check ($mode): OUT=$out, work in $work, budget ${budget} s"
run_step setup step_setup
if [[ ! -s $work/env.json ]]; then
  say "setup failed: nothing else can run"
  failed=1
else
  run_step tests step_tests
  run_step decode step_decode
  run_step prefill step_prefill
  run_step profile step_profile
  run_step v3-memory step_v3_memory
fi
"${helper[@]}" table --out "$out" --mode "$mode" --started "$started" --env "$work/env.json" | tee -a "$log"
[[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$work"
exit "$failed"
