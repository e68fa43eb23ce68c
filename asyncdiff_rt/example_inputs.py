"""Example inputs at real shapes for tracing a diffusers denoiser (see trace.py).

`example_inputs(denoiser, ...)` returns a `make_inputs()` that builds (latent, timestep,
cond_args, cond_kwargs) as the matching diffusers pipeline would pass them; `trace`
calls it inside its fake-tensor mode, so nothing is allocated. `height`/`width` are in
latent pixels (default: the config's `sample_size`, square; SVD's pipeline makes 576x1024
videos, latent 72x128, whatever its sample_size says: `asyncdiff-rt plan` passes that).
"""
import torch

__all__ = ["example_inputs", "KNOWN_CLASSES"]

KNOWN_CLASSES = ("UNet2DConditionModel", "UNetSpatioTemporalConditionModel", "UNetMotionModel",
                 "UNet3DConditionModel")
MOTION_FRAMES = 16  # AnimateDiffPipeline's default num_frames


def _known_class(denoiser):
    """The first known diffusers class name in the denoiser's MRO (subclasses count)."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in KNOWN_CLASSES and cls.__module__.startswith("diffusers"):
            return cls.__name__
    return None


def example_inputs(denoiser, batch=2, height=None, width=None, frames=None, text_len=77):
    """A `make_inputs` for `denoiser`, dispatched on its diffusers class; `batch` 2 is
    classifier-free guidance, `frames` applies to video denoisers. Raises TypeError with
    the reason for a class it does not know."""
    kind = _known_class(denoiser)
    if kind is None:
        raise TypeError(
            f"no example inputs for {type(denoiser).__name__}: known classes are {', '.join(KNOWN_CLASSES)}; "
            "pass example inputs for it explicitly"
        )
    if frames is not None and kind == "UNet2DConditionModel":
        raise TypeError(f"{kind} is an image denoiser: it takes no frames (got frames={frames})")
    return _BUILDERS[kind](denoiser, batch, height, width, frames, text_len)


def _place(denoiser):
    param = next(denoiser.parameters())
    return param.device, param.dtype


def _latent_size(config, height, width):
    size = config.sample_size
    if size is None:
        if height is None or width is None:
            raise TypeError("this denoiser's config has no sample_size: give height and width")
        size = (height, width)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return height or size[0], width or size[1]


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


_BUILDERS = {
    "UNet2DConditionModel": _unet2d,
    "UNetSpatioTemporalConditionModel": _svd,
    "UNetMotionModel": _motion,
    "UNet3DConditionModel": _unet3d,
}
