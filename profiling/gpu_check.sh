#!/usr/bin/env bash
# shellcheck disable=SC2329  # stand_in, junit_counts and built_for_this_card are called through variables
# GPU check on a fresh GPU machine, all inside a budget of 8 minutes (GPU_CHECK_BUDGET_S, 470 s):
#   profiling/gpu_check.sh RESULTS_DIR              on a machine with a GPU
#   profiling/gpu_check.sh --rehearse RESULTS_DIR   on the CPU (or GPU_CHECK_REHEARSE=1)
#
# Order, what has never run on a GPU first:
#   preflight (no GPU, or a torch that sees none: stop at once, exit 1), wheels (.whl/*.whl,
#   offline), versions (torch, CUDA, driver, card, packages), the extension built for this
#   card's architecture (sm_90 on Hopper) and checked to be, backend_info, pytest -m "gpu and not distributed",
#   pytest -m "gpu and distributed", the local executor's stream-ordering tests under
#   TORCH_CUDA_SANITIZER, `asyncdiff-rt profile` (Chrome trace, Gantt PNG, summary), the
#   projection from the profile's measured forward times, with two GPUs visible only
#   `asyncdiff-rt bench --context-parallel` (diffusers' Ulysses and ring against the
#   distributed executor on a tiny FLUX, 2 ranks, NCCL; noted not run with fewer), then
#   `asyncdiff-rt bench` (eager diffusers and N=1 baselines first) with the time left. The transfer and kernel
#   benchmarks measured on the H100 before (profiling/results/gpu_check_nvidia_h100/) run
#   only with GPU_CHECK_MEASURED=1.
# Each step runs under a timeout (its cap, or what is left of the budget less a reserve of
# GPU_CHECK_RESERVE_S = 10 s); a step that no longer fits is reported skipped. Each pytest
# run also has a per-test timeout (GPU_CHECK_TEST_TIMEOUT_S = 60 s, pytest-timeout) and is
# failed when no test ran or every test skipped. Logs, JUnit reports, tables and
# summary.txt go to RESULTS_DIR. The exit status is the number of failed steps.
#
# A rehearsal runs every step's plumbing (budget, timeouts, logs, JUnit counts, summary)
# with stand-ins for what needs a GPU: the pytest steps run a stand-in test file (its GPU
# test skips: that step fails as "all skipped"), the other GPU steps a stand-in that says
# what it stands for. GPU_CHECK_REHEARSE_FAIL / GPU_CHECK_REHEARSE_SLOW: space-separated
# step names whose stand-in fails / hangs. GPU_CHECK_REHEARSE_GPUS: the GPUs a rehearsal
# counts (default 2: every step runs).
#
# Wheels: the device machine (Python 3.12, torch 2.11 + CUDA 13, Triton, CuPy, pybind11,
# CMake, ninja, nvcc, pytest, pytest-timeout, transformers, huggingface_hub 1.33,
# safetensors 0.8, regex, requests, filelock, numpy, Pillow, zipp, matplotlib) lacks
# diffusers and nvtx, and diffusers' importlib_metadata (with its lazy-importer). They
# travel in .whl/ (ignored by git through .git/info/exclude; 9.5 MB), downloaded once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata \
#     lazy-importer nvtx
# and installed by the `wheels` step (from GPU_CHECK_WHEELS, .whl) into GPU_CHECK_SITE
# (/tmp/site), which goes on PYTHONPATH.
#
# The device command (the device tool's `run`, carry [".whl"], timeout_s 560): $OUT takes
# back at most 8 files, so the results travel as one archive beside the summary:
#   PYTHON=python3 profiling/gpu_check.sh /tmp/gpu_check; rc=$?;
#   tar czf $OUT/gpu_check.tgz -C /tmp gpu_check; cp /tmp/gpu_check/summary.txt $OUT/; exit $rc
set -uo pipefail

REHEARSE="${GPU_CHECK_REHEARSE:-0}"
if [[ ${1:-} == --rehearse ]]; then
  REHEARSE=1
  shift
fi
RESULTS="${1:?usage: profiling/gpu_check.sh [--rehearse] RESULTS_DIR}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
RESERVE="${GPU_CHECK_RESERVE_S:-10}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT_S:-60}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
export ASYNCDIFF_RT_RESULTS_DIR="$RESULTS" PYTHONUNBUFFERED=1
export REHEARSE_FAIL="${GPU_CHECK_REHEARSE_FAIL:-}" REHEARSE_SLOW="${GPU_CHECK_REHEARSE_SLOW:-}"
FAILED=0
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP CMD...: runs CMD under `timeout` (its cap, or what is left of the budget
# less the reserve), tees NAME.log. With CHECK set to a function, runs `$CHECK NAME` after
# it: its output ends the summary line and a non-zero status fails the step.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - SECONDS - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    note "$name: skipped (budget spent: ${SECONDS}s of ${BUDGET}s)"
    FAILED=$((FAILED + 1))
    return
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]} status=ok detail=""
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT after ${limit}s"
    ((limit < cap)) && status+=" (budget)"
  elif ((rc != 0)); then
    status="FAILED rc=$rc"
  fi
  if [[ -n ${CHECK:-} ]]; then
    detail="$("$CHECK" "$name" 2>&1)" || { [[ $status == ok ]] && status=FAILED; }
    detail="${detail//$'\n'/; }"
  fi
  [[ $status == ok ]] || FAILED=$((FAILED + 1))
  note "$name: $status ($((SECONDS - t0))s)${detail:+ $detail}"
}

