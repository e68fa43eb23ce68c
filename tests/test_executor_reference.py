"""SEMANTICS.md invariants of the reference executor on tiny UNets with real block layouts."""
import pytest
import torch

from asyncdiff_rt.models.configs import build_unet
from loop import denoise, denoise_async, scheduler

STEPS = 5


@pytest.fixture(scope="module")
def unets():
    return {f: build_unet(f"tiny-{f}", device="cpu", dtype=torch.float32).eval() for f in ("sd15", "sd21", "sdxl")}


@pytest.fixture(scope="module")
def sequential(unets):
    return {f: denoise(u, scheduler(), STEPS) for f, u in unets.items()}


@pytest.mark.parametrize("warmup", [1, 2, STEPS])
def test_one_component_is_the_sequential_denoiser(unets, sequential, warmup):
    out, _, _ = denoise_async(unets["sd15"], STEPS, n_components=1, warmup=warmup)
    assert torch.equal(out, sequential["sd15"])


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("n, stride", [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_warmup_over_all_steps_is_the_sequential_denoiser(unets, sequential, family, n, stride):
    out, stats, _ = denoise_async(unets[family], STEPS, n_components=n, stride=stride, warmup=STEPS)
    assert torch.equal(out, sequential[family])
    assert stats["warmup_forwards"] == STEPS and stats["transfers"] == 0


@pytest.mark.parametrize("n, stride, reuse", [(2, 1, "component"), (2, 2, "component"), (2, 2, "previous"), (3, 2, "component")])
def test_asynchronous_runs_are_deterministic_and_differ_from_sequential(unets, sequential, n, stride, reuse):
    first, _, _ = denoise_async(unets["sd15"], STEPS, n_components=n, stride=stride, warmup=1, stride_reuse=reuse)
    second, _, _ = denoise_async(unets["sd15"], STEPS, n_components=n, stride=stride, warmup=1, stride_reuse=reuse)
    assert torch.equal(first, second)
    assert not torch.allclose(first, sequential["sd15"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("n, stride, reuse, shift", [
    (2, 1, "component", False), (3, 1, "component", True), (2, 2, "component", False),
    (3, 2, "component", True), (2, 2, "previous", False),
])
def test_pruned_transfers_match_sending_everything(unets, family, n, stride, reuse, shift):
    settings = dict(n_components=n, stride=stride, warmup=2, stride_reuse=reuse, time_shift=shift, partition="upstream")
    pruned, pruned_stats, pruned_plan = denoise_async(unets[family], STEPS, **settings)
    full, full_stats, full_plan = denoise_async(unets[family], STEPS, prune=False, **settings)
    assert torch.equal(pruned, full)
    for few, every in zip(pruned_plan.transfers.receives, full_plan.transfers.receives):
        assert set(few) <= set(every)
    assert pruned_stats["transfers"] < full_stats["transfers"]


def test_a_missing_transfer_changes_the_result(unets):
    """The oracle simulates per-device caches: dropping a needed send must show."""
    import dataclasses

    settings = dict(n_components=2, stride=1, warmup=1, partition="upstream")
    good, _, plan = denoise_async(unets["sd15"], STEPS, **settings)
    receives = list(plan.transfers.receives)
    receives[1] = receives[1][1:]  # device 1 forgets one cache it reads
    broken = dataclasses.replace(plan, transfers=dataclasses.replace(plan.transfers, receives=tuple(receives)),
                                 _programs={})
    from asyncdiff_rt.async_denoiser import AsyncDenoiser
    from asyncdiff_rt.engine import make_executor

    sched = scheduler()
    runner = make_executor("reference", unets["sd15"], broken)
    try:
        bad = denoise(AsyncDenoiser(unets["sd15"], broken, runner, lambda: sched), sched, STEPS)
    finally:
        runner.close()
    assert not torch.equal(good, bad)


def test_stats_count_the_program(unets):
    _, stats, plan = denoise_async(unets["sd15"], 6, n_components=2, stride=2, warmup=1, generations=2)
    assert stats["generations"] == 2
    assert stats["steps"] == {"warmup": 2, "compute": 6, "reuse": 4}
    # compute steps 1, 3, 5 per generation; the last (5) runs only the stride device
    assert stats["forwards_per_device"] == [4, 4, 6]


def test_executor_leaves_the_unet_as_it_was(unets, sequential):
    denoise_async(unets["sd15"], STEPS, n_components=2, warmup=1)
    assert "forward" not in unets["sd15"].conv_in.__dict__
    assert torch.equal(denoise(unets["sd15"], scheduler(), STEPS), sequential["sd15"])
