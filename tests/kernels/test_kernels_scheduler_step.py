"""The fused guided step: kernel against its torch reference, and 20-step loops against diffusers."""
import copy
import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from kernel_compare import assert_close

from asyncdiff_rt.kernels import fused_guided_step, install_fused_step, uninstall_fused_step
from asyncdiff_rt.kernels.scheduler_step import StepCoefficients, scheduler_step, scheduler_step_reference

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
GUIDANCE = 7.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("guided,second_order,clip", [(True, True, False), (False, False, True), (True, False, True)])
def test_kernel_matches_reference(dtype, guided, second_order, clip):
    gen = torch.manual_seed(0)
    shape = (3, 4, 3, 5)  # 180 elements: not a multiple of the block
    sample = torch.randn(shape, generator=gen).to(dtype)
    mo = torch.randn((6 if guided else 3, 4, 3, 5), generator=gen).to(dtype)
    x0_prev = torch.randn(shape, generator=gen).to(dtype) if second_order else None
    coef = StepCoefficients(a_x=1.3, a_e=-0.7, c_x=0.9, c_0=0.25, c_e=0.4, c_1=0.6 if second_order else 0.0,
                            clip=1.0 if clip else None)
    g = GUIDANCE if guided else None
    prev, x0 = scheduler_step(mo, sample, coef, g, x0_prev, prev_dtype=dtype, x0_dtype=torch.float32)
    ref_prev, ref_x0 = scheduler_step_reference(mo, sample, coef, g, x0_prev, prev_dtype=dtype, x0_dtype=torch.float32)
    assert prev.dtype == dtype and x0.dtype == torch.float32
    assert_close(x0, ref_x0, what=f"x0 {dtype}")
    assert_close(prev, ref_prev, what=f"prev {dtype}")


def test_kernel_launcher_rejects_with_the_fix():
    s = torch.randn(2, 4, 3, 5)
    coef = StepCoefficients(1.0, -1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="uncond; cond"):
        scheduler_step(torch.randn(2, 4, 3, 5), s, coef, guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        scheduler_step(torch.randn(2, 4, 5, 3).transpose(2, 3), s, coef)
    with pytest.raises(TypeError, match="float32"):
        scheduler_step(s.double(), s, coef)
    with pytest.raises(ValueError, match="x0_prev"):
        scheduler_step(s, s, StepCoefficients(1.0, -1.0, 0.0, 1.0, c_1=0.5))


SCHEDULERS = {
    "ddim": lambda p: DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=p),
    "ddim_clip": lambda p: DDIMScheduler(**SD, clip_sample=True, clip_sample_range=1.0, prediction_type=p),
    "euler": lambda p: EulerDiscreteScheduler(**SD, steps_offset=1, prediction_type=p),
    "dpmpp_2m": lambda p: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                      prediction_type=p),
    "dpmpp_2m_heun_karras": lambda p: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                                  solver_type="heun", use_karras_sigmas=True,
                                                                  prediction_type=p),
}


def _prediction(latents, t, k):
    """A stand-in for the batched UNet output: depends on the latents and the step, (2B, ...)."""
    gen = torch.Generator().manual_seed(1000 + k)
    noise = torch.randn((2, *latents.shape), generator=gen).to(latents.device)
    u = torch.tanh(0.5 * latents.float() + noise[0])
    c = torch.tanh(0.7 * latents.float() + noise[1] + float(t) / 1000)
    return torch.cat([u, c]).to(latents.dtype)


def _state(s):
    outs = [m for m in getattr(s, "model_outputs", []) if m is not None]
    return getattr(s, "_step_index", None), getattr(s, "lower_order_nums", None), outs


