"""`asyncdiff-rt plan`: the plan for a known architecture or a local model folder,
built on the meta device (no weights, no network).

Sizes default to what the family's diffusers pipeline generates: SD 1.5 512, SD 2.1 768,
SDXL 1024, SVD 25 frames (the config's num_frames) at 576x1024, AnimateDiff 16 frames at
512 (SDXL: 1024), the x4 upscaler 512 (a 128x128 low-resolution input; its latent is
128x128); SD3, SD3.5, FLUX.1-dev and PixArt-Sigma 1024, DiT-XL/2 256, Wan 2.1 81 frames at
480x832. --resolution/--height/--width are in output pixels. The batch is one denoiser
call's: 2 (classifier-free guidance in one batch), FLUX.1-dev and Wan 1 (guidance-distilled;
Wan's two guidance passes are two calls).
"""
import json
from pathlib import Path

from ..cli import Refusal
from ..example_inputs import KNOWN_CLASSES, TRANSFORMER_CLASSES, VIDEO_CLASSES

_DTYPES = ("bf16", "fp16", "fp32")
NAMED = ("sd15", "sd21", "sdxl", "svd", "animatediff", "animatediff-sdxl", "upscaler", "sd3", "sd35-large",
         "flux-dev", "pixart-sigma", "dit-xl", "wan2.1-1.3b", "wan2.1-14b")
DEFAULT_PIXELS = {  # (height, width) a pipeline generates where the denoiser's sample_size does not say
    "UNetSpatioTemporalConditionModel": (576, 1024),  # StableVideoDiffusionPipeline
    "FluxTransformer2DModel": (1024, 1024),  # FluxPipeline (no sample_size in the config)
    "WanTransformer3DModel": (480, 832),  # WanPipeline
}


