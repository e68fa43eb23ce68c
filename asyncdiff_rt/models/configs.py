"""Denoiser architectures of the families the runtime knows, as plain diffusers configs.

Full-size configs let `asyncdiff-rt plan` build SD 1.5, SD 2.1, SDXL, Stable Video
Diffusion (img2vid-xt), AnimateDiff (SD 1.5 and SDXL motion adapters), the SD x4
upscaler and the diffusion transformers of SD 3 Medium, SD 3.5 Large, FLUX.1-dev,
PixArt-Sigma, DiT-XL/2 and Wan 2.1 (1.3B, 14B) on the meta device without a hub; the tiny
ones keep the real block layouts at test size. `build_unet` / `build_denoiser` builds any
of them, of its own diffusers class.
"""
import torch

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_X4_DOWN = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
_X4_UP = ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
_SVD_DOWN = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
_SVD_UP = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3

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
    # stabilityai/stable-diffusion-x4-upscaler's unet/config.json: 7 input channels (4 latent +
    # the 3-channel low-resolution image), the noise level enters as `class_labels`.
    "upscaler": dict(
        sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
        block_out_channels=(256, 512, 512, 1024), down_block_types=_X4_DOWN, up_block_types=_X4_UP,
        attention_head_dim=8, cross_attention_dim=1024, num_class_embeds=1000, use_linear_projection=True,
        only_cross_attention=(True, True, True, False),
    ),
    # stabilityai/stable-video-diffusion-img2vid-xt's unet/config.json (UNetSpatioTemporalConditionModel;
    # all but sample_size are the class's defaults in diffusers 0.42).
    "svd": dict(
        sample_size=96, in_channels=8, out_channels=4, down_block_types=_SVD_DOWN, up_block_types=_SVD_UP,
        block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
        transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=25,
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
    "tiny-upscaler": dict(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32, 64), down_block_types=_X4_DOWN, up_block_types=_X4_UP,
        attention_head_dim=4, cross_attention_dim=16, num_class_embeds=1000, use_linear_projection=True,
        only_cross_attention=(True, True, True, False), norm_num_groups=8,
    ),
    # The spatio-temporal blocks hard-code GroupNorm(32, ...): widths stay multiples of 32.
    "tiny-svd": dict(
        sample_size=8, in_channels=8, out_channels=4, down_block_types=_SVD_DOWN, up_block_types=_SVD_UP,
        block_out_channels=(32, 32, 64, 64), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, layers_per_block=2, cross_attention_dim=32,
        transformer_layers_per_block=1, num_attention_heads=(2, 2, 4, 4), num_frames=4,
    ),
}

