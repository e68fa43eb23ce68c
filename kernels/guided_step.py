"""`scheduler.step` through the fused kernel, with the scheduler's state kept as diffusers keeps it.

Two ways in:

* `fused_guided_step(scheduler, noise_pred, t, latents, guidance_scale=7.5)` for
  your own loop: `noise_pred` is the batched (2B, ...) UNet output, unconditional
  half first (the order SD pipelines concatenate), and guidance happens in the
  same launch as the update. Without `guidance_scale` it is a plain step.
* `install_fused_step(scheduler)` replaces `scheduler.step` on that instance, with
  the original signature plus a keyword-only `guidance_scale`. Stock pipelines
  keep calling `step(noise_pred, t, latents, **extra, return_dict=False)` after
  their own guidance combine and get the fused update; a custom loop can pass the
  batched prediction and `guidance_scale=` to fuse guidance too. `.remove()` (or
  `uninstall_fused_step`) puts diffusers' step back.

Supported: DDIMScheduler (eta = 0), EulerDiscreteScheduler (s_churn = 0) and
DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2), with
prediction_type "epsilon" or "v_prediction". Other classes and configurations are
refused up front. Calls that need noise (DDIM eta > 0, Euler churn), and tensors
Triton cannot reach, go to diffusers' own step (after a torch guidance combine).
"""
from __future__ import annotations

import functools
import inspect
import math
import types

import torch

from ._runtime import logger, unavailable_reason

