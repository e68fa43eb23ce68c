"""`tune`: the fastest configuration within a quality bound, on fake device topologies
(PCIe without P2P, NVLink pairs, one device) and on cpu*N; bad input refused before work."""
import warnings

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt import topology
from asyncdiff_rt.tune import config_settings, tune

warnings.filterwarnings("ignore")
FAST = dict(calibration_prompts=["a red circle", "a big blue square"], calibration_steps=4, steps=20,
            warmups=(1,), partitions=("auto", "upstream"), log=lambda *_: None)


class Untouchable:
    """A pipeline any work would touch: refusals must come first."""

    def __getattr__(self, name):
        raise AssertionError(f"tune touched the pipeline ({name}) before refusing")


@pytest.fixture(scope="module")
def pipe():
    from asyncdiff_rt.models.tiny_t2i import load_tiny

    return load_tiny()


@pytest.mark.parametrize("bound", [0, -3, 100, 250.0, float("nan"), "30", True])
def test_a_quality_bound_out_of_range_is_refused_first(bound):
    with pytest.raises(ValueError, match="min_psnr_db.*between 0 and 100"):
        tune(Untouchable(), "cpu*2", min_psnr_db=bound)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_devices_it_cannot_see_are_refused_first():
    with pytest.raises(ValueError, match="sees no GPU"):
        tune(Untouchable(), ["cuda:0", "cuda:3"])
    with pytest.raises(ValueError, match="virtual devices"):
        topology.check_devices("cuda:0*2")
    with pytest.raises(ValueError, match="memory_budget"):
        tune(Untouchable(), "cpu*2", memory_budget=-1)
    with pytest.raises(ValueError, match="partitions"):
        tune(Untouchable(), "cpu*2", partitions=("balanced",))


def test_one_device_gets_one_device(pipe):
    result = tune(pipe, topology=topology.single(), **FAST)
    assert result.one_device and result.runner_up is None and not result.candidates
    assert "one device" in result.reason
    with pytest.raises(ValueError, match="recommends one device"):
        config_settings(pipe, result)


def test_pcie_without_p2p_bounces_and_the_pick_is_the_fastest_within_the_bound(pipe):
    result = tune(pipe, topology=topology.pcie(4, p2p=False), min_psnr_db=20, **FAST)
    assert not result.one_device
    assert {c.transport for c in result.candidates if c.executor == "local"} == {"host bounce"}
    assert "ipc" not in {c.transport for c in result.candidates}  # ipc needs P2P
    best = result.best
    assert best.psnr_db >= 20 and best.speedup > 1
    first = result.measured.index(best)  # measured from the fastest: those before it are faster but worse
    assert all(c.psnr_db < 20 and c.latency_s <= best.latency_s for c in result.measured[:first])
    assert result.runner_up.latency_s >= best.latency_s


def test_nvlink_pairs_are_faster_than_bounces_for_the_same_configuration(pipe):
    bounce = tune(pipe, topology=topology.pcie(4, p2p=False), min_psnr_db=10, **FAST)
    bridged = tune(pipe, topology=topology.nvlink_pairs(4), min_psnr_db=10, times=bounce.times, **FAST)
    key = lambda c: (c.n_components, c.stride, c.warmup, c.split, c.executor, c.transport)  # noqa: E731
    slow = {key(c): c.latency_s for c in bounce.candidates}
    same = [(c.latency_s, slow[key(c)]) for c in bridged.candidates if key(c) in slow]
    assert same and all(fast <= slow_ for fast, slow_ in same)
    assert any(fast < slow_ for fast, slow_ in same)
    assert {c.transport for c in bridged.candidates if c.n_components == 2 and c.stride == 1} >= {"peer copies"}


def test_a_memory_budget_drops_splits_that_do_not_fit(pipe):
    whole = pipe.unet
    weights = sum(p.numel() * p.element_size() for p in whole.parameters())
    budget = int(weights * 0.6)  # no device may hold more than 60% of the weights
    result = tune(pipe, topology=topology.pcie(4), min_psnr_db=10, memory_budget=budget, **FAST)
    assert result.candidates and all(max(c.weight_bytes_per_device) <= budget for c in result.candidates)
    nothing = tune(pipe, topology=topology.pcie(4), min_psnr_db=10, memory_budget=1024, **FAST)
    assert nothing.one_device and not nothing.candidates and "does not fit" in nothing.reason


def test_cpu_result_applies_through_parallelize_config(pipe):
    result = tune(pipe, "cpu*3", min_psnr_db=10, **FAST)
    assert all(c.executor == "local" and c.devices.startswith("cpu*") for c in result.candidates)
    if result.one_device:
        pytest.skip("nothing projected faster than one device on this CPU run")
    handle = asyncdiff_rt.parallelize(pipe, config=result)
    try:
        plan = handle.plan
        assert (plan.n_components, plan.stride, plan.warmup) == (result.best.n_components, result.best.stride,
                                                                 result.best.warmup)
        assert [list(c) for c in plan.partition.components] == result.best.partition
        assert handle.stats()["executor"] == "local"
    finally:
        handle.remove()


@pytest.mark.parametrize("argv, message", [
    (["--min-psnr", "0", "--devices", "cpu*2"], "between 0 and 100"),
    (["--devices", "cuda:99"], "sees"),
    (["--rig", "infiniband:4"], "pcie:N"),
])
def test_the_command_refuses_bad_input_before_loading_a_model(argv, message, capsys, monkeypatch):
    from asyncdiff_rt import cli
    from asyncdiff_rt.models import tiny_t2i

    monkeypatch.setattr(tiny_t2i, "load_tiny", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(SystemExit) as refused:
        cli.main(["tune", *argv])
    assert refused.value.code == 2 and message in capsys.readouterr().err
