import faulthandler
import os
import signal

import pytest
import torch

# The test models are tiny: one intra-op thread is several times faster than two
# (no thread hand-offs per op) and keeps results independent of the core count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A test that uses a GPU or starts processes fails past its limit instead of hanging until
# the GPU check's step cap (profiling/gpu_check.sh) ends the whole step. Measured
# 2026-12-03: on an H100 the 58 GPU tests took 115 s in all (profiling/results/
# gpu_check_nvidia_h100); on the shared 2-core CPU the slowest distributed test took 22 s
# at a quiet moment (pytest --durations, serial run of b67af23) and its launches took over 90 s
# at load 17 (forked ranks since: 13 s at most, -n 2, 6d81386).
# ASYNCDIFF_RT_TEST_TIMEOUT_S sets one limit for both; a test's `timeout(seconds)` mark wins.
LIMITS_S = {"gpu": 90.0, "distributed": 300.0}  # the first that applies: GPU before distributed
if "ASYNCDIFF_RT_TEST_TIMEOUT_S" in os.environ:
    LIMITS_S = dict.fromkeys(LIMITS_S, float(os.environ["ASYNCDIFF_RT_TEST_TIMEOUT_S"]))
STACKS_AFTER_S = 30  # stuck in C code past the limit (no Python runs to raise): dump stacks, exit
_terminal = {}


def pytest_configure(config):
    _terminal["stderr"] = os.dup(2)  # while a test runs, output capture points fd 2 elsewhere


def _limit_s(item):
    mark = item.get_closest_marker("timeout")
    if mark is not None:
        return float(mark.args[0])
    return next((LIMITS_S[mark] for mark in LIMITS_S if mark in item.keywords), None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = _limit_s(item)
    if limit is None or item.config.getoption("timeout", None):  # pytest-timeout's --timeout rules
        yield
        return

    def expire(signum, frame):
        pytest.fail(f"{item.nodeid} ran past its {limit:g} s limit", pytrace=True)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + STACKS_AFTER_S, exit=True, file=_terminal["stderr"])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tiny_graphs():
    """Units of the tiny SD 1.5, SD 2.1 and SDXL layouts: {family: (unet on meta, UnitGraph)}."""
    from asyncdiff_rt.models.configs import build_unet
    from asyncdiff_rt.trace import unet_inputs
    from asyncdiff_rt.units import find_units

    out = {}
    for family in ("sd15", "sd21", "sdxl"):
        unet = build_unet(f"tiny-{family}")
        out[family] = (unet, find_units(unet, unet_inputs(unet)))
    return out
