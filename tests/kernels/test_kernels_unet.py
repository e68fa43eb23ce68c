"""`apply` / `remove` on a tiny SD 1.5-layout UNet and on the video blocks."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from kernel_compare import assert_close

import asyncdiff_rt.kernels as K


def tiny_sd_unet():
    # SD 1.5 block layout; 24 and 40 channels with 8 groups: 3 and 5 channels per group, no power of two
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(24, 24, 40, 40), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


@pytest.fixture(scope="module")
def unet_and_inputs():
    unet = tiny_sd_unet()
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([999.0, 500.0, 1.0]),
            torch.randn(3, 5, 32, generator=gen))
    with torch.no_grad():
        expected = unet(*args).sample
    return unet, args, expected


def _instance_forwards(module):
    return [name for name, m in module.named_modules() if "forward" in m.__dict__]


def test_unet_with_kernels_matches_and_remove_restores(unet_and_inputs):
    unet, args, expected = unet_and_inputs
    before = {k: (v.data_ptr(), v.clone()) for k, v in unet.state_dict().items()}
    routing = K.apply(unet)
    try:
        # 22 resnets x 2 fused norms, 16 transformer entry norms, conv_norm_out -> conv_act
        assert sum("GroupNorm" in r for r in routing.routed) == 22 * 2 + 16 + 1, routing.routed
        assert K.apply(unet) is routing  # idempotent
        with torch.no_grad():
            got = unet(*args).sample
        assert_close(got, expected, atol=1e-4, rtol=1e-4, what="tiny UNet with kernels")
        after = unet.state_dict()
        assert list(after) == list(before)
        assert all(after[k].data_ptr() == p and torch.equal(after[k], v) for k, (p, v) in before.items())
    finally:
        K.remove(unet)
    assert _instance_forwards(unet) == []
    with torch.no_grad():
        assert torch.equal(unet(*args).sample, expected)


def test_autograd_calls_fall_back_to_torch(unet_and_inputs):
    unet, args, expected = unet_and_inputs
    handle = K.apply(unet)
    try:
        out = unet(*args).sample  # grad on: forward-only kernels step aside, bit for bit
        assert out.requires_grad and torch.equal(out.detach(), expected)
    finally:
        handle.remove()
    assert _instance_forwards(unet) == []


@pytest.mark.parametrize("missing", ["no_cuda", "no_triton"])
def test_without_triton_runtime_apply_changes_nothing(monkeypatch, caplog, missing):
    if missing == "no_cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        expect = "TRITON_INTERPRET"
    else:
        monkeypatch.setattr("asyncdiff_rt.kernels._runtime._IMPORT_ERROR", "triton is not installed")
        expect = "not installed"
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4)
    with caplog.at_level("WARNING", logger="asyncdiff_rt.kernels"):
        routing = K.apply(block)
    assert routing.routed == [] and expect in routing.reason and expect in caplog.text
    assert _instance_forwards(block) == []


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_resnet_block_fuses_only_where_silu_follows_the_norm(time_embedding_norm):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=20, out_channels=30, temb_channels=16, groups=5, eps=1e-6,
                          time_embedding_norm=time_embedding_norm).eval()
    x, temb = torch.randn(3, 20, 3, 5).contiguous(memory_format=torch.channels_last), torch.randn(3, 16)
    with torch.no_grad():
        expected = block(x, temb)
        routing = K.apply(block)
        routed = list(routing.routed)
        got = block(x, temb)
        routing.remove()
    fused = time_embedding_norm == "default"
    assert ("norm2 (GroupNorm+SiLU)" if fused else "norm2 (GroupNorm)") in routed
    assert_close(got, expected, atol=1e-5, rtol=1e-5, what=f"ResnetBlock2D {time_embedding_norm}")


def test_video_blocks_on_permuted_5d_inputs():
    torch.manual_seed(0)
    frames = 3
    # diffusers fixes 32 groups here: 96 channels gives 3 per group
    temporal_res = TemporalResnetBlock(in_channels=96, out_channels=96, temb_channels=8, eps=1e-6).eval()
    motion = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=6, in_channels=12,
                                      norm_num_groups=4).eval()
    x5 = torch.randn(2, frames, 96, 3, 5).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W), as SVD permutes it
    temb = torch.randn(2, frames, 8)
    x4 = torch.randn(2 * frames, 12, 3, 5)  # AnimateDiff's motion module permutes it to 5-D itself
    with torch.no_grad():
        expected = temporal_res(x5, temb), motion(x4, num_frames=frames).sample
        handles = K.apply(temporal_res), K.apply(motion)
        got = temporal_res(x5, temb), motion(x4, num_frames=frames).sample
        for h in handles:
            h.remove()
    assert len(handles[0].routed) == 0 and _instance_forwards(temporal_res) == []
    assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5, what="TemporalResnetBlock")
    assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5, what="TransformerTemporalModel")
