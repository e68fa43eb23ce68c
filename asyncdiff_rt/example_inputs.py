"""Example inputs at real shapes for tracing a diffusers denoiser (see trace.py).

`example_inputs(denoiser, ...)` returns a `make_inputs()` that builds (latent, timestep,
cond_args, cond_kwargs) as the matching diffusers pipeline would pass them; `trace`
calls it inside its fake-tensor mode, so nothing is allocated. `height`/`width` are in
latent pixels (default: the config's `sample_size`, square; SVD's pipeline makes 576x1024
videos, latent 72x128, whatever its sample_size says: `asyncdiff-rt plan` passes that;
FLUX and Wan have no sample_size: 1024x1024 and 480x832 pixels, their pipelines' defaults).

`batch` defaults to what the pipeline passes in one denoiser call: 2 (classifier-free
guidance as one batch) except FLUX.1-dev (guidance-distilled; true CFG, when asked for, is
a second call) and Wan (its two guidance passes are two calls): 1. `frames` is what the
pipeline is asked for: for Wan, video frames, of which its VAE keeps the first and
compresses the rest 4:1 (`wan_latent_frames`).
"""
import torch

__all__ = ["example_inputs", "KNOWN_CLASSES", "default_batch", "wan_latent_frames"]

UNET_CLASSES = ("UNet2DConditionModel", "UNetSpatioTemporalConditionModel", "UNetMotionModel",
                "UNet3DConditionModel")
TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel",
                       "DiTTransformer2DModel", "WanTransformer3DModel")
KNOWN_CLASSES = UNET_CLASSES + TRANSFORMER_CLASSES
VIDEO_CLASSES = ("UNetSpatioTemporalConditionModel", "UNetMotionModel", "UNet3DConditionModel",
                 "WanTransformer3DModel")
SINGLE_CALL_BATCH = ("FluxTransformer2DModel", "WanTransformer3DModel")  # guidance is not a batch of 2
MOTION_FRAMES = 16  # AnimateDiffPipeline's default num_frames
WAN_FRAMES = 81  # WanPipeline's default num_frames
DEFAULT_LATENT = {  # (height, width) in latent pixels (VAE factor 8) where the config has no sample_size
    "FluxTransformer2DModel": (128, 128),  # FluxPipeline: 1024x1024
    "WanTransformer3DModel": (60, 104),  # WanPipeline: 480x832
}
# Text tokens per prompt: SD3 concatenates 77 CLIP and 256 T5 tokens (max_sequence_length 256);
# FLUX.1-dev and Wan pad T5 / UMT5 to 512, PixArt-Sigma T5 to 300.
TEXT_TOKENS = {"SD3Transformer2DModel": 77 + 256, "FluxTransformer2DModel": 512, "PixArtTransformer2DModel": 300,
               "WanTransformer3DModel": 512}