# What a GPU-only step runs in a rehearsal: it says what it stands for and leaves a file.
stand_in() {
  local name="$1"
  shift
  echo "rehearsal: stands in for: $*"
  echo "$*" > "$RESULTS/$name.standin.txt"
  [[ " $REHEARSE_SLOW " == *" $name "* ]] && sleep 600
  [[ " $REHEARSE_FAIL " != *" $name "* ]] || { echo "rehearsal: $name fails on purpose"; return 1; }
}
export -f stand_in
export RESULTS

# gpu_step NAME CAP CMD...: step, or its stand-in in a rehearsal.
gpu_step() {
  if ((REHEARSE)); then
    step "$1" "$2" bash -c 'stand_in "$@"' stand_in "$1" "${@:3}"
  else
    step "$@"
  fi
}

# Counts of step NAME's JUnit report; fails when no test ran or every test skipped.
junit_counts() {
  "$PY" - "$RESULTS/$1.xml" << 'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"no JUnit report ({e})")
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests, skipped, failed, errors = (sum(int(s.get(k, 0)) for s in suites)
                                  for k in ("tests", "skipped", "failures", "errors"))
print(f"{tests - skipped - failed - errors} passed, {failed} failed, {errors} errors, {skipped} skipped")
if tests == 0:
    sys.exit("no test ran")
if skipped == tests:
    sys.exit(f"all {tests} tests skipped: no GPU test ran")
EOF
}

fail_fast() {
  note "preflight: FAILED $*"
  note "failed steps: 1 (stopped at the preflight, ${SECONDS}s)"
  exit 1
}

# ---------------------------------------------------------------- preflight, wheels, versions
if ((REHEARSE)); then
  note "preflight: rehearsal (no GPU needed; GPU steps run stand-ins)"
