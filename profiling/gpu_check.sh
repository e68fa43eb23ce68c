#!/usr/bin/env bash
# GPU check on a fresh GPU machine, all inside 8 minutes:
#   profiling/gpu_check.sh RESULTS_DIR
# installs carried wheels (./wheels, offline), builds the extension in place,
# records backend_info, runs `pytest -m gpu`, the local executor's GPU tests again
# under the CUDA sanitizer, the transfer and kernel benchmarks, then `asyncdiff-rt
# bench` with the time left.
# Each step has its own timeout; logs, tables and summary.txt go to RESULTS_DIR.
# A failing step is logged and the script goes on; its exit status is the
# number of failed steps. Later issues add steps here.
set -uo pipefail

RESULTS="${1:?usage: profiling/gpu_check.sh RESULTS_DIR}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "$0")/.." || exit 1
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
  # shellcheck disable=SC2016  # $0 expands in the inner bash: the python given as its $0
  step wheels 90 bash -c '"$0" -m pip install --no-index --find-links wheels wheels/*.whl ||
    "$0" -m pip install --no-index --no-deps --find-links wheels wheels/*.whl' "$PY"
fi

# Editable install (the extension lands in asyncdiff_rt/); a direct in-place
# build if pip cannot install (e.g. no network for its build requirements).
# This card's architecture only: a faster build.
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -1 | tr -d .)"
[[ $cap =~ ^[0-9]+$ ]] && export ASYNCDIFF_RT_CUDA_ARCHS="${ASYNCDIFF_RT_CUDA_ARCHS:-$cap}"
# shellcheck disable=SC2016  # as above
step build 150 bash -c 'ASYNCDIFF_RT_BUILD_EXT=1 "$0" -m pip install --no-build-isolation --no-deps -e . ||
  ASYNCDIFF_RT_BUILD_EXT=1 "$0" setup.py build_ext --inplace' "$PY"

# Scripts outside the repo root find the package through the editable install,
# or, after the in-place fallback, through PYTHONPATH.
if ! (cd / && "$PY" -c 'import asyncdiff_rt' 2> /dev/null); then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step backend_info 60 "$PY" -c 'import json, asyncdiff_rt.backend as b; print(json.dumps(b.backend_info(), indent=1))'

# A test that hangs must not eat the budget: per-test timeout where pytest-timeout is there.
timeout_flag=()
"$PY" -c 'import pytest_timeout' 2> /dev/null && timeout_flag=(--timeout 45)
step pytest_gpu 180 "$PY" -m pytest -m "gpu and not distributed" -q -rs -p no:cacheprovider "${timeout_flag[@]}" \
  --junitxml="$RESULTS/pytest_gpu.xml"
# Several processes on this GPU: CUDA IPC mailboxes (delays on purpose on the streams), and
# the distributed executor over them; NCCL's tests need two GPUs and skip on one.
step pytest_gpu_distributed 120 "$PY" -m pytest -m "gpu and distributed" -q -rs -p no:cacheprovider \
  --junitxml="$RESULTS/pytest_gpu_distributed.xml"

# The local executor's GPU tests once more under PyTorch's CUDA sanitizer, which fails
# a kernel that touches a tensor another stream used without an event, wait or sync
# ordering the two. It follows only torch's own kernels, copies, events and streams:
# under TORCH_CUDA_SANITIZER the test module moves transfers to the torch backend (the
# extension's raw events and copies are invisible to it), and CUDA-graph replays are
# invisible too (their captures are seen). Left out: the SM-partition tests, whose
# streams are external streams of green contexts made by the extension, which the
# sanitizer may not understand; and fp16 (the same orderings as fp32, half the time).
step pytest_gpu_sanitizer 90 env TORCH_CUDA_SANITIZER=1 "$PY" -m pytest -m gpu -q -x -rs -p no:cacheprovider \
  "${timeout_flag[@]}" -k "not sm_partition and not fp16" --junitxml="$RESULTS/pytest_gpu_sanitizer.xml" \
  tests/test_executor_local_gpu.py

# The short benchmarks first, each with a reduced set, then the local executor's
# table (SD 1.5 fp16, 512 px, 50 steps) with what is left: rows that do not fit its
# budget are marked skipped, and it rewrites its table after every row.
step bench_transfer 35 "$PY" profiling/bench_transfer.py --out "$RESULTS"
step bench_kernels 70 "$PY" profiling/bench_kernels.py --models sd15 --out "$RESULTS"
# SD 1.5 at 512 on two virtual devices, recorded: Chrome trace, Gantt PNG, summary.
step profile 60 "$PY" -m asyncdiff_rt.cli profile -n 2 --out "$RESULTS/profile"
left=$((BUDGET - SECONDS - 10))
step asyncdiff_bench "$left" "$PY" -m asyncdiff_rt.cli bench --out "$RESULTS" --repeats 2 \
  --budget-s $((left > 70 ? left - 45 : 25))

echo "failed steps: $FAILED (total ${SECONDS}s)" | tee -a "$SUMMARY"
exit "$FAILED"
