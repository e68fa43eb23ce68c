"""The same comparisons on a GPU with real SD 1.5 / SDXL / SVD shapes, plus CUDA-graph capture."""
import pytest
import torch
import torch.nn.functional as F
from kernel_compare import assert_close

import asyncdiff_rt.kernels as K
from asyncdiff_rt.kernels.scheduler_step import StepCoefficients, scheduler_step, scheduler_step_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, shape, groups, memory layout)
REAL = [
    ("sd15_64x64_320", (2, 320, 64, 64), 32, "nchw"),
    ("sd15_8x8_1280", (2, 1280, 8, 8), 32, "nchw"),
    ("sdxl_128x128_320", (2, 320, 128, 128), 32, "nchw"),
    ("sdxl_32x32_1280_cl", (2, 1280, 32, 32), 32, "channels_last"),
    ("sd15_32x32_960_cl", (2, 960, 32, 32), 32, "channels_last"),
    ("svd_video_320", (1, 320, 14, 40, 72), 32, "video"),
]


def _make(shape, layout, dtype):
    if layout == "video":
        b, c, f, h, w = shape
        return torch.randn(b, f, c, h, w, device="cuda", dtype=dtype).permute(0, 2, 1, 3, 4)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,groups,layout", REAL, ids=[r[0] for r in REAL])
def test_group_norm_silu_real_shapes(name, shape, groups, layout, dtype):
    torch.manual_seed(0)
    x = _make(shape, layout, dtype) * 2 + 0.3
    w = torch.randn(shape[1], device="cuda", dtype=dtype)
    b = torch.randn(shape[1], device="cuda", dtype=dtype)
    ref = F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5)).to(dtype)
    got = K.group_norm(x, groups, w, b, 1e-5, silu=True)
    assert got.stride() == x.stride()
    assert_close(got, ref, what=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scheduler_step_real_shapes(dtype):
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 128, 128, device="cuda", dtype=dtype)
    mo = torch.randn(4, 4, 128, 128, device="cuda", dtype=dtype)
    x0_prev = torch.randn_like(sample)
    coef = StepCoefficients(a_x=1.02, a_e=-0.3, c_x=0.8, c_0=0.2, c_e=0.1, c_1=0.4)
    got = scheduler_step(mo, sample, coef, 7.5, x0_prev)
    ref = scheduler_step_reference(mo, sample, coef, 7.5, x0_prev)
    for a, e in zip(got, ref):
        assert_close(a, e, what=f"step {dtype}")


def test_scheduler_loops_on_cuda():
    from test_kernels_scheduler_step import SCHEDULERS, _loop

    for name in ("ddim", "euler", "dpmpp_2m"):
        latents = torch.randn(2, 4, 64, 64, device="cuda")
        results = []
        for fused in (False, True):
            s = SCHEDULERS[name]("epsilon")
            s.set_timesteps(20, device="cuda")
            if fused:
                K.install_fused_step(s)
            results.append(_loop(s, latents * s.init_noise_sigma, "fused_guidance" if fused else "diffusers"))
        assert_close(results[1], results[0], atol=1e-4, rtol=1e-4, what=f"{name} on cuda")


def test_unet_fp16_and_cuda_graph_capture():
    from test_kernels_unet import tiny_sd_unet

    unet = tiny_sd_unet().cuda().half()
    gen = torch.Generator(device="cuda").manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, device="cuda", generator=gen, dtype=torch.half),
            torch.tensor([999.0, 10.0], device="cuda"),
            torch.randn(2, 5, 32, device="cuda", generator=gen, dtype=torch.half))
    with torch.no_grad():
        expected = unet(*args).sample
        routing = K.apply(unet)
        eager = unet(*args).sample
        assert_close(eager, expected, atol=2e-2, rtol=2e-2, what="fp16 UNet with kernels")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles the kernels) outside capture
            for _ in range(2):
                unet(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = unet(*args).sample
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_out, eager, atol=1e-3, rtol=1e-3, what="CUDA graph replay")
        routing.remove()