else
  nvidia-smi > "$RESULTS/nvidia_smi.log" 2>&1 || fail_fast "nvidia-smi found no GPU or driver (nvidia_smi.log)"
  # shellcheck disable=SC2016  # Python code
  "$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else f"torch {torch.__version__} at {torch.__file__} (CUDA build: "
         f"{torch.version.cuda}) sees no GPU: a CPU build first on the path? run with PYTHON= a python whose torch has CUDA")' \
    > "$RESULTS/preflight.log" 2>&1 || fail_fast "$(tail -1 "$RESULTS/preflight.log")"
  note "preflight: ok"
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  gpu_step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  ((REHEARSE)) || export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  note "wheels: none in $WHEELS/ (diffusers and nvtx must be installed already)"
fi
step versions 30 "$PY" -c '
import platform, shutil, subprocess, torch
from importlib import metadata
def out(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"
card = out(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "n/a"
nvcc = out(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else ["n/a"]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
print(f"python {platform.python_version()}, torch {torch.__version__} at {torch.__file__}; nvcc: {nvcc[0]}")
print(", ".join(f"{p} {version(p)}" for p in ("triton", "diffusers", "transformers", "nvtx", "cupy-cuda13x", "pytest-timeout")))
card = card or "n/a"
print(f"stack: torch {torch.__version__}, CUDA {torch.version.cuda}, card/driver/capability: {card}")'
grep -h "^stack:" "$RESULTS/versions.log" >> "$SUMMARY"

# ---------------------------------------------------------------- extension
# Editable install (the extension lands in asyncdiff_rt/), or a direct in-place build if pip
# cannot install; for this card's architecture only, then checked to be so.
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -1 | tr -d .)"
[[ $cap =~ ^[0-9]+$ ]] && export ASYNCDIFF_RT_CUDA_ARCHS="${ASYNCDIFF_RT_CUDA_ARCHS:-$cap}"
built_for_this_card() {  # the extension's architectures include this card's
  ((REHEARSE)) && return
  "$PY" -c 'import sys, asyncdiff_rt._C as C
archs = C.build_info()["cuda_archs"]
print(f"built for {archs}")
sys.exit(0 if sys.argv[1] in archs else f"not built for this card ({sys.argv[1]})")' "${ASYNCDIFF_RT_CUDA_ARCHS:-?}"
}
# shellcheck disable=SC2016  # $0 expands in the inner bash: the python given as its $0
CHECK=built_for_this_card gpu_step build 150 bash -c 'ASYNCDIFF_RT_BUILD_EXT=1 "$0" -m pip install -q --no-build-isolation --no-deps -e . ||
    ASYNCDIFF_RT_BUILD_EXT=1 "$0" setup.py build_ext --inplace' "$PY"
# Outside the repo root the package is found through the editable install or PYTHONPATH.
if ! (cd / && "$PY" -c 'import asyncdiff_rt' 2> /dev/null); then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step backend_info 60 "$PY" -c 'import json, asyncdiff_rt.backend as b; print(json.dumps(b.backend_info(), indent=1))'

# ---------------------------------------------------------------- tests
per_test=()
if "$PY" -c 'import pytest_timeout' 2> /dev/null; then
  per_test=(--timeout "$TEST_TIMEOUT")
else
  note "pytest-timeout missing: a hung test takes its step's whole limit"
fi
targets=(tests)
sanitized=(tests/test_executor_local_gpu.py)
if ((REHEARSE)); then  # "gpu and not distributed": one test, which skips; the others pass
  mkdir -p "$RESULTS/rehearsal"
  cat > "$RESULTS/rehearsal/test_stand_in.py" << 'EOF'
import pytest


@pytest.mark.gpu
def test_gpu_stand_in():
    pytest.skip("rehearsal: no GPU")


@pytest.mark.gpu
@pytest.mark.distributed
def test_gpu_distributed_stand_in():
    pass


@pytest.mark.gpu
@pytest.mark.distributed
def test_slow_streams_stand_in_eager():
    pass
EOF
  targets=("$RESULTS/rehearsal") sanitized=("$RESULTS/rehearsal")
fi
pytest_step() {  # NAME CAP MARKS PYTEST-ARGS...
  local name="$1" cap="$2" marks="$3"
  shift 3
  CHECK=junit_counts step "$name" "$cap" "$PY" -m pytest -m "$marks" -q -rs --durations=15 \
    -p no:cacheprovider "${per_test[@]}" --junitxml="$RESULTS/$name.xml" "$@"
}
pytest_step pytest_gpu 180 "gpu and not distributed" "${targets[@]}"
# Several processes on this GPU: CUDA IPC mailboxes and the distributed executor over them;
# NCCL's tests need two GPUs and skip on one.
pytest_step pytest_gpu_distributed 120 "gpu and distributed" "${targets[@]}"
# PyTorch's CUDA sanitizer fails a kernel that touches a tensor another stream used without
# an event, wait or sync ordering the two. It follows torch's own kernels, copies, events and
# streams (the test module moves transfers to the torch backend under it) but not graph
# replays: so the local executor's stream-ordering tests (slowed streams, a caller
# overwriting its tensors, slowed copies), eager, fp32, on streams.
TORCH_CUDA_SANITIZER=1 pytest_step pytest_gpu_sanitizer 90 gpu \
  -k "(slow_streams or copies_slower) and eager and not fp16 and not sm_partition" "${sanitized[@]}"

# ---------------------------------------------------------------- profile, projection, bench
# SD 1.5 at 512 on two virtual devices, recorded: Chrome trace, Gantt PNG, summary; then the
# latency of two Hopper GPUs on NVLink (the h100 link model) projected from the forward times it measured.
gpu_step profile 90 "$PY" -m asyncdiff_rt.cli profile -n 2 --out "$RESULTS/profile"
gpu_step projection 60 "$PY" -m asyncdiff_rt.cli project --model sd15 --height 512 --width 512 -n 2 \
  --times "$RESULTS/profile/timeline_summary.json" --links h100
if ((${GPU_CHECK_MEASURED:-0})); then
  gpu_step bench_transfer 35 "$PY" profiling/bench_transfer.py --out "$RESULTS"
  gpu_step bench_kernels 70 "$PY" profiling/bench_kernels.py --models sd15 --out "$RESULTS"
else
  note "bench_transfer, bench_kernels: not run (measured on the H100: profiling/results/gpu_check_nvidia_h100/;" \
    "GPU_CHECK_MEASURED=1 runs them)"
fi
# diffusers' context parallelism (Ulysses 2, ring 2) against the distributed executor at N=2
# and one process, on the tiny FLUX (fp16), one rank per GPU over NCCL: only with two GPUs
# visible (diffusers puts rank r on GPU r % the GPU count; NCCL refuses two ranks on one).
if ((REHEARSE)); then
  gpus="${GPU_CHECK_REHEARSE_GPUS:-2}"
else
  gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2> /dev/null || echo 0)"
fi
if ((gpus >= 2)); then
  gpu_step bench_context_parallel 90 "$PY" -m torch.distributed.run --nproc-per-node 2 -m asyncdiff_rt.cli \
    bench --context-parallel --repeats 2 --out "$RESULTS"
else
  note "bench_context_parallel: not run ($gpus GPU(s) visible; diffusers' context parallelism needs 2)"
fi
# The local executor's table (SD 1.5 fp16, 512 px, 50 steps) with what is left: it rewrites
# its table after every row and marks the rows that do not fit its budget skipped.
left=$((BUDGET - SECONDS - RESERVE))
gpu_step asyncdiff_bench "$left" "$PY" -m asyncdiff_rt.cli bench --out "$RESULTS" --repeats 2 \
  --budget-s $((left > 70 ? left - 45 : 25))

note "failed steps: $FAILED (total ${SECONDS}s of a ${BUDGET}s budget)"
exit "$FAILED"