_PREDICTIONS = ("epsilon", "v_prediction")
_MARK = "_asyncdiff_fused_step"
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def _f(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


# ------------------------------------------------------------------ per scheduler

def _ddim_refusal(s) -> str | None:
    if s.config.thresholding:
        return "thresholding=True (dynamic thresholding needs a quantile over the whole sample)"
    return None


def _ddim_step(s, mo, timestep, sample, g, kw):
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    from .scheduler_step import StepCoefficients, scheduler_step

    if s.num_inference_steps is None:
        raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
    if kw.get("eta", 0.0) != 0.0 or (kw.get("use_clipped_model_output") and s.config.clip_sample):
        return None  # stochastic, or eps re-derived from the clipped x0: diffusers' step
    t = int(timestep)
    prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = s.alphas_cumprod[t]
    a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
    b_t = 1 - a_t
    dir_ = (1 - a_prev) ** 0.5  # sqrt(1 - alpha_prev - std^2) with std = 0
    if s.config.prediction_type == "epsilon":  # x0 = (x - sqrt(b) e) / sqrt(a); eps = e
        coef = dict(a_x=1 / a_t**0.5, a_e=-(b_t**0.5) / a_t**0.5, c_x=0.0, c_e=dir_)
    else:  # x0 = sqrt(a) x - sqrt(b) v; eps = sqrt(a) v + sqrt(b) x
        coef = dict(a_x=a_t**0.5, a_e=-(b_t**0.5), c_x=dir_ * b_t**0.5, c_e=dir_ * a_t**0.5)
    clip = _f(s.config.clip_sample_range) if s.config.clip_sample else None
    out_dtype = torch.promote_types(sample.dtype, mo.dtype)
    prev, x0 = scheduler_step(mo, sample, StepCoefficients(**{k: _f(v) for k, v in coef.items()},
                                                           c_0=_f(a_prev**0.5), clip=clip),
                              guidance_scale=g, prev_dtype=out_dtype, x0_dtype=out_dtype)
    return (prev, x0), DDIMSchedulerOutput


def _euler_refusal(s) -> str | None:
    return None


def _euler_step(s, mo, timestep, sample, g, kw):
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    from .scheduler_step import StepCoefficients, scheduler_step

    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                         "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                         "`scheduler.timesteps` as a timestep.")
    if s.step_index is None:
        s._init_step_index(timestep)
    sigma = s.sigmas[s.step_index]
    s_tmin, s_tmax = kw.get("s_tmin", 0.0), kw.get("s_tmax", float("inf"))
    if kw.get("s_churn", 0.0) > 0 and s_tmin <= sigma <= s_tmax:
        return None  # churn adds noise: diffusers' step (the step index is already what it would set)
    if not s.is_scale_input_called:
        logger.warning("The `scale_model_input` function should be called before `step` to ensure correct denoising.")
    sig, dt = _f(sigma), _f(s.sigmas[s.step_index + 1] - sigma)
    if s.config.prediction_type == "epsilon":  # x0 = x - sigma e
        a_x, a_e = 1.0, -sig
    else:  # x0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)
        a_x, a_e = 1.0 / (sig**2 + 1), -sig / math.sqrt(sig**2 + 1)
    # prev = x + (x - x0) / sigma * dt
    coef = StepCoefficients(a_x=a_x, a_e=a_e, c_x=1.0 + dt / sig, c_0=-dt / sig)
    prev, x0 = scheduler_step(mo, sample, coef, guidance_scale=g, prev_dtype=mo.dtype, x0_dtype=torch.float32)
    s._step_index += 1
    return (prev, x0), EulerDiscreteSchedulerOutput


def _dpm_refusal(s) -> str | None:
    c = s.config
    if c.algorithm_type != "dpmsolver++" or c.solver_order != 2:
        return f'algorithm_type={c.algorithm_type!r}, solver_order={c.solver_order} (only "dpmsolver++" order 2: 2M)'
    if c.thresholding:
        return "thresholding=True (dynamic thresholding needs a quantile over the whole sample)"
    if c.variance_type in ("learned", "learned_range"):
        return f"variance_type={c.variance_type!r} (the model output carries a variance half)"
    return None


def _dpm_step(s, mo, timestep, sample, g, kw):
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    from .scheduler_step import StepCoefficients, scheduler_step

    if s.num_inference_steps is None:
        raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
    if s.step_index is None:
        s._init_step_index(timestep)
    c, i = s.config, s.step_index
    lower_order_final = (i == len(s.timesteps) - 1) and (
        c.euler_at_final or (c.lower_order_final and len(s.timesteps) < 15) or c.final_sigmas_type == "zero")
    first_order = s.lower_order_nums < 1 or lower_order_final

    alpha_s0, sigma_s0 = s._sigma_to_alpha_sigma_t(s.sigmas[i])
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(s.sigmas[i + 1])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    if c.prediction_type == "epsilon":  # x0 = (x - sigma e) / alpha
        a_x, a_e = 1 / alpha_s0, -sigma_s0 / alpha_s0
    else:  # x0 = alpha x - sigma v
        a_x, a_e = alpha_s0, -sigma_s0
    c_0 = -(alpha_t * (torch.exp(-h) - 1.0))
    c_1 = 0.0
    if not first_order:  # D1 = (m0 - m1) / r0 with the midpoint or Heun weight
        alpha_s1, sigma_s1 = s._sigma_to_alpha_sigma_t(s.sigmas[i - 1])
        r0 = (lambda_s0 - (torch.log(alpha_s1) - torch.log(sigma_s1))) / h
        if c.solver_type == "midpoint":
            c_1 = -0.5 * (alpha_t * (torch.exp(-h) - 1.0)) / r0
        else:
            c_1 = (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) / r0
    coef = StepCoefficients(a_x=_f(a_x), a_e=_f(a_e), c_x=_f(sigma_t / sigma_s0), c_0=_f(c_0), c_1=_f(c_1))
    out_dtype = torch.promote_types(sample.dtype, mo.dtype)  # x0's dtype, which prev is cast to
    prev, x0 = scheduler_step(mo, sample, coef, guidance_scale=g, x0_prev=s.model_outputs[-1],
                              prev_dtype=out_dtype, x0_dtype=out_dtype)
    for k in range(c.solver_order - 1):
        s.model_outputs[k] = s.model_outputs[k + 1]
    s.model_outputs[-1] = x0
    if s.lower_order_nums < c.solver_order:
        s.lower_order_nums += 1
    s._step_index += 1
    return (prev,), SchedulerOutput


def _rules():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return {DDIMScheduler: (_ddim_refusal, _ddim_step),
            EulerDiscreteScheduler: (_euler_refusal, _euler_step),
            DPMSolverMultistepScheduler: (_dpm_refusal, _dpm_step)}


def _rule_for(scheduler):
    rules = _rules()
    rule = rules.get(type(scheduler))
    if rule is None:
        names = ", ".join(k.__name__ for k in rules)
        raise TypeError(f"fused scheduler step: {type(scheduler).__name__} is not supported (supported: {names}); "
                        "keep its own step")
    why = rule[0](scheduler)
    if why is None and scheduler.config.prediction_type not in _PREDICTIONS:
        why = f"prediction_type={scheduler.config.prediction_type!r} (supported: {', '.join(_PREDICTIONS)})"
    if why is not None:
        raise ValueError(f"fused scheduler step: {type(scheduler).__name__} with {why} is not supported; "
                         "keep its own step")
    return rule[1]


# ------------------------------------------------------------------ public API

def fused_guided_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                      guidance_scale: float | None = None, return_dict: bool = True, **step_kwargs):
    """`scheduler.step(...)` in one launch, with classifier-free guidance folded in when
    `guidance_scale` is given (then `model_output` is the (2B, ...) [uncond; cond] batch).

    Returns what `scheduler.step` returns and leaves the scheduler's state (step index,
    DPM-Solver's `model_outputs` and `lower_order_nums`) as diffusers' step would."""
    run = _rule_for(scheduler)
    original = type(scheduler).step
    inspect.signature(original).bind(scheduler, model_output, timestep, sample, **step_kwargs)  # same TypeErrors
    if guidance_scale is not None and (model_output.shape[0] != 2 * sample.shape[0]
                                       or model_output.shape[1:] != sample.shape[1:]):
        raise ValueError(f"fused_guided_step: with guidance_scale, model_output must be the [uncond; cond] batch "
                         f"of shape (2B, ...) for sample (B, ...); got {tuple(model_output.shape)} and "
                         f"{tuple(sample.shape)}")
    result = None
    why = unavailable_reason(sample.device)
    if why is None:
        result = run(scheduler, model_output.contiguous(), timestep, sample.contiguous(), guidance_scale, step_kwargs)
    else:
        _log_once(f"fused scheduler step falls back to diffusers: {why}")
    if result is None:
        if guidance_scale is not None:
            uncond, cond = model_output.chunk(2)
            model_output = uncond + guidance_scale * (cond - uncond)
        return original(scheduler, model_output, timestep, sample, return_dict=return_dict, **step_kwargs)
    outputs, output_cls = result
    return output_cls(*outputs) if return_dict else outputs


