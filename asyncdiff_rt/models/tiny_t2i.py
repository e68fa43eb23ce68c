"""A tiny pixel-space text-to-image model for the shapes data, and its pipeline.

The UNet has Stable Diffusion 1.5's block structure (three cross-attention down
blocks and a plain one, two layers per block, no linear projections) so that
the SD 1.5 split tables apply to it. It works in pixel space with no VAE; the
only "encoding" is a lossless space-to-depth (2x2 pixel unshuffle: 3x32x32 ->
12x16x16), which makes a training step about 4x cheaper on a CPU than at 32x32. The text encoder is a small `CLIPTextModel` over a word-level tokenizer
built from the generator's vocabulary. Every component is a stock diffusers or
transformers class, so `save_pretrained` / `from_pretrained` need no custom code.

The UNet reads two fixed coordinate channels beside the 12 latent channels (in
the way SD inpainting reads extra mask channels): attention in a UNet has no
positional encoding, so without them "at the top left" can only be learned from
the zero padding of the convolutions. The pooled caption also reaches every
ResNet through the time embedding, so a ResNet can compare it with the
coordinates. The first version of this model had neither and placed shapes at
random (position at chance).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from . import shapes

MAX_LENGTH = 12
PATCH = 2  # space-to-depth factor between images and the UNet's latents
LATENT_CHANNELS = 3 * PATCH**2
COORD_CHANNELS = 2  # y and x in [-1, 1], appended to the UNet's input
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny_t2i")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <bos> words <eos>, padded to MAX_LENGTH."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, normalizers

    vocab = {w: i for i, w in enumerate(SPECIALS + shapes.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=MAX_LENGTH)


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = CLIPTextModel(cfg)
    # Words start far apart (CLIP's default std 0.02 starts them nearly equal): trained from
    # scratch with the UNet, the position words otherwise stay close together, the UNet
    # cannot tell them apart, and no gradient separates them.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=shapes.RES // PATCH, in_channels=LATENT_CHANNELS + COORD_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8,
        # the caption, pooled, is added to the time embedding (diffusers' "text" addition, as in
        # unCLIP): every ResNet then sees it as a per-channel bias beside the coordinates
        addition_embed_type="text", addition_embed_type_num_heads=4)


def build_schedulers(prediction_type: str = "v_prediction") -> tuple[DDPMScheduler, DDIMScheduler]:
    """Training (DDPM) and sampling (DDIM) schedulers with the same noise schedule.
    No x0 clipping: with v-prediction, DDIM clips x0 but keeps the unclipped eps, and
    under guidance (x0 beyond [-1, 1]) that mismatch ruined samples (adherence at
    guidance 2 rose from 23% to 85% on one checkpoint when it went)."""
    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
              prediction_type=prediction_type, clip_sample=False)
    return DDPMScheduler(**kw), DDIMScheduler(**kw, set_alpha_to_one=True, steps_offset=0)


class TinyT2IPipeline(DiffusionPipeline):
    """Text -> 32x32 image, classifier-free guidance, the StableDiffusionPipeline call."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], negative_prompt: Union[str, list[str], None] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1,
                 generator: Union[torch.Generator, list[torch.Generator], None] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        neg = negative_prompt if negative_prompt is not None else ""
        negs = [neg] * n if isinstance(neg, str) else [p for p in neg for _ in range(num_images_per_prompt)]
        if len(negs) != n:
            raise ValueError(f"negative_prompt has {len(negs)} entries for {n} prompts; give one per prompt")
        cfg = guidance_scale > 1.0
        cond = self.encode_prompt(negs + prompts if cfg else prompts)
        device, dtype = self.unet.device, self.unet.dtype
        cond = cond.to(device=device, dtype=dtype)

        shape = (n, self.unet.config.out_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = _randn(shape, generator, device, dtype)
        elif latents.shape != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = torch.cat([latents, latents]) if cfg else latents
            x_in = with_coords(self.scheduler.scale_model_input(x_in, t))
            eps = self.unet(x_in, t, encoder_hidden_states=cond, return_dict=False)[0]
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents, return_dict=False)[0]

        images = (decode(latents) / 2 + 0.5).clamp(0, 1).float()
        if output_type == "pt":
            out = images
        elif output_type in ("np", "pil"):
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        else:
            raise ValueError(f"output_type {output_type!r}: use 'pil', 'np' or 'pt'")
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def encode(images: torch.Tensor) -> torch.Tensor:
    """Images (n, 3, 32, 32) in [-1, 1] -> UNet latents (n, 12, 16, 16); lossless."""
    return torch.nn.functional.pixel_unshuffle(images, PATCH)


def decode(latents: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pixel_shuffle(latents, PATCH)


def with_coords(latents: torch.Tensor) -> torch.Tensor:
    """Latents (n, 12, h, w) -> UNet input (n, 14, h, w): the latents, then y and x in [-1, 1]."""
    n, _, h, w = latents.shape
    kw = dict(device=latents.device, dtype=latents.dtype)
    y = torch.linspace(-1, 1, h, **kw).view(1, 1, h, 1).expand(n, 1, h, w)
    x = torch.linspace(-1, 1, w, **kw).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([latents, y, x], dim=1)


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    """Noise drawn on the CPU so the same seed gives the same image on any device."""
    if isinstance(generator, list):
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


def build_pipeline() -> TinyT2IPipeline:
    """Untrained pipeline with the shipped architecture (what training starts from)."""
    tok = build_tokenizer()
    return TinyT2IPipeline(build_unet(), build_text_encoder(len(tok)), tok, build_schedulers()[1])


def load_tiny(path: Optional[str] = None, device: Union[str, torch.device, None] = None,
              torch_dtype: torch.dtype = torch.float32) -> TinyT2IPipeline:
    """The trained shapes model shipped with the package, loaded offline."""
    path = path or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"no trained tiny model at {path}: reinstall the package with its package data, "
            f"or train one with `python scripts/train_tiny.py`")
    pipe = TinyT2IPipeline.from_pretrained(path, dtype=torch_dtype, local_files_only=True, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
