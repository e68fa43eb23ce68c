"""`asyncdiff-rt eval`: quality of asynchronous denoising on the shipped tiny model."""
from __future__ import annotations

import os
import shlex
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="quality table (adherence, Frechet, PSNR vs sequential) on the shipped tiny model",
        description=__doc__)
    p.add_argument("--model", default="unet", choices=["unet", "dit"],
                   help="the shipped tiny UNet, or the shipped tiny transformer (PixArt DiT)")
    p.add_argument("--configs", default="1,2x1,3x1,4x1,2x2,3x2", help="N or NxS list; 1 = sequential")
    p.add_argument("--warmup", default="1,3", help="warm-up step counts W")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--partition", default=None, help="default: auto,upstream (unet), auto (dit)")
    p.add_argument("--stride-reuse", default="component,previous")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--prompts", default="heldout", choices=["heldout", "train", "all"],
                   help="attribute combinations the prompts cycle through (heldout: never seen in training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="images per pipeline call")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--out", default=os.path.join("profiling", "results", "eval"),
                   help="folder for eval.json and eval_grid.png")
    p.set_defaults(func=run)


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args) -> int:
    from ..evaluation import format_table, run_eval

    try:
        warmups = [int(w) for w in _list(args.warmup)]
    except ValueError:
        print(f"--warmup {args.warmup!r}: give integers, e.g. 1,3", file=sys.stderr)
        return 2
    try:
        result = run_eval(configs=args.configs, warmups=warmups, samples=args.samples, steps=args.steps,
                          partitions=_list(args.partition) if args.partition else None,
                          stride_reuse=_list(args.stride_reuse), model=args.model,
                          guidance=args.guidance, prompts=args.prompts, seed=args.seed, batch=args.batch,
                          out_dir=args.out, device=args.device,
                          command="asyncdiff-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {os.path.join(args.out, 'eval.json')} and {os.path.join(args.out, 'eval_grid.png')}")
    return 0
