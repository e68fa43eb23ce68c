"""`parallelize` on diffusers pipelines: drop-in behaviour, invariants, and refusals."""
import warnings

import pytest
import torch
from diffusers import HeunDiscreteScheduler

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 4


def generate(pipe, steps=STEPS, seed=0, **kwargs):
    return pipe("a red cube", num_inference_steps=steps, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd_pipeline("sd15")


@pytest.fixture(scope="module")
def sd15_sequential(sd15):
    return generate(sd15)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sd_pipeline("sdxl")


def test_drop_in_keeps_the_denoiser_interface(sd15):
    original, config = sd15.unet, dict(sd15.config)
    handle = asyncdiff_rt.parallelize(sd15, n_components=2, warmup=1)
    try:
        assert isinstance(sd15.unet, AsyncDenoiser)
        assert sd15.unet.config is original.config and sd15.unet.dtype == original.dtype
        assert dict(sd15.config) == config  # the pipeline's own config is untouched
        assert handle.plan.n_components == 2
    finally:
        handle.remove()
    assert sd15.unet is original


def test_warmup_over_all_steps_and_one_component_are_sequential(sd15, sd15_sequential):
    for settings in (dict(n_components=2, warmup=STEPS), dict(n_components=3, stride=2, warmup=STEPS),
                     dict(n_components=1, warmup=1)):
        handle = asyncdiff_rt.parallelize(sd15, **settings)
        try:
            assert torch.equal(generate(sd15), sd15_sequential), settings
        finally:
            handle.remove()


def test_each_call_starts_a_new_generation(sd15, sd15_sequential):
    handle = asyncdiff_rt.parallelize(sd15, n_components=2, stride=2, warmup=1)
    try:
        first = generate(sd15)
        assert torch.equal(generate(sd15), first)
        generate(sd15, steps=STEPS + 2)  # another step count: another program
        stats = handle.stats()
        assert stats["generations"] == 3 and stats["executor"] == "reference"
        assert sum(stats["steps"].values()) == 3 * STEPS + 2
        assert not torch.equal(first, sd15_sequential)
    finally:
        handle.remove()
    assert torch.equal(generate(sd15), sd15_sequential)  # removed: exactly as before


def test_sdxl_pipeline(sdxl):
    sequential = generate(sdxl)
    handle = asyncdiff_rt.parallelize(sdxl, n_components=2, warmup=STEPS, partition="upstream")
    try:
        assert torch.equal(generate(sdxl), sequential)
        assert handle.plan.partition.strategy == "upstream:sdxl"
    finally:
        handle.remove()


def test_img2img_with_strength_follows_the_scheduler():
    pipe = tiny_sd_pipeline("sd15", img2img=True)
    image = torch.rand(1, 3, 16, 16)

    def run():
        return generate(pipe, steps=8, image=image, strength=0.5)

    sequential = run()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=4)  # 8 * 0.5 = 4 steps run
    try:
        assert torch.equal(run(), sequential)
        assert handle.stats()["steps"] == {"warmup": 4}
    finally:
        handle.remove()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=1)
    try:
        run()
        assert handle.stats()["steps"] == {"warmup": 1, "async": 3}
    finally:
        handle.remove()


def test_repeated_timesteps_of_second_order_schedulers():
    pipe = tiny_sd_pipeline("sd15", scheduler=HeunDiscreteScheduler(beta_schedule="scaled_linear"))
    sequential = generate(pipe, steps=3)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=5)  # Heun: 2*3-1 = 5 calls
    try:
        assert torch.equal(generate(pipe, steps=3), sequential)
    finally:
        handle.remove()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n_components=0), ValueError, "n_components"),
    (dict(n_components=1000), ValueError, "from 1 to"),
    (dict(stride=3), ValueError, "stride"),
    (dict(warmup=0), ValueError, "warmup"),
    (dict(stride_reuse="last"), ValueError, "stride_reuse"),
    (dict(partition=[["conv_in"], ["nonexistent", "conv_out"]]), ValueError, "names no unit"),
    (dict(partition="upstream", n_components=5), ValueError, "no table"),
    (dict(devices=["cpu"]), ValueError, "list 2 devices"),
    (dict(executor="magic"), ValueError, "executor"),
])
def test_bad_settings_are_refused_before_any_work(sd15, kwargs, error, message):
    original = sd15.unet
    with pytest.raises(error, match=message):
        asyncdiff_rt.parallelize(sd15, **kwargs)
    assert sd15.unet is original and "forward" not in original.conv_in.__dict__


def test_unsupported_objects_are_refused(sd15):
    with pytest.raises(TypeError, match="diffusers pipeline"):
        asyncdiff_rt.parallelize(sd15.unet)
    with pytest.raises(TypeError, match="diffusers pipeline"):
        asyncdiff_rt.parallelize(object())
    handle = asyncdiff_rt.parallelize(sd15)
    try:
        with pytest.raises(ValueError, match="already parallelized"):
            asyncdiff_rt.parallelize(sd15)
    finally:
        handle.remove()


def test_warmup_longer_than_the_call_is_refused_at_the_first_step(sd15, sd15_sequential):
    calls = []
    hook = sd15.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))  # before: a hook is a change
    handle = asyncdiff_rt.parallelize(sd15, n_components=2, warmup=STEPS + 1)
    calls.clear()  # the trace ran it
    try:
        with pytest.raises(ValueError, match="more than the 4 denoising steps"):
            generate(sd15)
        assert calls == []
        assert generate(sd15, steps=STEPS + 1) is not None  # the same handle works for a long enough call
    finally:
        handle.remove()
        hook.remove()
