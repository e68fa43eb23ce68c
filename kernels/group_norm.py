"""GroupNorm forward, optionally fused with SiLU: Triton kernels, launcher, torch reference.

The input is seen as (N, C, T, P): batch, channels, and the spatial positions
split into an outer run T and an inner run P, each with one stride. That one
view covers contiguous and channels-last NCHW, contiguous and channels-last
NCDHW, and the (B, C, F, H, W) views that video UNets permute out of
(B, F, C, H, W) memory (T = F there). The output keeps the input's strides.

Three launches, so that every SM has work even at batch 1 (one program per
group would leave most of an H100 idle):
  1. `_stats_kernel`: per tile, each channel's mean and centred sum of squares;
  2. `_combine_kernel`: per (n, block of groups), merges the tiles (Chan et al.) into
     mean and rstd, and folds them with the affine weight and bias into a per-channel
     scale and shift;
  3. `_apply_kernel`: per tile, y = x * scale + shift, SiLU, store.
Statistics are in fp32 whatever the input dtype; partials are centred per tile
so no E[x^2] - E[x]^2 cancellation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import LazyKernel, check_device_or_raise, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _stats_kernel(x_ptr, pmean_ptr, pm2_ptr, T, P, C, s_n, s_c, s_t, s_p,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_nt = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = pid_nt // T
    t = pid_nt % T
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    mask = c_ok[:, None] & (p < P)[None, :]
    base = n.to(tl.int64) * s_n + t.to(tl.int64) * s_t
    offs = base + c.to(tl.int64)[:, None] * s_c + p.to(tl.int64)[None, :] * s_p
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    count = tl.minimum(P - pid_s * BLOCK_S, BLOCK_S).to(tl.float32)
    mean = tl.sum(x, axis=1) / count
    d = tl.where(mask, x - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    out = (pid_nt.to(tl.int64) * tl.num_programs(1) + pid_s) * C + c
    tl.store(pmean_ptr + out, mean, mask=c_ok)
    tl.store(pm2_ptr + out, m2, mask=c_ok)


def _combine_kernel(pmean_ptr, pm2_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, G, C, T, P, n_sblocks, total, eps,
                    CPG: tl.constexpr, S_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    # One program per (n, block of groups): tiles [rows (t, s-block), groups, channels of a group].
    # Ends with the per-channel scale and shift (affine folded in), so the apply pass loads
    # two contiguous vectors instead of gathering group statistics per element (which also
    # kept Triton from vectorising channels-last tiles).
    n = tl.program_id(0)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)[None, :, None]
    j = tl.arange(0, BLOCK_J)[None, None, :]
    col_ok = (g < G) & (j < CPG)
    col = g * CPG + j
    rows = T * n_sblocks
    row0 = n.to(tl.int64) * rows

    acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[:, None, None]
        cnt = tl.minimum(P - (r % n_sblocks) * S_BLOCK, S_BLOCK).to(tl.float32)
        mask = (r < rows) & col_ok
        m = tl.load(pmean_ptr + (row0 + r) * C + col, mask=mask, other=0.0)
        acc += tl.sum(tl.sum(m * cnt, axis=2), axis=0)
    mean = acc / total

    acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[:, None, None]
        cnt = tl.minimum(P - (r % n_sblocks) * S_BLOCK, S_BLOCK).to(tl.float32)
        mask = (r < rows) & col_ok
        offs = (row0 + r) * C + col
        m = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        m2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        dm = m - mean[None, :, None]
        acc += tl.sum(tl.sum(tl.where(mask, m2 + cnt * dm * dm, 0.0), axis=2), axis=0)
    rstd = 1.0 / tl.sqrt(acc / total + eps)

    g2 = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)[:, None]
    j2 = tl.arange(0, BLOCK_J)[None, :]
    ch = g2 * CPG + j2
    ok = (g2 < G) & (j2 < CPG)
    scale = tl.broadcast_to(rstd[:, None], [BLOCK_G, BLOCK_J])
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    shift = -mean[:, None] * scale
    if HAS_BIAS:
        shift = shift + tl.load(b_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + n * C + ch, scale, mask=ok)
    tl.store(shift_ptr + n * C + ch, shift, mask=ok)


def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, T, P, C, s_n, s_c, s_t, s_p,
                  SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_nt = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = pid_nt // T
    t = pid_nt % T
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    mask = c_ok[:, None] & (p < P)[None, :]
    base = n.to(tl.int64) * s_n + t.to(tl.int64) * s_t
    offs = base + c.to(tl.int64)[:, None] * s_c + p.to(tl.int64)[None, :] * s_p
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + n * C + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0)
    y = x * scale[:, None] + shift[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


_stats = LazyKernel(_stats_kernel)
_combine = LazyKernel(_combine_kernel)
_apply = LazyKernel(_apply_kernel)


# ---------------------------------------------------------------- launcher

def _spatial_view(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(T, P, stride_t, stride_p) for x's spatial dims, or ValueError if they do not fold into two runs."""
    dims = [(s, st) for s, st in zip(x.shape[2:], x.stride()[2:]) if s != 1]
    runs: list[list[int]] = []  # [size, stride], innermost last
    for size, stride in reversed(dims):
        if runs and runs[0][1] * runs[0][0] == stride:
            runs[0][0] *= size
        else:
            runs.insert(0, [size, stride])
    if len(runs) > 2:
        raise ValueError(
            f"group_norm: spatial layout {tuple(x.shape)} with strides {x.stride()} does not fold into two "
            "strided runs; call .contiguous() (or .contiguous(memory_format=torch.channels_last)) first"
        )
    while len(runs) < 2:
        runs.insert(0, [1, 0])
    (t, st), (p, sp) = runs
    return t, p, st, (sp if p > 1 else 1)


