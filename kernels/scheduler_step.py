"""One elementwise kernel for classifier-free guidance plus a deterministic scheduler update.

DDIM (eta = 0), Euler discrete and DPM-Solver++ 2M all reduce, per element, to

    e    = u + g * (c - u)              (guidance; or e = model_output unguided)
    x0   = a_x * sample + a_e * e       (clamped to [-clip, clip] when CLIP)
    x0   = x0 rounded to x0's dtype     (diffusers keeps x0 in that dtype and reuses it)
    prev = c_x * sample + c_0 * x0 + c_e * e + c_1 * (x0 - x0_prev)

with host-side scalars that `guided_step.py` derives from the scheduler exactly
as diffusers does. One launch replaces the chain of small ops (6 to 15 of them)
that the pipeline and `scheduler.step` would issue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._runtime import LazyKernel, check_device_or_raise, interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of the update above; `clip` is None for no clamp, `c_1` needs `x0_prev`."""
    a_x: float
    a_e: float
    c_x: float
    c_0: float
    c_e: float = 0.0
    c_1: float = 0.0
    clip: float | None = None


def _step_kernel(mo_ptr, sample_ptr, x0_prev_ptr, prev_ptr, x0_ptr, numel, guidance,
                 a_x, a_e, c_x, c_0, c_e, c_1, clip,
                 GUIDED: tl.constexpr, HAS_PREV: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    s = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        # batched prediction: the unconditional half first, as diffusers' `chunk(2)` reads it
        u = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(mo_ptr + numel + offs, mask=mask, other=0.0).to(tl.float32)
        e = u + guidance * (c - u)
    else:
        e = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = a_x * s + a_e * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    x0_store = x0.to(x0_ptr.dtype.element_ty)
    tl.store(x0_ptr + offs, x0_store, mask=mask)
    x0 = x0_store.to(tl.float32)
    prev = c_x * s + c_0 * x0 + c_e * e
    if HAS_PREV:
        x0_prev = tl.load(x0_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        prev += c_1 * (x0 - x0_prev)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)


_step = LazyKernel(_step_kernel)


def _check(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scheduler_step: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if not t.is_contiguous():
        raise ValueError(f"scheduler_step: {name} is not contiguous; call .contiguous() first")
    if t.device != like.device:
        raise ValueError(f"scheduler_step: {name} is on {t.device}, sample on {like.device}; move them together")


def scheduler_step(model_output: torch.Tensor, sample: torch.Tensor, coef: StepCoefficients,
                   guidance_scale: float | None = None, x0_prev: torch.Tensor | None = None,
                   prev_dtype: torch.dtype | None = None, x0_dtype: torch.dtype | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev_sample, x0) for one step. With `guidance_scale`, `model_output` is the (2B, ...)
    batch [uncond; cond] and `sample` the (B, ...) latents."""
    _check(sample, "sample", sample)
    _check(model_output, "model_output", sample)
    expect = sample.numel() * (2 if guidance_scale is not None else 1)
    if model_output.numel() != expect:
        what = "twice the sample's (the [uncond; cond] batch)" if guidance_scale is not None else "the sample's"
        raise ValueError(f"scheduler_step: model_output has {model_output.numel()} elements, expected {what}: "
                         f"{expect} (model_output {tuple(model_output.shape)}, sample {tuple(sample.shape)})")
    if coef.c_1 != 0.0:
        if x0_prev is None:
            raise ValueError("scheduler_step: a second-order update (c_1 != 0) needs x0_prev")
        _check(x0_prev, "x0_prev", sample)
        if x0_prev.numel() != sample.numel():
            raise ValueError(f"scheduler_step: x0_prev has shape {tuple(x0_prev.shape)}, sample {tuple(sample.shape)}")
    check_device_or_raise(sample, "scheduler_step")
    prev = torch.empty_like(sample, dtype=prev_dtype or model_output.dtype)
    x0 = torch.empty_like(sample, dtype=x0_dtype or model_output.dtype)
    numel = sample.numel()
    if numel == 0:
        return prev, x0
    block = 1024 if interpreting() else 2048
    has_prev = coef.c_1 != 0.0
    _step[(triton.cdiv(numel, block),)](
        model_output, sample, x0_prev if has_prev else sample, prev, x0, numel,
        float(guidance_scale or 0.0), coef.a_x, coef.a_e, coef.c_x, coef.c_0, coef.c_e, coef.c_1,
        float(coef.clip or 0.0),
        GUIDED=guidance_scale is not None, HAS_PREV=has_prev, CLIP=coef.clip is not None,
        BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return prev, x0


def scheduler_step_reference(model_output, sample, coef: StepCoefficients, guidance_scale=None, x0_prev=None,
                             prev_dtype=None, x0_dtype=None):
    """The kernel's arithmetic in eager torch, fp32 throughout."""
    s = sample.float()
    if guidance_scale is not None:
        u, c = model_output.float().reshape(2, *sample.shape)
        e = u + guidance_scale * (c - u)
    else:
        e = model_output.float().reshape(sample.shape)
    x0 = coef.a_x * s + coef.a_e * e
    if coef.clip is not None:
        x0 = x0.clamp(-coef.clip, coef.clip)
    x0 = x0.to(x0_dtype or model_output.dtype)
    prev = coef.c_x * s + coef.c_0 * x0.float() + coef.c_e * e
    if coef.c_1 != 0.0:
        prev = prev + coef.c_1 * (x0.float() - x0_prev.float())
    return prev.to(prev_dtype or model_output.dtype), x0
