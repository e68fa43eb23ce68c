"""The GroupNorm(+SiLU) kernel against torch on odd shapes, every layout and dtype."""
import pytest
import torch
import torch.nn.functional as F
from kernel_compare import assert_close

from asyncdiff_rt.kernels import group_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _video(shape):  # (B, C, F, H, W) viewed out of (B, F, C, H, W) memory, as AnimateDiff and SVD do
    b, c, f, h, w = shape
    return torch.randn(b, f, c, h, w).permute(0, 2, 1, 3, 4)


# (name, shape, groups, make): channels never a multiple of the tile, odd channels per group
LAYOUTS = [
    ("nchw", (3, 24, 3, 5), 8, lambda s: torch.randn(s)),
    ("nchw_1x1", (1, 40, 1, 1), 8, lambda s: torch.randn(s)),
    ("nchw_many_tiles", (1, 6, 33, 35), 2, lambda s: torch.randn(s)),
    ("channels_last", (3, 20, 3, 5), 4, lambda s: torch.randn(s).contiguous(memory_format=torch.channels_last)),
    ("channels_last_wide", (1, 150, 5, 3), 10, lambda s: torch.randn(s).contiguous(memory_format=torch.channels_last)),
    ("ncdhw", (1, 12, 3, 3, 5), 3, lambda s: torch.randn(s)),
    ("channels_last_3d", (1, 24, 2, 3, 5), 8, lambda s: torch.randn(s).contiguous(memory_format=torch.channels_last_3d)),
    ("video_permuted", (3, 12, 2, 3, 5), 4, _video),
    ("nc", (3, 20), 5, lambda s: torch.randn(s)),
]


def _reference(x, groups, w, b, eps, silu):
    y = F.group_norm(x.float(), groups, w.float(), b.float(), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,groups,make", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_matches_torch(name, shape, groups, make, dtype):
    gen = torch.manual_seed(hash((name, str(dtype))) % 1000)
    x = (make(shape) * 2 + 0.5).to(dtype)
    w = torch.randn(shape[1], generator=gen).to(dtype)
    b = torch.randn(shape[1], generator=gen).to(dtype)
    silu = len(name) % 2 == 0  # half the layouts with SiLU; the UNet test covers both on every layout it uses
    y = group_norm(x, groups, w, b, 1e-6, silu=silu)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, _reference(x, groups, w, b, 1e-6, silu), what=f"{name} {dtype} silu={silu}")


@pytest.mark.parametrize("silu", [False, True])
def test_no_affine_and_large_mean(silu):
    # an offset 100x the spread: centred partials keep the variance accurate
    x = torch.randn(2, 15, 4, 7) * 0.5 + 50.0
    y = group_norm(x, 5, None, None, 1e-5, silu=silu)
    ref = F.group_norm(x, 5, eps=1e-5)
    assert_close(y, F.silu(ref) if silu else ref, atol=1e-4, rtol=1e-4, what="no affine, mean 50")


def test_launcher_rejects_with_the_fix():
    x = torch.randn(2, 12, 3, 5)
    with pytest.raises(ValueError, match="groups"):
        group_norm(x, 5)
    with pytest.raises(TypeError, match="float32"):
        group_norm(x.double(), 4)
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        group_norm(x[:, :, :, ::2], 4)
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, 4, torch.ones(6))
    three_runs = torch.randn(2, 5, 12, 3, 7).permute(0, 2, 3, 1, 4)  # (N, C, A, B, D) from (N, B, C, A, D)
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        group_norm(three_runs, 4)
