"""profiling/gpu_check.sh, rehearsed on the CPU: every step listed in summary.txt, a
failing step and an all-skipped pytest run counted, a step cut by the budget and the ones
after it reported, and without a GPU a stop at once with the reason."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "profiling" / "gpu_check.sh"
STEPS = ["wheels", "versions", "build", "backend_info", "pytest_gpu", "pytest_gpu_distributed",
         "pytest_gpu_sanitizer", "profile", "projection", "bench_context_parallel", "asyncdiff_bench"]


def check(results, *args, path=None, **env):
    env = {**os.environ, "PYTHON": sys.executable, **env}
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT), *args, str(results)], env=env, capture_output=True, text=True,
                          timeout=300)
    summary = (results / "summary.txt").read_text()
    return done.returncode, {line.split(":")[0]: line for line in summary.splitlines()}


@pytest.fixture
def wheels(tmp_path):
    """A wheel folder for the `wheels` step (its stand-in installs nothing)."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "stand_in-0-py3-none-any.whl").write_text("")
    return folder


@pytest.mark.slow
def test_rehearsal_lists_every_step_and_counts_failures(tmp_path, wheels):
    rc, lines = check(tmp_path / "out", "--rehearse", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_REHEARSE_FAIL="profile")
    for name in STEPS:
        assert name in lines, (name, lines)
    assert lines["pytest_gpu"].startswith("pytest_gpu: FAILED") and "all 1 tests skipped" in lines["pytest_gpu"]
    assert lines["pytest_gpu_distributed"].startswith("pytest_gpu_distributed: ok") and "2 passed" in \
        lines["pytest_gpu_distributed"]
    assert lines["pytest_gpu_sanitizer"].startswith("pytest_gpu_sanitizer: ok") and "1 passed" in \
        lines["pytest_gpu_sanitizer"]
    assert lines["profile"].startswith("profile: FAILED rc=1")
    assert all(lines[name].startswith(f"{name}: ok") for name in STEPS if name not in ("pytest_gpu", "profile"))
    assert "bench_transfer, bench_kernels: not run" in lines["bench_transfer, bench_kernels"]
    assert rc == 2 and lines["failed steps"].startswith("failed steps: 2 ")
    assert (tmp_path / "out" / "pytest_gpu.xml").exists() and (tmp_path / "out" / "versions.log").exists()


def test_a_step_past_the_budget_is_cut_and_the_rest_reported(tmp_path, wheels):
    """Budget 16 s less a reserve of 10: the first step (a stand-in that hangs) gets 6 s."""
    rc, lines = check(tmp_path, "--rehearse", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_BUDGET_S="16",
                      GPU_CHECK_RESERVE_S="10", GPU_CHECK_REHEARSE_SLOW="wheels")
    assert lines["wheels"].startswith("wheels: TIMEOUT after 6s (budget)")
    later = STEPS[1:]
    assert all(lines[name].startswith(f"{name}: skipped (budget spent") for name in later), lines
    assert rc == len(STEPS) and lines["failed steps"].startswith(f"failed steps: {len(STEPS)} ")


def test_the_context_parallel_bench_waits_for_two_gpus(tmp_path, wheels):
    """With one GPU the step is noted, not run nor failed (budget 0: nothing else runs)."""
    rc, lines = check(tmp_path, "--rehearse", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_BUDGET_S="0",
                      GPU_CHECK_REHEARSE_GPUS="1")
    assert lines["bench_context_parallel"] == ("bench_context_parallel: not run (1 GPU(s) visible; diffusers' "
                                               "context parallelism needs 2)")
    assert rc == len(STEPS) - 1  # every other step skipped for the budget


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop without a GPU")
@pytest.mark.parametrize("nvidia_smi, reason", [
    ("exit 9", "nvidia-smi found no GPU or driver"),
    ("exit 0", r"torch .* sees no GPU: a CPU build first on the path\?"),  # a driver, but a CPU torch
])
def test_without_a_gpu_it_stops_at_once(tmp_path, nvidia_smi, reason):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    rc, lines = check(tmp_path / "out", path=bin_dir)
    assert rc == 1 and lines["preflight"].startswith("preflight: FAILED")
    import re

    assert re.search(reason, lines["preflight"]), lines["preflight"]
    assert list(lines) == ["preflight", "failed steps"]  # nothing else ran