# Diffusion transformers: the published transformer/config.json of each checkpoint, as constructor
# arguments of its diffusers class (TRANSFORMER_CLASSES); what is left out is the class's default
# in diffusers 0.42 and the same as the published value.
_SD3 = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
    joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192,
)
_WAN21 = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
TRANSFORMER_CONFIGS = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 joint blocks, width 1536.
    "sd3": dict(_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536),
    # stabilityai/stable-diffusion-3.5-large: 38 joint blocks, width 2432, RMS-normed q and k.
    "sd35-large": dict(_SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
    # black-forest-labs/FLUX.1-dev: 19 double-stream and 38 single-stream blocks, guidance embedding.
    "flux-dev": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS.
    "pixart-sigma": dict(
        sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        use_additional_conditions=False, interpolation_scale=2,
    ),
    # facebook/DiT-XL-2-256 (class-conditional ImageNet, learned sigma: 8 output channels).
    "dit-xl": dict(
        sample_size=32, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000,
    ),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan2.1-T2V-14B-Diffusers.
    "wan2.1-1.3b": dict(_WAN21, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-14b": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
TRANSFORMER_CLASSES = {
    "sd3": "SD3Transformer2DModel", "sd35-large": "SD3Transformer2DModel", "flux-dev": "FluxTransformer2DModel",
    "pixart-sigma": "PixArtTransformer2DModel", "dit-xl": "DiTTransformer2DModel",
    "wan2.1-1.3b": "WanTransformer3DModel", "wan2.1-14b": "WanTransformer3DModel",
}

# MotionAdapter configs: guoyww/animatediff-motion-adapter-v1-5-2 and -sdxl-beta (diffusers
# MotionAdapter arguments; the rest are the class's defaults), and a tiny one for tests.
MOTION_ADAPTERS = {
    "v1-5-2": dict(
        block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
        motion_max_seq_length=32, use_motion_mid_block=True, motion_norm_num_groups=32,
    ),
    "sdxl-beta": dict(
        block_out_channels=(320, 640, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
        motion_max_seq_length=32, use_motion_mid_block=False, motion_norm_num_groups=32,
    ),
    "tiny": dict(
        block_out_channels=(16, 16, 32, 32), motion_layers_per_block=2, motion_num_attention_heads=2,
        motion_max_seq_length=32, use_motion_mid_block=True, motion_norm_num_groups=8,
    ),
    "tiny-sdxl": dict(
        block_out_channels=(16, 32, 32), motion_layers_per_block=2, motion_num_attention_heads=2,
        motion_max_seq_length=32, use_motion_mid_block=False, motion_norm_num_groups=8,
    ),
}

# name -> (image UNet config, motion adapter): what AnimateDiff's
# `UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet), MotionAdapter(**adapter))` builds.
MOTION_UNETS = {
    "animatediff": ("sd15", "v1-5-2"),
    "animatediff-sdxl": ("sdxl", "sdxl-beta"),
    "tiny-animatediff": ("tiny-sd15", "tiny"),
    "tiny-animatediff-sdxl": ("tiny-sdxl", "tiny-sdxl"),
}

# Architectures that are not a UNet2DConditionModel: their diffusers class.
DENOISER_CLASSES = {
    "svd": "UNetSpatioTemporalConditionModel",
    "tiny-svd": "UNetSpatioTemporalConditionModel",
    **{name: "UNetMotionModel" for name in MOTION_UNETS},
    **TRANSFORMER_CLASSES,
}

MODEL_ALIASES = {
    "sd15": "sd15", "sd1.5": "sd15", "sd21": "sd21", "sd2.1": "sd21", "sdxl": "sdxl",
    "svd": "svd", "svd-xt": "svd", "animatediff": "animatediff", "animatediff-sdxl": "animatediff-sdxl",
    "upscaler": "upscaler", "x4-upscaler": "upscaler",
    "sd3": "sd3", "sd3-medium": "sd3", "sd3.0": "sd3", "sd35-large": "sd35-large", "sd3.5-large": "sd35-large",
    "flux-dev": "flux-dev", "flux": "flux-dev", "flux.1-dev": "flux-dev", "flux1-dev": "flux-dev",
    "pixart-sigma": "pixart-sigma", "pixart": "pixart-sigma", "pixart-sigma-xl": "pixart-sigma",
    "dit-xl": "dit-xl", "dit": "dit-xl", "dit-xl-2-256": "dit-xl",
    "wan2.1-1.3b": "wan2.1-1.3b", "wan-1.3b": "wan2.1-1.3b", "wan2.1-t2v-1.3b": "wan2.1-1.3b",
    "wan2.1-14b": "wan2.1-14b", "wan-14b": "wan2.1-14b", "wan2.1-t2v-14b": "wan2.1-14b",
}

# VAE downsampling factor of a family's pipeline, where it is not 8.
VAE_FACTORS = {"upscaler": 4, "tiny-upscaler": 4}


def motion_unet_config(unet_config, adapter_config):
    """The UNetMotionModel arguments `UNetMotionModel.from_unet2d` derives from an image
    UNet's config and a MotionAdapter's (its mapping, without building either)."""
    import inspect

    from diffusers import UNet2DConditionModel, UNetMotionModel

    image = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
    image.update(unet_config)
    adapter = {"motion_transformer_layers_per_block": 1, "motion_transformer_layers_per_mid_block": 1,
               "conv_in_channels": None, **adapter_config}
    config = dict(image)
    config["down_block_types"] = tuple(
        "CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion" for t in image["down_block_types"])
    config["up_block_types"] = tuple(
        "CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion" for t in image["up_block_types"])
    config.update(
        motion_num_attention_heads=adapter["motion_num_attention_heads"],
        motion_max_seq_length=adapter["motion_max_seq_length"],
        use_motion_mid_block=adapter["use_motion_mid_block"],
        layers_per_block=adapter["motion_layers_per_block"],
        temporal_transformer_layers_per_mid_block=adapter["motion_transformer_layers_per_mid_block"],
        temporal_transformer_layers_per_block=adapter["motion_transformer_layers_per_block"],
    )
    if adapter["conv_in_channels"]:
        config["in_channels"] = adapter["conv_in_channels"]
    if not config.get("num_attention_heads"):
        config["num_attention_heads"] = config["attention_head_dim"]
    accepted = inspect.signature(UNetMotionModel.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted and k != "self"}


def denoiser_config(name):
    """(diffusers class name, constructor kwargs) of a known architecture."""
    if name in MOTION_UNETS:
        unet, adapter = MOTION_UNETS[name]
        return "UNetMotionModel", motion_unet_config(UNET_CONFIGS[unet], MOTION_ADAPTERS[adapter])
    if name in TRANSFORMER_CONFIGS:
        return TRANSFORMER_CLASSES[name], TRANSFORMER_CONFIGS[name]
    if name not in UNET_CONFIGS:
        known = sorted([*UNET_CONFIGS, *MOTION_UNETS, *TRANSFORMER_CONFIGS])
        raise ValueError(f"unknown architecture {name!r}; choose one of {known}")
    return DENOISER_CLASSES.get(name, "UNet2DConditionModel"), UNET_CONFIGS[name]


def build_unet(name, device="meta", dtype=torch.float16, seed=0):
    """The denoiser of a known family, of its own diffusers class (`UNet2DConditionModel`,
    `UNetSpatioTemporalConditionModel`, `UNetMotionModel` or a diffusion transformer's
    class, TRANSFORMER_CLASSES); on `meta` it holds no weights,
    elsewhere random weights drawn after `torch.manual_seed(seed)`."""
    class_name, config = denoiser_config(name)
    if device != "meta":
        torch.manual_seed(seed)
    return build_from_config(class_name, config, device=device, dtype=dtype)


build_denoiser = build_unet


def build_from_config(class_name, config, device="meta", dtype=torch.float16):
    """A diffusers model of `class_name` from its config (a dict or a config.json's
    contents), built directly on `device`: on `meta` nothing is allocated."""
    import diffusers

    cls = getattr(diffusers, class_name)
    with torch.device(device):
        model = cls.from_config(config) if "_class_name" in config else cls(**config)
    # A few layers build tensors with the legacy torch.Tensor([...]) constructor, which ignores
    # the default device (SVD's AlphaBlender.mix_factor): move them where the rest is.
    # nn.Module.to: diffusers' own .to() warns about dtype casts meant for checkpoints.
    return torch.nn.Module.to(model, device=device, dtype=dtype)