class FusedStepHandle:
    """What `install_fused_step` returns; `.remove()` restores diffusers' `step`."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def remove(self) -> None:
        uninstall_fused_step(self.scheduler)

    def __repr__(self) -> str:
        return f"FusedStepHandle({type(self.scheduler).__name__})"


@functools.cache
def _fused_method(cls):
    """The replacement `step` for one scheduler class, to be bound to an instance (a bound
    method, not a closure, so `copy.deepcopy(scheduler)` rebinds it to the copy)."""
    sig = inspect.signature(cls.step)

    def step(self, *args, guidance_scale: float | None = None, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop(next(iter(sig.parameters)))  # self
        return fused_guided_step(self, a.pop("model_output"), a.pop("timestep"), a.pop("sample"),
                                 guidance_scale=guidance_scale, **a)

    # pipelines inspect step's parameters to decide whether to pass eta / generator
    extra = inspect.Parameter("guidance_scale", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = list(sig.parameters.values())
    cut = next((k for k, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
    step.__signature__ = sig.replace(parameters=params[:cut] + [extra] + params[cut:])
    step.__doc__ = f"Fused {cls.__name__}.step (asyncdiff_rt.kernels); extra: guidance_scale."
    setattr(step, _MARK, True)
    return step


def install_fused_step(scheduler) -> FusedStepHandle:
    """Replace `scheduler.step` on this instance by the fused step (see the module docstring)."""
    _rule_for(scheduler)  # refuse unsupported schedulers now, not at the first step
    scheduler.step = types.MethodType(_fused_method(type(scheduler)), scheduler)
    return FusedStepHandle(scheduler)


def uninstall_fused_step(scheduler) -> None:
    """Undo `install_fused_step`; does nothing if it was not installed."""
    step = scheduler.__dict__.get("step")
    if getattr(getattr(step, "__func__", None), _MARK, False):
        del scheduler.__dict__["step"]