def _known_class(denoiser):
    """The first known diffusers class name in the denoiser's MRO (subclasses count)."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in KNOWN_CLASSES and cls.__module__.startswith("diffusers"):
            return cls.__name__
    return None


def default_batch(denoiser):
    """The batch of one denoiser call in the family's pipeline: 2 (classifier-free guidance
    in one batch) or 1 (FLUX.1-dev, Wan: see the module's docstring)."""
    return 1 if _known_class(denoiser) in SINGLE_CALL_BATCH else 2


def wan_latent_frames(frames):
    """(frames WanPipeline generates, latent frames) when asked for `frames`: it rounds to
    4k+1 (80 -> 81), and its VAE keeps the first frame and compresses the rest 4:1."""
    if frames < 1:
        raise ValueError(f"frames={frames} must be at least 1")
    if frames % 4 != 1:
        frames = frames // 4 * 4 + 1
    return frames, (frames - 1) // 4 + 1


def example_inputs(denoiser, batch=None, height=None, width=None, frames=None, text_len=None):
    """A `make_inputs` for `denoiser`, dispatched on its diffusers class; `batch` 2 is
    classifier-free guidance (default: `default_batch`), `frames` applies to video
    denoisers, `text_len` (default: the pipeline's token count) to text-conditioned ones.
    Raises TypeError with the reason for a class it does not know."""
    kind = _known_class(denoiser)
    if kind is None:
        raise TypeError(
            f"no example inputs for {type(denoiser).__name__}: known classes are {', '.join(KNOWN_CLASSES)}; "
            "pass example inputs for it explicitly"
        )
    if frames is not None and kind not in VIDEO_CLASSES:
        raise TypeError(f"{kind} is an image denoiser: it takes no frames (got frames={frames})")
    batch = default_batch(denoiser) if batch is None else batch
    text_len = text_len or TEXT_TOKENS.get(kind, 77)
    return _BUILDERS[kind](denoiser, batch, height, width, frames, text_len)


def _place(denoiser):
    param = next(denoiser.parameters())
    return param.device, param.dtype


def _latent_size(config, height, width):
    size = getattr(config, "sample_size", None)
    if size is None:
        if height is None or width is None:
            raise TypeError("this denoiser's config has no sample_size: give height and width")
        size = (height, width)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return height or size[0], width or size[1]


def _default_size(kind, height, width):
    default = DEFAULT_LATENT[kind]
    return height or default[0], width or default[1]


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def unet2d_inputs(denoiser, batch=2, height=None, width=None, text_len=77):
    """UNet2DConditionModel (also duck-typed): text conditioning, SDXL's `added_cond_kwargs`,
    `timestep_cond`, and `class_labels` (the x4 upscaler's noise level) where the config has them."""
    config = getattr(denoiser, "config", None)
    needed = ("in_channels", "sample_size", "cross_attention_dim")
    if config is None or any(not hasattr(config, k) for k in needed):
        raise TypeError(
            f"{type(denoiser).__name__} has no UNet2DConditionModel-style config "
            f"({', '.join(needed)}); pass example inputs for it explicitly"
        )
    addition = getattr(config, "addition_embed_type", None)
    if addition not in (None, "text", "text_time"):
        raise TypeError(f"UNet2DConditionModel with addition_embed_type={addition!r} needs image inputs "
                        "this builder does not make; pass example inputs for it explicitly")
    h, w = _latent_size(config, height, width)
    device, dtype = _place(denoiser)
    text_dim = _first(config.cross_attention_dim)
    if getattr(config, "encoder_hid_dim_type", None) == "text_proj" and getattr(config, "encoder_hid_dim", None):
        text_dim = config.encoder_hid_dim
    class_shape = _class_labels(config)

    def make():
        latent = torch.empty(batch, config.in_channels, h, w, device=device, dtype=dtype)
        timestep = torch.tensor(999.0, device=device)
        kwargs = {"encoder_hidden_states": torch.empty(batch, text_len, text_dim, device=device, dtype=dtype)}
        if addition == "text_time":
            kwargs["added_cond_kwargs"] = _text_time(config, batch, device, dtype)
        if getattr(config, "time_cond_proj_dim", None):
            kwargs["timestep_cond"] = torch.empty(batch, config.time_cond_proj_dim, device=device, dtype=dtype)
        if class_shape is not None:
            shape, label_dtype = class_shape
            label_dtype = label_dtype or dtype
            kwargs["class_labels"] = torch.zeros(batch, *shape, device=device, dtype=label_dtype)
        return latent, timestep, (), kwargs

    return make


def _class_labels(config):
    """(trailing shape, dtype or None for the model's) of `class_labels`, or None."""
    kind = getattr(config, "class_embed_type", None)
    if kind is None:
        return ((), torch.long) if getattr(config, "num_class_embeds", None) else None
    if kind == "timestep":
        return (), torch.float32
    if kind == "identity":
        return (getattr(config, "time_embedding_dim", None) or config.block_out_channels[0] * 4,), None
    if kind in ("projection", "simple_projection"):
        return (config.projection_class_embeddings_input_dim,), None
    raise TypeError(f"UNet2DConditionModel with class_embed_type={kind!r} is not known to the example inputs")


def _text_time(config, batch, device, dtype):
    """SDXL's pooled text embedding and 6 time ids (original size, crop, target size)."""
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "text_embeds": torch.empty(batch, text_dim, device=device, dtype=dtype),
        "time_ids": torch.empty(batch, 6, device=device, dtype=dtype),
    }


def _unet2d(denoiser, batch, height, width, frames, text_len):
    return unet2d_inputs(denoiser, batch, height, width, text_len)


