"""The runtime's own step cache (SEMANTICS.md "Step caches", docs/STEP_CACHE.md): a skip
list in the program. A never-skipping cache equals no cache; N = 1 with skips equals a
plain sequential loop running the same rule; local equals reference bit for bit; bad
input is refused before any work and leaves the pipeline usable."""
import pytest
import torch
import torch.utils._pytree as pytree

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.schedule import Emit, TransferPlan, build_program
from asyncdiff_rt.step_cache import StepCache, choose_skips
from asyncdiff_rt.trace import unet_inputs
from loop import denoise, scheduler, unet_call_kwargs

STEPS = 6


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny-sd15", device="cpu", dtype=torch.float32).eval()


def run(unet, skip, executor="reference", devices=None, **settings):
    """`denoise` through an AsyncDenoiser with the step cache `skip` (None: no cache)."""
    sched = scheduler()
    plan = make_plan(unet, unet_inputs(unet), **settings)
    runner = make_executor(executor, unet, plan, devices=devices)
    try:
        wrapper = AsyncDenoiser(unet, plan, runner, lambda: sched)
        wrapper.step_cache = None if skip is None else StepCache(skip)
        return denoise(wrapper, sched, STEPS), runner.stats.as_dict()
    finally:
        runner.close()


def sequential_with_skips(unet, skip):
    """The oracle: `loop.denoise` where a skipped step reuses the prediction before it."""
    sched = scheduler()
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    kwargs = unet_call_kwargs(unet, 0)
    eps = None
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            if k not in skip:
                eps = unet(torch.cat([latents] * 2), t, **kwargs, return_dict=False)[0]
            uncond, cond = eps.chunk(2)
            latents = sched.step(uncond + 3.0 * (cond - uncond), t, latents).prev_sample
    return latents


# ---------------------------------------------------------------- the program
def transfers(n_devices):
    return TransferPlan(owner={}, receives=((),) * n_devices, reads_latent=(False,) * n_devices, emit_reads=())


def test_a_skipped_step_runs_nothing_and_emits_the_prediction_before():
    program = build_program(8, 2, 1, 2, transfers(2), skip=[3, 6])
    for step in program.steps:
        if step.index in (3, 6):
            assert step.phase == "skip" and step.instructions == (Emit("previous"),)
        else:
            assert step.phase != "skip" and step.forwards()
    assert "skip=[3, 6]" in str(program)


def test_with_stride_2_a_skip_replaces_a_whole_compute_reuse_pair():
    program = build_program(8, 1, 2, 2, transfers(3), skip=[3, 4, 7])  # pairs (1,2) (3,4) (5,6), last 7
    assert [s.phase for s in program.steps] == [
        "warmup", "compute", "reuse", "skip", "skip", "compute", "reuse", "skip"]


@pytest.mark.parametrize("skip, stride, words", [
    ([1], 1, "inside the warm-up"),
    ([8], 1, "has 8 steps"),
    ([True], 1, "integers"),
    ([3], 2, "pair 3, 4"),
    ([4], 2, "pair 3, 4"),
])
def test_a_skip_list_no_program_has_is_refused(skip, stride, words):
    with pytest.raises(ValueError, match=words):
        build_program(8, 2 if stride == 1 else 1, stride, 2, transfers(1 + stride), skip=skip)


# ---------------------------------------------------------------- calibration
def test_choose_skips_accumulates_relative_changes_up_to_the_threshold():
    # predictions with relative L1 changes 1.0, 0.1, 0.1, 0.1, 0.5, 0.1 at steps 1..6
    values = [1.0, 2.0, 2.2, 2.42, 2.662, 3.993, 4.3923]
    preds = [torch.full((4,), v) for v in values]
    assert choose_skips(preds, 0.0) == []
    assert choose_skips(preds, 0.25) == [2, 3, 6]  # 0.1 + 0.1; 0.1 more would pass 0.25; 0.5 computes; 0.1
    assert choose_skips(preds, 0.25, warmup=3) == [3, 4, 6]
    assert choose_skips(preds, 0.25, stride=2) == [3, 4]  # pairs (1,2) 1.1 (3,4) 0.2 (5,6) 0.6
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="threshold"):
            choose_skips(preds, bad)


# ---------------------------------------------------------------- what is computed
def test_a_never_skipping_cache_equals_no_cache_bit_for_bit(unet):
    plain, _ = run(unet, None, n_components=2)
    cached, stats = run(unet, [], n_components=2)
    assert torch.equal(plain, cached) and "skip" not in stats["steps"]