def register(subparsers):
    p = subparsers.add_parser("plan", help="print units per component, balance, ideal speedup and bytes moved",
                              description=__doc__)
    p.add_argument("--model", default="sd15", help=f"{', '.join(NAMED)} (aliases: flux, sd3-medium, wan-14b, ...), "
                   "or a folder: a diffusers model folder (config.json; its _class_name picks the class) or a "
                   "pipeline folder (model_index.json, unet/config.json or transformer/config.json)")
    p.add_argument("-n", "--n-components", type=int, default=2)
    p.add_argument("-s", "--stride", type=int, default=1)
    p.add_argument("-w", "--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="denoising steps for the ideal speedup")
    p.add_argument("--partition", default="auto", choices=["auto", "upstream"])
    p.add_argument("--resolution", type=int, default=None,
                   help="output side in pixels, height and width (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (overrides --resolution)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (overrides --resolution)")
    p.add_argument("--frames", type=int, default=None,
                   help="video frames (default: SVD its config's num_frames, 25 for img2vid-xt; AnimateDiff 16; "
                   "Wan 81, rounded to 4k+1 as WanPipeline does)")
    p.add_argument("--dtype", default="fp16", choices=_DTYPES)
    p.add_argument("--batch", type=int, default=None,
                   help="batch of one denoiser call: 2 = classifier-free guidance (default; FLUX.1-dev and Wan: 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _one_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Refusal(f"cannot read {path}: {_one_line(e)}") from None


def locate(model):
    """Where the architecture comes from: ("name", family) or ("folder", config, class
    name, VAE factor or None, config path). Refuses what plan cannot build."""
    from ..models.configs import MODEL_ALIASES

    name = MODEL_ALIASES.get(model.lower())
    if name is not None:
        return "name", name
    folder = Path(model)
    config_path = next((p for p in (folder / "unet" / "config.json", folder / "transformer" / "config.json",
                                    folder / "config.json") if p.is_file()), None)
    index_path = folder / "model_index.json"
    if config_path is None:
        if index_path.is_file():
            index = _read_json(index_path)
            if index.get("unet"):
                raise Refusal(f"the pipeline folder {model!r} has no unet/config.json")
            if index.get("transformer"):
                raise Refusal(f"the pipeline folder {model!r} has no transformer/config.json "
                              "(and model_index.json names no 'unet')")
            raise Refusal(f"the pipeline folder {model!r} has no unet (model_index.json names no 'unet' "
                          "and no 'transformer')")
        raise Refusal(f"--model {model!r} is neither {', '.join(NAMED)} nor a folder holding config.json, "
                      "unet/config.json or transformer/config.json")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise Refusal(f"{config_path} holds no model config")
    class_name = config.get("_class_name")
    part = config_path.parent.name
    if class_name is None and index_path.is_file() and part in ("unet", "transformer"):
        entry = _read_json(index_path).get(part)
        class_name = entry[-1] if isinstance(entry, (list, tuple)) and entry else None
    class_name = class_name or "UNet2DConditionModel"
    if class_name not in KNOWN_CLASSES:
        raise Refusal(f"{config_path} describes {class_name}, not a denoiser plan knows "
                      f"({', '.join(KNOWN_CLASSES)})")
    vae_config = folder / "vae" / "config.json"
    factor = None
    if vae_config.is_file():
        vae = _read_json(vae_config)
        if vae.get("block_out_channels"):
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
        elif vae.get("scale_factor_spatial"):  # AutoencoderKLWan
            factor = vae["scale_factor_spatial"]
    return "folder", {**config, "_class_name": class_name}, class_name, factor, config_path


def load_meta_denoiser(model, dtype):
    """(weightless denoiser, VAE factor or None): a known family by name, or the config
    of a local folder. Refuses what it cannot build."""
    from ..models.configs import VAE_FACTORS, build_from_config, build_unet

    source = locate(model)
    if source[0] == "name":
        return build_unet(source[1], dtype=dtype), VAE_FACTORS.get(source[1], 8)
    _, config, class_name, factor, config_path = source
    try:
        return build_from_config(class_name, config, dtype=dtype), factor
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise Refusal(f"{config_path} does not build a {class_name}: {_one_line(e)}") from None


def _multiple(denoiser, factor):
    """Pixels a side must be a multiple of: the UNet's total downsampling, or a
    transformer's patch (FLUX packs 2x2 latent patches; Wan's patch is (1, 2, 2))."""
    config, kind = denoiser.config, type(denoiser).__name__
    if kind == "FluxTransformer2DModel":
        return factor * 2
    if kind in TRANSFORMER_CLASSES:
        patch = config.patch_size
        return factor * (patch[-1] if isinstance(patch, (tuple, list)) else patch)
    return factor * 2 ** (len(config.block_out_channels) - 1)


def _sizes(args, denoiser, family, factor):
    """(height, width) in pixels, frames or None, VAE factor; refused when impossible."""
    from ..models.configs import VAE_FACTORS

    kind = type(denoiser).__name__
    factor = factor or VAE_FACTORS.get(family, 8)
    if kind in DEFAULT_PIXELS:
        default = DEFAULT_PIXELS[kind]
    else:
        side = getattr(denoiser.config, "sample_size", None)
        side = side if isinstance(side, (tuple, list)) else (side, side)
        default = None if side[0] is None else (side[0] * factor, side[1] * factor)
    height = args.height or args.resolution or (default and default[0])
    width = args.width or args.resolution or (default and default[1])
    if not height or not width:
        raise Refusal(f"this {kind} has no sample_size: give --resolution (or --height and --width)")
    multiple = _multiple(denoiser, factor)
    for flag, value in (("--height", args.height), ("--width", args.width), ("--resolution", args.resolution)):
        if value is not None and (value <= 0 or value % multiple):
            raise Refusal(f"{flag} {value} must be a multiple of {multiple} for this model")
    frames = args.frames
    if kind not in VIDEO_CLASSES:
        if frames is not None:
            raise Refusal(f"--frames applies to video denoisers; {args.model} is an image {kind}")
    elif frames is None:
        frames = {"UNetSpatioTemporalConditionModel": getattr(denoiser.config, "num_frames", None),
                  "WanTransformer3DModel": 81}.get(kind, 16)
    elif frames < 1:
        raise Refusal(f"--frames {frames} must be at least 1")
    return height, width, frames, factor


def _tokens(denoiser, latent, latent_frames):
    """Image (video) tokens a transformer attends over, or None for a UNet."""
    kind, config = type(denoiser).__name__, denoiser.config
    if kind not in TRANSFORMER_CLASSES:
        return None
    patch = 2 if kind == "FluxTransformer2DModel" else config.patch_size
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    return (latent_frames or 1) // patch[0] * (latent[0] // patch[1]) * (latent[1] // patch[2])


def run(args):
    import torch

    from ..example_inputs import default_batch, example_inputs, wan_latent_frames
    from ..plan import make_plan
    from ..trace import TraceError
    from ..upstream_splits import recognise_family

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    denoiser, factor = load_meta_denoiser(args.model, dtype)
    family = recognise_family(denoiser)
    height, width, frames, factor = _sizes(args, denoiser, family, factor)
    latent = (height // factor, width // factor)
    kind = type(denoiser).__name__
    batch = default_batch(denoiser) if args.batch is None else args.batch
    if batch < 1:
        raise Refusal(f"--batch {batch} must be at least 1")
    latent_frames = None
    if kind == "WanTransformer3DModel":
        frames, latent_frames = wan_latent_frames(frames)
    try:
        inputs = example_inputs(denoiser, batch=batch, height=latent[0], width=latent[1], frames=frames)
        plan = make_plan(denoiser, inputs, args.n_components, args.stride, args.warmup, partition=args.partition)
        summary = plan.summary(args.steps)
    except (ValueError, TypeError, TraceError) as e:
        raise Refusal(f"cannot plan {args.model}: {_one_line(e)}") from None
    tokens = _tokens(denoiser, latent, latent_frames)
    if args.json:
        print(json.dumps({"model": args.model, "class": kind, "family": family, "resolution": args.resolution,
                          "height": height, "width": width, "latent": list(latent), "frames": frames,
                          "latent_frames": latent_frames, "tokens": tokens, "batch": batch, **summary}, indent=1))
    else:
        video = f"{frames} frames at " if frames else ""
        if latent_frames:
            video = f"{frames} frames ({latent_frames} latent) at "
        extra = f", {tokens} tokens" if tokens else ""
        print(f"model {args.model} ({kind}, family {family or 'not recognised'}), {args.dtype}, batch {batch}, "
              f"{video}{height}x{width} px (latent {latent[0]}x{latent[1]}{extra})")
        print(plan.describe(args.steps))
    return 0