def _svd(denoiser, batch, height, width, frames, text_len):
    """Stable Video Diffusion: latent (B, F, 8, H, W) = noise and the image latent; one CLIP
    image embedding (B, 1, 1024) as encoder_hidden_states; added_time_ids (B, 3) = fps,
    motion bucket, noise augmentation."""
    config = denoiser.config
    h, w = _latent_size(config, height, width)
    f = frames or config.num_frames
    device, dtype = _place(denoiser)
    ids = config.projection_class_embeddings_input_dim // config.addition_time_embed_dim
    cross = _first(config.cross_attention_dim)

    def make():
        latent = torch.empty(batch, f, config.in_channels, h, w, device=device, dtype=dtype)
        timestep = torch.tensor(999.0, device=device)
        kwargs = {
            "encoder_hidden_states": torch.empty(batch, 1, cross, device=device, dtype=dtype),
            "added_time_ids": torch.empty(batch, ids, device=device, dtype=dtype),
        }
        return latent, timestep, (), kwargs

    return make


def _motion(denoiser, batch, height, width, frames, text_len):
    """AnimateDiff's UNetMotionModel: latent (B, C, F, H, W), channels before frames; the
    pipeline repeats the text embedding per frame, so encoder_hidden_states is (B*F, L, D);
    SDXL-based ones also take added_cond_kwargs (per video, repeated inside)."""
    config = denoiser.config
    h, w = _latent_size(config, height, width)
    f = frames or MOTION_FRAMES
    if f > config.motion_max_seq_length:
        raise ValueError(f"{f} frames exceed this motion module's motion_max_seq_length "
                         f"{config.motion_max_seq_length}")
    device, dtype = _place(denoiser)
    cross = _first(config.cross_attention_dim)
    addition = getattr(config, "addition_embed_type", None)

    def make():
        latent = torch.empty(batch, config.in_channels, f, h, w, device=device, dtype=dtype)
        timestep = torch.tensor(999.0, device=device)
        kwargs = {"encoder_hidden_states": torch.empty(batch * f, text_len, cross, device=device, dtype=dtype)}
        if addition == "text_time":
            kwargs["added_cond_kwargs"] = _text_time(config, batch, device, dtype)
        if getattr(config, "time_cond_proj_dim", None):
            kwargs["timestep_cond"] = torch.empty(batch, config.time_cond_proj_dim, device=device, dtype=dtype)
        return latent, timestep, (), kwargs

    return make


def _unet3d(denoiser, batch, height, width, frames, text_len):
    """UNet3DConditionModel (text-to-video): latent (B, C, F, H, W); the model repeats the
    text embedding (B, L, D) per frame itself."""
    config = denoiser.config
    h, w = _latent_size(config, height, width)
    f = frames or MOTION_FRAMES
    device, dtype = _place(denoiser)
    cross = _first(config.cross_attention_dim)

    def make():
        latent = torch.empty(batch, config.in_channels, f, h, w, device=device, dtype=dtype)
        timestep = torch.tensor(999.0, device=device)
        kwargs = {"encoder_hidden_states": torch.empty(batch, text_len, cross, device=device, dtype=dtype)}
        return latent, timestep, (), kwargs

    return make


def _sd3(denoiser, batch, height, width, frames, text_len):
    """SD3 / SD3.5 (StableDiffusion3Pipeline): latent (B, 16, H/8, W/8); the joint text
    sequence of CLIP and T5 tokens (B, 77+256, 4096); the pooled CLIP embeddings (B, 2048);
    one timestep per sample (the flow-matching scheduler's float)."""
    config = denoiser.config
    h, w = _latent_size(config, height, width)
    device, dtype = _place(denoiser)

    def make():
        latent = torch.empty(batch, config.in_channels, h, w, device=device, dtype=dtype)
        timestep = torch.full((batch,), 1000.0, device=device)
        kwargs = {
            "encoder_hidden_states": torch.empty(batch, text_len, config.joint_attention_dim, device=device,
                                                 dtype=dtype),
            "pooled_projections": torch.empty(batch, config.pooled_projection_dim, device=device, dtype=dtype),
        }
        return latent, timestep, (), kwargs

    return make


