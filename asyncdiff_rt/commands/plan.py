"""`asyncdiff-rt plan`: the plan for a known architecture or a local model folder,
built on the meta device (no weights, no network)."""
import json
from pathlib import Path

import torch

from ..models.configs import MODEL_ALIASES, build_unet
from ..plan import make_plan
from ..trace import unet_inputs

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def register(subparsers):
    p = subparsers.add_parser("plan", help="print units per component, balance, ideal speedup and bytes moved",
                              description=__doc__)
    p.add_argument("--model", default="sd15", help="sd15, sd21, sdxl, or a folder with a UNet config.json "
                   "(a diffusers model folder, or a pipeline folder with unet/config.json)")
    p.add_argument("-n", "--n-components", type=int, default=2)
    p.add_argument("-s", "--stride", type=int, default=1)
    p.add_argument("-w", "--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="denoising steps for the ideal speedup")
    p.add_argument("--partition", default="auto", choices=["auto", "upstream"])
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--dtype", default="fp16", choices=sorted(_DTYPES))
    p.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def load_meta_unet(model, dtype):
    """A weightless UNet: a known family by name, or the config.json of a local folder."""
    if model.lower() in MODEL_ALIASES:
        return build_unet(MODEL_ALIASES[model.lower()], dtype=dtype), 8
    folder = Path(model)
    config_path = next((p for p in (folder / "unet" / "config.json", folder / "config.json") if p.is_file()), None)
    if config_path is None:
        raise SystemExit(f"--model {model!r} is neither sd15, sd21, sdxl nor a folder holding config.json "
                         "or unet/config.json")
    from diffusers import UNet2DConditionModel

    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    vae_config = folder / "vae" / "config.json"
    factor = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1) if vae_config.is_file() else 8
    return torch.nn.Module.to(unet, dtype), factor


def run(args):
    unet, vae_factor = load_meta_unet(args.model, _DTYPES[args.dtype])
    side = args.resolution // vae_factor if args.resolution else None
    if args.resolution and args.resolution % (vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)):
        raise SystemExit(f"--resolution {args.resolution} must be a multiple of "
                         f"{vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)} for this model")
    plan = make_plan(unet, unet_inputs(unet, batch=args.batch, height=side, width=side), args.n_components,
                     args.stride, args.warmup, partition=args.partition)
    if args.json:
        print(json.dumps({"model": args.model, "resolution": args.resolution, **plan.summary(args.steps)}, indent=1))
    else:
        print(f"model {args.model}, {args.dtype}, batch {args.batch}, resolution {args.resolution or 'default'}")
        print(plan.describe(args.steps))
    return 0
