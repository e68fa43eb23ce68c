"""Random-weight Stable Diffusion pipelines with the real block layouts, built offline.

Tests and the quick demo use them: every component comes from a config, and the
tokenizer's vocabulary is written on the fly (characters only), so no hub is needed.
"""
import json
import string
import tempfile
from pathlib import Path

import torch

from .configs import UNET_CONFIGS, build_unet

_TEXT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
             max_position_embeddings=16, projection_dim=16)


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + " .,"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=16)


def _text_encoder(tokenizer, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **_TEXT)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16,
    ).eval()


def _ddim():
    """SD's DDIM without x0 clipping (random weights predict anything)."""
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, clip_sample=False, set_alpha_to_one=False)


def tiny_sd_pipeline(family="sd15", img2img=False, seed=0, scheduler=None, inpaint=False):
    """A tiny random `StableDiffusion[XL][Img2Img|Inpaint]Pipeline` of `family` (sd15,
    sd21, sdxl); `inpaint`: with a 9-channel UNet (latent, mask, masked image latent).
    Latents are 8x8 for a 16x16 image (the tiny VAE downsamples by 2)."""
    import diffusers

    torch.manual_seed(seed)
    if inpaint:
        unet = diffusers.UNet2DConditionModel(**{**UNET_CONFIGS[f"tiny-{family}"], "in_channels": 9}).eval()
    else:
        unet = build_unet(f"tiny-{family}", device="cpu", dtype=torch.float32, seed=seed).eval()
    scheduler = scheduler or _ddim()
    tokenizer = tiny_tokenizer()
    parts = dict(unet=unet, vae=_vae(), scheduler=scheduler, tokenizer=tokenizer)
    task = "Inpaint" if inpaint else "Img2Img" if img2img else ""
    if family == "sdxl":
        name = f"StableDiffusionXL{task}Pipeline"
        parts.update(text_encoder=_text_encoder(tokenizer), text_encoder_2=_text_encoder(tokenizer, True),
                     tokenizer_2=tokenizer)
    else:
        name = f"StableDiffusion{task}Pipeline"
        parts.update(text_encoder=_text_encoder(tokenizer), safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
    pipe = getattr(diffusers, name)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_pipeline(family="sd15", controlnets=1, seed=0):
    """A tiny `StableDiffusion[XL]ControlNetPipeline`: `controlnets` ControlNets made from
    the UNet (several: a MultiControlNet), their conditioning image at the image's size."""
    import diffusers

    base = tiny_sd_pipeline(family, seed=seed)
    torch.manual_seed(seed + 1)
    # One stride-2 step in the conditioning embedding: the tiny VAE downsamples by 2.
    nets = [diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8)).eval()
            for _ in range(controlnets)]
    name = "StableDiffusionXLControlNetPipeline" if family == "sdxl" else "StableDiffusionControlNetPipeline"
    pipe = getattr(diffusers, name)(**base.components, controlnet=nets[0] if controlnets == 1 else nets)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_pipeline(family="sd15", seed=0):
    """A tiny `AnimateDiffPipeline` (`AnimateDiffSDXLPipeline` for sdxl): the image UNet
    and a motion adapter, which the pipeline joins into a `UNetMotionModel`."""
    import diffusers

    from .configs import MOTION_ADAPTERS, MOTION_UNETS

    base = tiny_sd_pipeline(family, seed=seed)
    _, adapter = MOTION_UNETS[f"tiny-animatediff{'-sdxl' if family == 'sdxl' else ''}"]
    torch.manual_seed(seed + 1)
    motion = diffusers.MotionAdapter(**MOTION_ADAPTERS[adapter]).eval()
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "requires_safety_checker")}
    name = "AnimateDiffSDXLPipeline" if family == "sdxl" else "AnimateDiffPipeline"
    pipe = getattr(diffusers, name)(**parts, motion_adapter=motion)
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_upscaler_pipeline(seed=0):
    """A tiny `StableDiffusionUpscalePipeline`: a 7-channel UNet (latent + low-resolution
    image) with the noise level as its class label."""
    import diffusers

    base = tiny_sd_pipeline("sd15", seed=seed)
    unet = build_unet("tiny-upscaler", device="cpu", dtype=torch.float32, seed=seed).eval()
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        low_res_scheduler=diffusers.DDPMScheduler(), scheduler=base.scheduler, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_svd_pipeline(seed=0):
    """A tiny `StableVideoDiffusionPipeline`: image-conditioned, frames in the latent."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = build_unet("tiny-svd", device="cpu", dtype=torch.float32, seed=seed).eval()
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, image_size=16,
        patch_size=8, projection_dim=unet.config.cross_attention_dim)).eval()
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Diffusion transformers: pipelines without text encoders (tests pass prompt embeddings),
# each with a tiny transformer of the family's class.
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))


def tiny_transformer_pipeline(family, seed=0):
    """A tiny `StableDiffusion3Pipeline` ("sd3"), `FluxPipeline` ("flux"),
    `PixArtSigmaPipeline` ("pixart"), `DiTPipeline` ("dit") or `WanPipeline` ("wan", Wan
    2.1: classifier-free guidance as two transformer calls per step); text conditioning is
    given as embeddings (`tiny_prompt_embeddings`)."""
    import diffusers

    torch.manual_seed(seed)
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    no_text = dict(text_encoder=None, tokenizer=None)
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=16)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer.eval(), scheduler=flow, vae=_vae(), **no_text, text_encoder_2=None,
            tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    elif family == "flux":
        transformer = diffusers.FluxTransformer2DModel(**TINY_FLUX)
        pipe = diffusers.FluxPipeline(scheduler=flow, vae=_vae(), **no_text, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer.eval())
    elif family == "pixart":
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            out_channels=8, cross_attention_dim=16, caption_channels=16, norm_type="ada_norm_single",
            use_additional_conditions=False)
        pipe = diffusers.PixArtSigmaPipeline(**no_text, vae=_vae(), transformer=transformer.eval(),
                                             scheduler=_ddim())
    elif family == "dit":
        transformer = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4, sample_size=8,
            patch_size=2, num_embeds_ada_norm=1000)
        pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=_vae(), scheduler=_ddim(),
                                     id2label={0: "cube", 1: "sphere"})
    elif family == "wan":
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])
        pipe = diffusers.WanPipeline(**no_text, vae=vae.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            shift=7.0), transformer=transformer.eval())
    else:
        raise ValueError(f"unknown tiny transformer family {family!r}: sd3, flux, pixart, dit or wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_prompt_embeddings(seed=0, tokens=5, width=16):
    """(prompt embeddings, pooled embeddings) for the tiny transformer pipelines."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, width, generator=g), torch.randn(1, width, generator=g)
