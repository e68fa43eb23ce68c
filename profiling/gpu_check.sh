#!/usr/bin/env bash
# GPU check on a fresh GPU machine, all inside 8 minutes:
#   profiling/gpu_check.sh RESULTS_DIR
# installs carried wheels (./wheels, offline), builds the extension in place,
# records backend_info, runs `pytest -m gpu`, `asyncdiff-rt bench`, then every
# profiling/bench_*.py.
# Each step has its own timeout; logs, tables and summary.txt go to RESULTS_DIR.
# A failing step is logged and the script goes on; its exit status is the
# number of failed steps. Later issues add steps here.
set -uo pipefail

RESULTS="${1:?usage: profiling/gpu_check.sh RESULTS_DIR}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"  # whole script, seconds
export ASYNCDIFF_RT_RESULTS_DIR="$RESULTS"
FAILED=0
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"

# step NAME CAP_SECONDS CMD...: runs CMD under `timeout` (its cap, or what is
# left of the budget minus a reserve for later steps), tees NAME.log.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - SECONDS - 10))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
    FAILED=$((FAILED + 1))
    return
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  if ((rc == 124 || rc == 137)); then status="TIMEOUT after ${limit}s"; elif ((rc != 0)); then status="FAILED rc=$rc"; fi
  [[ $status == ok ]] || FAILED=$((FAILED + 1))
  echo "$name: $status ($((SECONDS - t0))s)" | tee -a "$SUMMARY"
}

step nvidia_smi 20 nvidia-smi

if compgen -G "wheels/*.whl" > /dev/null; then
  step wheels 90 bash -c '"$0" -m pip install --no-index --find-links wheels wheels/*.whl ||
    "$0" -m pip install --no-index --no-deps --find-links wheels wheels/*.whl' "$PY"
fi

# Editable install (the extension lands in asyncdiff_rt/); a direct in-place
# build if pip cannot install (e.g. no network for its build requirements).
step build 240 bash -c 'ASYNCDIFF_RT_BUILD_EXT=1 "$0" -m pip install --no-build-isolation --no-deps -e . ||
  ASYNCDIFF_RT_BUILD_EXT=1 "$0" setup.py build_ext --inplace' "$PY"

# Scripts outside the repo root find the package through the editable install,
# or, after the in-place fallback, through PYTHONPATH.
if ! (cd / && "$PY" -c 'import asyncdiff_rt' 2> /dev/null); then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step backend_info 60 "$PY" -c 'import json, asyncdiff_rt.backend as b; print(json.dumps(b.backend_info(), indent=1))'

step pytest_gpu 200 "$PY" -m pytest -m gpu -q -rs --junitxml="$RESULTS/pytest_gpu.xml"

# The local executor against sequential diffusers (SD 1.5 fp16, 512 px, 50 steps):
# rows that do not fit its budget are marked skipped; tables go to RESULTS
# (it rewrites its table after every row, so a cut-short run still leaves one).
left=$((BUDGET - SECONDS - 10))
bench_budget=$(( (left < 200 ? left : 200) - 45 ))
step asyncdiff_bench 200 "$PY" -m asyncdiff_rt.cli bench --out "$RESULTS" --repeats 2 \
  --budget-s $((bench_budget > 10 ? bench_budget : 10))

declare -A seen=()
for bench in profiling/bench_transfer.py profiling/bench_kernels.py profiling/bench_*.py; do
  [[ -f $bench && -z ${seen[$bench]:-} ]] || continue  # the globs list some twice
  seen[$bench]=1
  name="$(basename "$bench" .py)"
  step "$name" 120 "$PY" "$bench"  # benches read ASYNCDIFF_RT_RESULTS_DIR
done

echo "failed steps: $FAILED (total ${SECONDS}s)" | tee -a "$SUMMARY"
exit "$FAILED"