def _flux(denoiser, batch, height, width, frames, text_len):
    """FLUX.1 (FluxPipeline): the latent (H/8, W/8) packed in 2x2 patches, (B, H/16 * W/16,
    64); T5 embeddings (B, 512, 4096), pooled CLIP (B, 768); the timestep already divided by
    1000, in the latent dtype; position ids of the image (H/16 * W/16, 3) and text (512, 3)
    tokens; the distilled guidance scale (B,) where the config embeds it."""
    config = denoiser.config
    h, w = _default_size("FluxTransformer2DModel", height, width)
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs the latent in 2x2 patches: latent {h}x{w} must have even sides")
    tokens = (h // 2) * (w // 2)
    device, dtype = _place(denoiser)

    def make():
        latent = torch.empty(batch, tokens, config.in_channels, device=device, dtype=dtype)
        timestep = torch.full((batch,), 1.0, device=device, dtype=dtype)  # t / 1000
        kwargs = {
            "encoder_hidden_states": torch.empty(batch, text_len, config.joint_attention_dim, device=device,
                                                 dtype=dtype),
            "pooled_projections": torch.empty(batch, config.pooled_projection_dim, device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
            "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
        }
        if config.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
        return latent, timestep, (), kwargs

    return make


def _pixart(denoiser, batch, height, width, frames, text_len):
    """PixArt-Sigma (PixArtSigmaPipeline): latent (B, 4, H/8, W/8); T5 embeddings (B, 300,
    4096) with their attention mask (B, 300); `added_cond_kwargs` without resolution and
    aspect ratio (use_additional_conditions is off for Sigma); integer timesteps."""
    config = denoiser.config
    h, w = _latent_size(config, height, width)
    device, dtype = _place(denoiser)
    caption = config.caption_channels or config.cross_attention_dim

    def make():
        latent = torch.empty(batch, config.in_channels, h, w, device=device, dtype=dtype)
        timestep = torch.full((batch,), 999, device=device, dtype=torch.long)
        kwargs = {
            "encoder_hidden_states": torch.empty(batch, text_len, caption, device=device, dtype=dtype),
            "encoder_attention_mask": torch.ones(batch, text_len, device=device, dtype=torch.long),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        return latent, timestep, (), kwargs

    return make


def _dit(denoiser, batch, height, width, frames, text_len):
    """DiT (DiTPipeline): latent (B, 4, H/8, W/8), ImageNet class labels (B,) with the null
    class for the unconditional half, integer timesteps."""
    config = denoiser.config
    h, w = _latent_size(config, height, width)
    device, dtype = _place(denoiser)

    def make():
        latent = torch.empty(batch, config.in_channels, h, w, device=device, dtype=dtype)
        timestep = torch.full((batch,), 999, device=device, dtype=torch.long)
        kwargs = {"class_labels": torch.zeros(batch, device=device, dtype=torch.long)}
        return latent, timestep, (), kwargs

    return make


def _wan(denoiser, batch, height, width, frames, text_len):
    """Wan 2.1 text-to-video (WanPipeline): latent (B, 16, F', H/8, W/8) with F' =
    (frames - 1) // 4 + 1 (`wan_latent_frames`); UMT5 embeddings (B, 512, 4096); one float
    timestep per sample."""
    config = denoiser.config
    h, w = _default_size("WanTransformer3DModel", height, width)
    _, f = wan_latent_frames(frames or WAN_FRAMES)
    device, dtype = _place(denoiser)

    def make():
        latent = torch.empty(batch, config.in_channels, f, h, w, device=device, dtype=dtype)
        timestep = torch.full((batch,), 1000.0, device=device)
        kwargs = {"encoder_hidden_states": torch.empty(batch, text_len, config.text_dim, device=device, dtype=dtype)}
        return latent, timestep, (), kwargs

    return make


_BUILDERS = {
    "UNet2DConditionModel": _unet2d,
    "UNetSpatioTemporalConditionModel": _svd,
    "UNetMotionModel": _motion,
    "UNet3DConditionModel": _unet3d,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
    "PixArtTransformer2DModel": _pixart,
    "DiTTransformer2DModel": _dit,
    "WanTransformer3DModel": _wan,
}
