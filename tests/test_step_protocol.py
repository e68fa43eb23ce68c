"""The step protocol for frameworks without diffusers' schedulers: a k-diffusion-style
Euler loop over sigmas (as ComfyUI drives a UNet) through `parallelize_denoiser`."""
import warnings

import numpy as np
import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.models.configs import build_unet
from loop import unet_call_kwargs

warnings.filterwarnings("ignore")
STEPS = 6


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny-sd15", device="cpu", dtype=torch.float32).eval()


def schedule():
    """k-diffusion's setup from SD's training schedule: sigmas, log-spaced, and the
    fractional timestep each maps to (interpolated in log sigma, as samplers do)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas = np.cumprod(1 - betas)
    train = ((1 - alphas) / alphas) ** 0.5
    sigmas = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), STEPS))
    timesteps = np.interp(np.log(sigmas), np.log(train), np.arange(1000))
    return torch.tensor(sigmas, dtype=torch.float32), torch.tensor(timesteps, dtype=torch.float32)


def euler(model, unet, sigmas, timesteps):
    """k-diffusion's Euler sampler with classifier-free guidance, eps parameterisation."""
    kwargs = unet_call_kwargs(unet)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    with torch.no_grad():
        for i, (sigma, t) in enumerate(zip(sigmas, timesteps)):
            c_in = 1 / (sigma ** 2 + 1) ** 0.5
            eps = model(torch.cat([x * c_in] * 2), t, **kwargs).sample
            uncond, cond = eps.chunk(2)
            denoised = x - (uncond + 3.0 * (cond - uncond)) * sigma
            next_sigma = sigmas[i + 1] if i + 1 < len(sigmas) else torch.tensor(0.0)
            x = x + (x - denoised) / sigma * (next_sigma - sigma)
    return x


def test_an_euler_loop_over_sigmas_drives_the_wrapped_denoiser(unet):
    sigmas, timesteps = schedule()
    sequential = euler(unet, unet, sigmas, timesteps)
    out = {}
    for executor, warmup in (("reference", STEPS), ("reference", 1), ("local", 1)):
        handle = asyncdiff_rt.parallelize_denoiser(unet, n_components=2, warmup=warmup, executor=executor,
                                                   devices="cpu*2")
        try:
            for _ in range(2):  # a second generation starts with begin() again
                steps = handle.begin(timesteps)
                out[executor, warmup] = euler(handle.denoiser, unet, sigmas, steps)
            assert handle.stats()["generations"] == 2
        finally:
            handle.remove()
    assert torch.equal(out["reference", STEPS], sequential)  # W = K: the sequential loop exactly
    assert torch.equal(out["local", 1], out["reference", 1])
    assert not torch.equal(out["reference", 1], sequential)


def test_begin_refuses_what_is_no_list_of_timesteps(unet):
    handle = asyncdiff_rt.parallelize_denoiser(unet, n_components=2)
    try:
        with pytest.raises(ValueError, match="non-empty 1-D list of timesteps"):
            handle.begin(torch.zeros(2, 2))
    finally:
        handle.remove()
    with pytest.raises(TypeError, match="takes the denoiser module"):
        asyncdiff_rt.parallelize_denoiser(object())
