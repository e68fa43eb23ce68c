"""`asyncdiff-rt profile`: one generation through `parallelize` with the local executor,
recorded: a Chrome trace (open it in Perfetto), a Gantt PNG and a summary (busy fraction
per lane and copy stream, exposed communication, host time per step, which lane ends each
step last).

GPU (default): SD 1.5's architecture with random fp16 weights at 512x512 on virtual
devices of one card (`--devices cuda:0*N`). `--quick`: the tiny SD 1.5 pipeline on the
CPU (`cpu*N`), a few steps. For an Nsight timeline instead, run any pipeline under
`nsys profile -t cuda,nvtx --cuda-graph-trace=node`: the runtime's NVTX ranges name steps,
lanes, forwards and sends.
"""
import json
import sys
from pathlib import Path

import torch


def register(subparsers):
    p = subparsers.add_parser("profile", help="record a timeline of the local executor (trace, Gantt, summary)",
                              description=__doc__)
    p.add_argument("--quick", action="store_true", help="the tiny pipeline on the CPU (a smoke test)")
    p.add_argument("-n", "--n-components", type=int, default=2)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --quick 6)")
    p.add_argument("--devices", default=None, help="default: cpu*D with --quick, else cuda:0*D")
    p.add_argument("--graphs", choices=("on", "off"), default="on")
    p.add_argument("--out", default="profiling/results/profile", help="folder for the trace, PNG and summary")
    p.set_defaults(func=run)


def run(args):
    from ..cli import Refusal
    from ..integrations.diffusers import parallelize

    n_devices = args.n_components + args.stride - 1
    if not args.quick and not torch.cuda.is_available():
        raise Refusal("no GPU is visible: use --quick for the tiny pipeline on the CPU")
    devices = args.devices or (f"cpu*{n_devices}" if args.quick else f"cuda:0*{n_devices}")
    steps = args.steps or (6 if args.quick else 50)
    pipe, size = _pipeline(args.quick)
    generate = _generator(pipe, size, steps)
    handle = parallelize(pipe, n_components=args.n_components, stride=args.stride, warmup=args.warmup,
                         devices=devices, executor="local", graphs=args.graphs == "on")
    try:
        generate()  # plans, allocates and captures: not what the profile should show
        with handle.profile(args.out) as timeline:
            generate()
    finally:
        handle.remove()
    summary = timeline.summary()
    name = "tiny SD 1.5 (CPU)" if args.quick else "SD 1.5 architecture, fp16, 512x512"
    print(f"profiled {name}: N={args.n_components} S={args.stride} W={args.warmup}, {steps} steps on {devices}")
    print(json.dumps(summary, indent=1))
    print(f"wrote {Path(args.out) / 'timeline.json'} (Chrome trace), timeline.png, timeline_summary.json",
          file=sys.stderr)
    return 0


def _pipeline(quick):
    from ..models.tiny_pipelines import tiny_sd_pipeline

    if quick:
        return tiny_sd_pipeline("sd15"), 16
    from ..models.configs import build_unet

    pipe = tiny_sd_pipeline("sd15")  # text encoder, tokenizer, VAE: tiny (only latents come out)
    pipe.unet = build_unet("sd15", device="cuda", dtype=torch.float16).eval()
    pipe.vae_scale_factor = 8  # SD's: 512 px are 64x64 latents
    pipe.to("cuda")
    return pipe, 512


def _generator(pipe, size, steps):
    """One generation at `size` px with guidance; tiny pipelines' text width is not SD's,
    so at full size the prompt embeddings are made to the UNet's width."""
    unet = pipe.unet
    width = unet.config.cross_attention_dim
    embeds = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(0)).to(unet.device, unet.dtype)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=steps,
                    height=size, width=size, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    return generate
