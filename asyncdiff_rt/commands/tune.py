"""`asyncdiff-rt tune`: the fastest N, S, W, split, executor and transport for a pipeline on
the devices at hand, within a quality bound (asyncdiff_rt/tune.py). Latencies are
projected from measured unit times; quality is measured on calibration prompts.
"""
import json
import sys


def register(subparsers):
    p = subparsers.add_parser("tune", help="pick the fastest configuration within a quality bound",
                              description=__doc__)
    p.add_argument("--model", default="unet", choices=["unet", "dit"],
                   help="the shipped tiny UNet or tiny transformer (for your own pipeline: asyncdiff_rt.tune)")
    p.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1 or cpu*4 (default: every visible GPU)")
    p.add_argument("--rig", default=None, help="plan for a described rig instead: pcie:N (no P2P), pcie-p2p:N, "
                   "nvlink-pairs:N")
    p.add_argument("--min-psnr", type=float, default=None, help="lowest PSNR against sequential, dB (default 30)")
    p.add_argument("--memory-gib", type=float, default=None, help="budget per device (default: what each has free)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the generations to tune for")
    p.add_argument("--warmup", default="1,3", help="warm-up step counts W to consider")
    p.add_argument("--partitions", default="auto,upstream,quality")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=run)


def _rig(text):
    from .. import topology

    kind, _, count = text.partition(":")
    makers = {"pcie": lambda n: topology.pcie(n, p2p=False), "pcie-p2p": lambda n: topology.pcie(n, p2p=True),
              "nvlink-pairs": topology.nvlink_pairs}
    if kind not in makers or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--rig {text!r}: write pcie:N, pcie-p2p:N or nvlink-pairs:N")
    return makers[kind](int(count))


def run(args):
    from ..cli import Refusal
    from ..tune import MIN_PSNR_DB, PARTITIONS, check_bound, tune

    bound = MIN_PSNR_DB if args.min_psnr is None else args.min_psnr
    try:
        check_bound(bound)
        rig = _rig(args.rig) if args.rig else None
        devices = args.devices.split(",") if args.devices and "," in args.devices else args.devices
        if rig is None and devices is None:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError("no GPU is visible: pass --devices cpu*N, or --rig to plan for a described rig")
            devices = [f"cuda:{d}" for d in range(count)]
        warmups = tuple(int(w) for w in args.warmup.split(","))
        partitions = tuple(p.strip() for p in args.partitions.split(",") if p.strip())
        if args.model == "dit":
            partitions = tuple(p for p in partitions if p != "upstream")  # no published split for a transformer
        if args.memory_gib is not None and args.memory_gib <= 0:
            raise ValueError(f"--memory-gib {args.memory_gib}: give a budget > 0")
        if rig is None:
            from ..topology import check_devices

            check_devices(devices)
        unknown = [p for p in partitions if p not in PARTITIONS]
        if unknown:
            raise ValueError(f"--partitions: {', '.join(unknown)} unknown; choose from {', '.join(PARTITIONS)}")
    except ValueError as e:
        raise Refusal(str(e)) from None
    from ..models.tiny_dit import load_tiny_dit
    from ..models.tiny_t2i import load_tiny

    pipe = load_tiny_dit() if args.model == "dit" else load_tiny()
    budget = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    result = tune(pipe, devices, min_psnr_db=bound, memory_budget=budget, steps=args.steps, warmups=warmups,
                  partitions=partitions, topology=rig, log=lambda line: print(line, file=sys.stderr))
    print(result.describe())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best": result.best.__dict__, "runner_up": getattr(result.runner_up, "__dict__", None),
                       "sequential_s": result.sequential_s, "min_psnr_db": bound, "reason": result.reason,
                       "measured": [c.__dict__ for c in result.measured]}, f, indent=1, default=str)
    return 0
