"""UNet architectures of the families the runtime knows, as plain diffusers configs.

Full-size configs let `asyncdiff-rt plan` build SD 1.5, SD 2.1 and SDXL on the meta
device without a hub; the tiny ones keep the real block layouts at test size.
"""
import torch

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

UNET_CONFIGS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
        up_block_types=_SD_UP, cross_attention_dim=768, attention_head_dim=8,
    ),
    "sd21": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
        up_block_types=_SD_UP, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True, upcast_attention=True,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), down_block_types=_XL_DOWN, up_block_types=_XL_UP,
        cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    # Test sizes: same block types, layer counts and projection styles, tiny widths.
    "tiny-sd15": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32, 32), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    ),
    "tiny-sd21": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32, 32), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        cross_attention_dim=16, attention_head_dim=(2, 2, 4, 4), norm_num_groups=8,
        use_linear_projection=True,
    ),
    "tiny-sdxl": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32), down_block_types=_XL_DOWN, up_block_types=_XL_UP,
        cross_attention_dim=32, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=40,
    ),
}

MODEL_ALIASES = {"sd15": "sd15", "sd1.5": "sd15", "sd21": "sd21", "sd2.1": "sd21", "sdxl": "sdxl"}


def build_unet(name, device="meta", dtype=torch.float16, seed=0):
    """A `UNet2DConditionModel` of a known family; on `meta` it holds no weights."""
    from diffusers import UNet2DConditionModel

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(UNET_CONFIGS)}")
    if device != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[name])
    # nn.Module.to: diffusers' own .to() warns about dtype casts meant for checkpoints.
    return torch.nn.Module.to(unet, dtype)