def _loop(scheduler, latents, mode):
    """20 steps the way SD pipelines drive a scheduler ("diffusers"), or fused."""
    for k, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(latents, t)
        pred = _prediction(scaled, t, k)
        if mode == "fused_guidance":
            latents = scheduler.step(pred, t, latents, guidance_scale=GUIDANCE, return_dict=False)[0]
        else:  # the stock pipeline: guidance in torch, then step (fused or not)
            u, c = pred.chunk(2)
            latents = scheduler.step(u + GUIDANCE * (c - u), t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_20_steps_match_diffusers(name, prediction):
    make = SCHEDULERS[name]
    latents = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(7))
    ref = make(prediction)
    ref.set_timesteps(20)
    expected = _loop(ref, latents * ref.init_noise_sigma, "diffusers")
    for mode in ("fused_step", "fused_guidance"):
        s = make(prediction)
        s.set_timesteps(20)
        install_fused_step(s)
        got = _loop(s, latents * s.init_noise_sigma, mode)
        assert got.dtype == expected.dtype
        assert_close(got, expected, atol=1e-4, rtol=1e-4, what=f"{name} {prediction} {mode}")
        (si, ni, outs), (se, ne, outs_e) = _state(s), _state(ref)
        assert (si, ni, len(outs)) == (se, ne, len(outs_e))
        for a, b in zip(outs, outs_e):
            assert a.dtype == b.dtype
            assert_close(a, b, atol=1e-4, rtol=1e-4, what=f"{name} model_outputs")


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_fp16_loop_keeps_dtypes_and_accuracy(name):
    # diffusers rounds to fp16 between ops, the kernel once per output, so compare both with the fp32 loop
    latents = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    results = {}
    for key, dtype, fused in (("fp32", torch.float32, False), ("diffusers", torch.float16, False),
                              ("fused", torch.float16, True)):
        s = SCHEDULERS[name]("epsilon")
        s.set_timesteps(20)
        if fused:
            install_fused_step(s)
        results[key] = _loop(s, latents.to(dtype) * s.init_noise_sigma, "diffusers")
    assert results["fused"].dtype == results["diffusers"].dtype == torch.float16
    err_diffusers = (results["diffusers"].float() - results["fp32"]).abs().max().item()
    err_fused = (results["fused"].float() - results["fp32"]).abs().max().item()
    assert err_fused <= 1.25 * err_diffusers + 1e-3, (name, err_fused, err_diffusers)


def test_one_step_outputs_and_return_dict():
    s = DDIMScheduler(**SD)
    s.set_timesteps(10)
    t, lat = s.timesteps[0], torch.randn(1, 4, 3, 5)
    pred = _prediction(lat, t, 0)
    out = fused_guided_step(s, pred, t, lat, guidance_scale=GUIDANCE)
    u, c = pred.chunk(2)
    ref = DDIMScheduler(**SD)
    ref.set_timesteps(10)
    exp = ref.step(u + GUIDANCE * (c - u), t, lat)
    assert type(out) is type(exp)
    assert_close(out.prev_sample, exp.prev_sample, what="prev")
    assert_close(out.pred_original_sample, exp.pred_original_sample, atol=1e-4, what="x0")


def test_install_keeps_the_signature_pipelines_inspect_and_uninstalls():
    s = DDIMScheduler(**SD)
    handle = install_fused_step(s)
    params = inspect.signature(s.step).parameters
    assert {"eta", "generator", "return_dict", "guidance_scale"} <= set(params)
    twin = copy.deepcopy(s)  # the fused step follows the copy, not the original
    assert twin.step.__self__ is twin
    handle.remove()
    assert "step" not in s.__dict__
    uninstall_fused_step(s)  # a second removal does nothing


def test_stochastic_calls_go_to_diffusers():
    s, ref = DDIMScheduler(**SD), DDIMScheduler(**SD)
    for x in (s, ref):
        x.set_timesteps(10)
    install_fused_step(s)
    t, lat = s.timesteps[2], torch.randn(1, 4, 3, 5)
    eps = _prediction(lat, t, 0)[:1]
    got = s.step(eps, t, lat, eta=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    exp = ref.step(eps, t, lat, eta=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(got, exp)


def test_without_triton_runtime_the_step_is_diffusers_own(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, ref = EulerDiscreteScheduler(**SD), EulerDiscreteScheduler(**SD)
    for x in (s, ref):
        x.set_timesteps(10)
    install_fused_step(s)
    lat = torch.randn(1, 4, 3, 5)
    got = _loop(s, lat, "fused_guidance")
    assert torch.equal(got, _loop(ref, lat, "diffusers"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        scheduler_step(lat, lat, StepCoefficients(1.0, -1.0, 0.0, 1.0))


def test_refuses_unsupported_schedulers_clearly():
    with pytest.raises(TypeError, match="PNDMScheduler is not supported.*DDIMScheduler"):
        install_fused_step(PNDMScheduler(**SD))
    with pytest.raises(ValueError, match="solver_order=3"):
        install_fused_step(DPMSolverMultistepScheduler(**SD, solver_order=3))
    with pytest.raises(ValueError, match="thresholding"):
        install_fused_step(DDIMScheduler(**SD, thresholding=True))
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        install_fused_step(EulerDiscreteScheduler(**SD, prediction_type="sample"))
