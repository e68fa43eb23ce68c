"""The handle and the pipeline around the wrapper: what stays readable after `remove()`,
saving, pipelines made from a parallelized one, a UNet assigned meanwhile."""
import warnings

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture
def pipe():
    return tiny_sd_pipeline("sd15")


def generate(pipe, steps=4):
    return pipe("a red cube", num_inference_steps=steps, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_plan_and_stats_stay_readable_after_remove(pipe):
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2")
    generate(pipe)
    plan, stats = handle.plan, handle.stats()
    handle.remove()
    handle.remove()  # twice is harmless
    assert handle.plan is plan and handle.stats() == stats and stats["generations"] == 1
    assert len(stats["weight_bytes_per_device"]) == 2


def test_remove_leaves_a_unet_assigned_meanwhile(pipe):
    original = pipe.unet
    handle = asyncdiff_rt.parallelize(pipe)
    other = tiny_sd_pipeline("sd15", seed=1).unet
    pipe.unet = other
    with pytest.raises(RuntimeError, match="replaced after parallelize.*left it in place"):
        handle.remove()
    assert pipe.unet is other and handle.original is original
    assert "forward" not in original.conv_in.__dict__ and original._asyncdiff_switch is None


def test_save_pretrained_writes_the_original_unet(pipe, tmp_path):
    sequential = generate(pipe)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2)
    try:
        pipe.save_pretrained(tmp_path)
        assert isinstance(pipe.unet, AsyncDenoiser)
    finally:
        handle.remove()
    assert "save_pretrained" not in pipe.__dict__
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is type(handle.original)
    for name in ("unet", "vae", "text_encoder"):  # what was written, exactly
        saved, original = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved), name
    # Equal weights at other addresses need not compute bit-identical latents (PyTorch
    # promises nothing there): measured 2026-12-03 on an AVX-512 AMD EPYC, one thread,
    # max |difference| 1.4e-5 on latents up to 15.3.
    torch.testing.assert_close(generate(loaded), sequential, atol=1e-4, rtol=0)


def test_pipelines_made_from_a_parallelized_one(pipe):
    sequential = generate(pipe)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=4)
    try:
        shared = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # same scheduler: it follows it
        image = torch.rand(1, 3, 16, 16)
        shared("a red cube", image=image, num_inference_steps=4, strength=1.0, output_type="latent")
        own = StableDiffusionPipeline.from_pipe(pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
        with pytest.raises(RuntimeError, match="from_pipe"):
            generate(own, steps=3)
    finally:
        handle.remove()
    # the derived pipeline still holds the wrapper: after remove() it is the plain UNet
    assert isinstance(own.unet, AsyncDenoiser)
    plain = StableDiffusionPipeline.from_pipe(pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    assert torch.equal(generate(own, steps=3), generate(plain, steps=3))
    assert torch.equal(generate(pipe), sequential)