def test_n1_with_skips_equals_the_sequential_loop_running_the_same_rule(unet):
    skip = [2, 3, 5]
    out, stats = run(unet, skip, n_components=1, warmup=1)
    assert torch.equal(out, sequential_with_skips(unet, skip))
    assert stats["steps"]["skip"] == 3
    assert not torch.equal(out, sequential_with_skips(unet, []))  # the skips change the result


@pytest.mark.parametrize("settings, skip", [
    (dict(n_components=2, warmup=1), [2, 4]),
    (dict(n_components=2, warmup=2, time_shift=True), [2, 5]),
    (dict(n_components=2, stride=2, warmup=1), [3, 4]),
    (dict(n_components=2, stride=2, warmup=1, stride_reuse="previous"), [1, 2, 5]),
])
def test_local_equals_reference_bit_for_bit(unet, settings, skip):
    ref, ref_stats = run(unet, skip, **settings)
    n_devices = settings["n_components"] + settings.get("stride", 1) - 1
    out, stats = run(unet, skip, "local", devices=f"cpu*{n_devices}", **settings)
    assert torch.equal(out, ref)
    assert stats["steps"] == ref_stats["steps"] and stats["steps"]["skip"] == len(skip)
    assert stats["forwards_per_device"] == ref_stats["forwards_per_device"]
    assert stats["transfers"] == ref_stats["transfers"]
    uncached, _ = run(unet, None, **settings)
    assert not torch.equal(ref, uncached)


# ---------------------------------------------------------------- through parallelize
@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def generate(pipe, steps=4, **kwargs):
    return pipe("a cube", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="pt", **kwargs).images


def test_calibrate_chooses_from_one_sequential_generation(pipe):
    from asyncdiff_rt.step_cache import calibrate, record_predictions

    predictions = record_predictions(pipe.unet, lambda: generate(pipe, 4))
    assert len(predictions) == 4
    cache = calibrate(pipe, 1.0, "a cube", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="pt")
    assert cache.skip == tuple(choose_skips(predictions, 1.0)) and cache.skip
    assert calibrate(pipe, 0.0, "a cube", num_inference_steps=4).skip == ()


def test_parallelize_refuses_bad_caches_before_any_work(pipe):
    unet = pipe.unet
    with pytest.raises(ValueError, match="inside the warm-up"):
        asyncdiff_rt.parallelize(pipe, warmup=2, step_cache=[1, 3])
    with pytest.raises(ValueError, match="integers >= 0"):
        asyncdiff_rt.parallelize(pipe, step_cache=[-1])
    with pytest.raises(TypeError, match="list of step indices"):
        asyncdiff_rt.parallelize(pipe, step_cache="3")
    assert pipe.unet is unet  # nothing was swapped


def test_a_step_out_of_range_is_refused_at_the_call_and_the_pipeline_stays_usable(pipe):
    handle = asyncdiff_rt.parallelize(pipe, step_cache=[5])
    try:
        with pytest.raises(ValueError, match="has 4 steps"):
            generate(pipe, 4)
        assert handle.stats()["warmup_forwards"] == 0  # refused before any forward
        handle.set_step_cache([3])
        cached = generate(pipe, 4)
        assert handle.stats()["steps"]["skip"] == 1
    finally:
        handle.remove()
    assert cached.shape[0] == 1


def test_the_cache_cannot_change_inside_a_generation(pipe):
    handle = asyncdiff_rt.parallelize(pipe, step_cache=[2])
    refused = []

    def change(p, i, t, kw):
        try:
            handle.set_step_cache([3])
        except RuntimeError as e:
            refused.append(str(e))
        return kw

    try:
        generate(pipe, 4, callback_on_step_end=change)
        # refused after steps 0..2; after the last step's denoiser call the generation is over
        assert len(refused) == 3 and "between generations" in refused[0]
        assert handle.denoiser.step_cache.skip == (3,)
    finally:
        handle.remove()


# ---------------------------------------------------------------- several processes
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("n, s, skip", [(2, 1, [2, 5, 7]), (2, 2, [3, 4, 7])])
def test_distributed_equals_the_reference_bit_for_bit(tmp_path, n, s, skip):
    from asyncdiff_rt.models.tiny_t2i import load_tiny
    from test_executor_distributed import PROMPTS, STEPS as DSTEPS, _ok, launch

    results = launch(tmp_path, n + s - 1, n, s, DSTEPS, "--step-cache", ",".join(map(str, skip)))
    _ok(results)
    pipe = load_tiny()
    handle = asyncdiff_rt.parallelize(pipe, n_components=n, stride=s, warmup=1, executor="reference",
                                      step_cache=skip)
    expected = pipe(PROMPTS, num_inference_steps=DSTEPS, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    handle.remove()
    for rank in results:
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected), f"rank {rank} differs"
        assert results[rank][1]["stats"]["steps"]["skip"] == len(skip)
