"""`asyncdiff-rt project`: latency on D GPUs *projected* from measured forward times and a
link model, by simulating the program event by event (profiling/projection.py).

Forward times come from a timeline summary (`asyncdiff-rt profile` or `handle.profile`
on a GPU: `forward_ms_per_device`, `warmup_ms`, `host_ms_per_step`), measured with the
same model, size, N, S and partition. The figures are projections, not measurements:
say so wherever they are quoted.
"""
import json


def register(subparsers):
    p = subparsers.add_parser("project", help="project latency on D GPUs from measured forward times",
                              description=__doc__)
    p.add_argument("--model", default="sd15", help="a name `asyncdiff-rt plan` knows")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("-n", "--n-components", type=int, default=2)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--partition", default="auto")
    p.add_argument("--times", required=True, help="a timeline summary JSON with the measured times")
    p.add_argument("--links", default="a5000", choices=("a5000", "pcie4", "h100"),
                   help="a5000: NVLink bridges on pairs (0,1), (2,3), PCIe 4.0 x16 between pairs")
    p.set_defaults(func=run)


def run(args):
    from ..cli import Refusal
    from ..example_inputs import example_inputs
    from ..models.configs import MODEL_ALIASES, build_unet
    from ..plan import make_plan
    from ..profiling.projection import LINKS, a5000_bridged, project

    name = MODEL_ALIASES.get(args.model)
    if name is None:
        raise Refusal(f"unknown model {args.model!r}; choose one of {', '.join(sorted(set(MODEL_ALIASES.values())))}")
    try:
        times = json.loads(open(args.times).read())
        forward = [ms / 1e3 for ms in times["forward_ms_per_device"]]
        warmup, host = times["warmup_ms"] / 1e3, times["host_ms_per_step"]["median"] / 1e3
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise Refusal(f"{args.times}: not a timeline summary with forward_ms_per_device, warmup_ms and "
                      f"host_ms_per_step ({type(e).__name__}: {e})") from None
    devices = args.n_components + args.stride - 1
    if len(forward) != devices:
        raise Refusal(f"{args.times} has forward times for {len(forward)} devices; this plan has {devices}")
    denoiser = build_unet(name)
    size = {k: v // 8 for k, v in (("height", args.height), ("width", args.width)) if v}
    plan = make_plan(denoiser, example_inputs(denoiser, **size), args.n_components, args.stride, args.warmup,
                     partition=args.partition)
    link = {"a5000": a5000_bridged(), "pcie4": lambda a, b: LINKS["pcie4-x16"],
            "h100": lambda a, b: LINKS["nvlink-h100"]}[args.links]
    result = project(plan, plan.program(args.steps), forward, warmup, host, link)
    sequential = args.steps * (warmup + host)
    print(f"PROJECTED (not measured): {name}, N={args.n_components} S={args.stride} W={args.warmup}, "
          f"{args.steps} steps, links {args.links}, times from {args.times}")
    print(f"  latency {result.latency_s * 1e3:.1f} ms; sequential {sequential * 1e3:.1f} ms "
          f"(K x (warm-up forward + host)); speedup {sequential / result.latency_s:.2f}x")
    print(f"  exposed communication {result.waits_s * 1e3:.1f} ms; busy per device "
          + " / ".join(f"{b * 1e3:.0f}" for b in result.busy_s) + " ms")
    return 0
