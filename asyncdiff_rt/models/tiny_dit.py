"""A tiny diffusion transformer for the shapes data, in a stock `PixArtAlphaPipeline`.

`PixArtTransformer2DModel` (PixArt's DiT: AdaLN-single time conditioning, cross-attention
to the caption, 2-D sin-cos position embeddings) works in pixel space on the 3x32x32
images in [-1, 1], in patches of 4x4 (64 tokens). It has no VAE: the pipeline holds
none, so its latents are the images, and a caller asks for them with
`output_type="latent"` (`images()` below does that and maps them to [0, 1]); decoding
through a VAE fails loudly with none there. The text encoder and tokenizer are the
tiny UNet model's (`tiny_t2i`), the encoder's 12 positions widened to the pipeline's
120 (causal attention: a caption's encoding does not depend on padding after it, and
the transformer masks the padding). Same data, captions, noise schedule (cosine,
v-prediction) and DDIM sampler as the tiny UNet, so the two are compared like for like.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import CLIPTextModel

from . import shapes
from . import tiny_t2i as tt

MAX_SEQUENCE = 120  # PixArtAlphaPipeline's default max_sequence_length
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny_dit")
# Without a VAE the pipeline takes a scale factor of 8 between its height and the latents'.
CALL = dict(output_type="latent", use_resolution_binning=False, height=8 * shapes.RES, width=8 * shapes.RES)


def build_transformer() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        sample_size=shapes.RES, patch_size=4, in_channels=3, out_channels=3, num_layers=6,
        num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
        norm_type="ada_norm_single", use_additional_conditions=False)


def widened_text_encoder(encoder: CLIPTextModel) -> CLIPTextModel:
    """`encoder` with MAX_SEQUENCE positions; the first ones keep their trained embeddings."""
    config = encoder.config.to_dict()
    config["max_position_embeddings"] = MAX_SEQUENCE
    wide = CLIPTextModel(type(encoder.config).from_dict(config))
    state = encoder.state_dict()
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    table = wide.state_dict()[key].clone() * 0.02
    table[:state[key].shape[0]] = state[key]
    state[key] = table
    missing, unexpected = wide.load_state_dict(state, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(f"text encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    return wide


def build_pipeline(text_source: Optional[str] = None) -> PixArtAlphaPipeline:
    """Untrained transformer; text encoder and tokenizer from the trained tiny UNet model."""
    source = tt.load_tiny(text_source)
    tokenizer = source.tokenizer
    tokenizer.model_max_length = MAX_SEQUENCE
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=widened_text_encoder(source.text_encoder),
                               vae=None, transformer=build_transformer(), scheduler=tt.build_schedulers()[1])


def load_tiny_dit(path: Optional[str] = None, device: Union[str, torch.device, None] = None,
                  torch_dtype: torch.dtype = torch.float32) -> PixArtAlphaPipeline:
    """The trained shapes transformer shipped with the package, loaded offline."""
    path = path or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no trained tiny transformer at {path}: reinstall the package with its package "
                                "data, or train one with `python scripts/train_tiny.py --model dit`")
    pipe = PixArtAlphaPipeline.from_pretrained(path, vae=None, dtype=torch_dtype, local_files_only=True,
                                               low_cpu_mem_usage=False)  # no VAE: the latents are the pixels
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def images(pipe: PixArtAlphaPipeline, prompts: Sequence[str], **kwargs) -> torch.Tensor:
    """Images in [0, 1] (n, 3, 32, 32): the pipeline's latents are the pixels."""
    latents = pipe(list(prompts), clean_caption=False, **CALL, **kwargs).images
    return (latents / 2 + 0.5).clamp(0, 1).float()