def _is_dense(x: torch.Tensor) -> bool:
    dims = sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1)
    expect = 1
    for stride, size in dims:
        if stride != expect:
            return False
        expect *= size
    return True


def pick_blocks(C: int, P: int, channels_fast: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps): tiles of up to 4K elements, the contiguous axis first.

    One rule for the GPU and the interpreter (no autotuning); large tiles also keep
    the interpreter fast, since its cost is per operation rather than per element."""
    budget = 4096
    if channels_fast:
        block_c = min(next_pow2(C), 128)
        block_s = max(1, min(next_pow2(P), budget // block_c))
    else:
        block_s = min(next_pow2(P), 1024)
        block_c = max(1, min(next_pow2(C), budget // block_s))
    warps = 8 if block_c * block_s >= 4096 else 4
    return block_c, block_s, warps


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """`F.group_norm(x, num_groups, weight, bias, eps)`, followed by `F.silu` when `silu`."""
    if x.dim() < 2:
        raise ValueError(f"group_norm: expected (N, C, *) input, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"group_norm: dtype {x.dtype} is not supported; cast to float32, float16 or bfloat16")
    N, C = x.shape[:2]
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"group_norm: {C} channels do not split into {num_groups} groups; "
                         "pick num_groups dividing the channel count")
    if not _is_dense(x):
        raise ValueError("group_norm: input is a view with gaps or overlaps (e.g. a slice); call .contiguous() first")
    check_device_or_raise(x, "group_norm")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (C,) or not p.is_contiguous() or p.device != x.device):
            raise ValueError(f"group_norm: {name} must be a contiguous ({C},) tensor on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")
    y = torch.empty_like(x)  # keeps x's strides because x is dense
    if x.numel() == 0:
        return y
    T, P, s_t, s_p = _spatial_view(x)
    s_n, s_c = x.stride(0), x.stride(1)
    cpg = C // num_groups
    block_c, block_s, warps = pick_blocks(C, P, channels_fast=(s_c == 1 and C > 1))
    n_sblocks = triton.cdiv(P, block_s)
    grid = (N * T, n_sblocks, triton.cdiv(C, block_c))

    # one fp32 workspace (one allocation per call): partial means and M2s, then scale and shift
    parts = N * T * n_sblocks * C
    work = torch.empty(2 * parts + 2 * N * C, device=x.device, dtype=torch.float32)
    pmean, pm2 = work[:parts], work[parts:2 * parts]
    scale, shift = work[2 * parts:2 * parts + N * C], work[2 * parts + N * C:]
    _stats[grid](x, pmean, pm2, T, P, C, s_n, s_c, s_t, s_p,
                 BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps)
    block_j = next_pow2(cpg)
    block_g = min(next_pow2(num_groups), max(1, 1024 // block_j))
    block_r = max(1, min(next_pow2(T * n_sblocks), 4096 // (block_g * block_j)))
    _combine[(N, triton.cdiv(num_groups, block_g))](
        pmean, pm2, weight if weight is not None else pmean, bias if bias is not None else pmean, scale, shift,
        num_groups, C, T, P, n_sblocks, float(cpg * T * P), float(eps),
        CPG=cpg, S_BLOCK=block_s, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_J=block_j, num_warps=4)
    _apply[grid](x, y, scale, shift, T, P, C, s_n, s_c, s_t, s_p,
                 SILU=bool(silu), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps)
    return y


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """What the kernel computes, in eager torch (statistics in fp32, like the CUDA op)."""
    y = torch.nn.functional.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if silu:
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)
