"""`asyncdiff-rt bench --context-parallel`: the runtime's distributed executor beside
diffusers' own context parallelism (Ulysses, ring) on one FLUX transformer and the same
ranks, in one run, under torchrun (one process per device):

    torchrun --nproc-per-node 2 --no-python asyncdiff-rt bench --context-parallel [--size tiny|flux] [--out DIR]

A random-weight `FluxTransformer2DModel` (the only thing built: no hub, no text encoders,
no VAE; prompt embeddings are random, the pipeline returns its latents) in a stock
`FluxPipeline`, the same weights on every rank (rank 0's, broadcast). Rows: one process
(eager diffusers, rank 0 alone while the others wait); the runtime's distributed executor
at N = 2; diffusers' context parallelism with `ContextParallelConfig(ulysses_degree=2)`
and `ring_degree=2` (`transformer.enable_parallelism` on its "_native_flash" attention
backend: ring needs one that returns the log-sum-exp), each on a fresh transformer, since
diffusers cannot undo it. Latency: median after one
warm-up call, the slowest rank's; speedup over the best one-process row; the largest
difference of each row's latents from the one process's.

diffusers maps rank r to accelerator r % `torch.accelerator.device_count()` and its mesh to
the accelerator's backend: its rows need 2 visible CUDA devices and an NCCL group. Where
they are not there (the CPU: gloo), the Ulysses and ring rows say why they are empty,
checked before any work, and the other rows still run. `--size tiny`: the tests' tiny
FLUX (2 double + 2 single blocks, width 16), float32 on the CPU, fp16 on GPUs; `--size
flux`: FLUX.1-dev's shapes (19 + 38 blocks, width 3072, 12B parameters, 24 GB per rank)
with random fp16 weights at 1024x1024, GPUs only.
"""
import gc
import os
import platform
from pathlib import Path

import torch

from ..cli import Refusal
from .bench_distributed import _arguments, _max_over_ranks, _same_on_every_rank, _timed, write_tables

WORLD = 2
RUNTIME = "runtime distributed N=2"
ULYSSES = "diffusers context parallelism, Ulysses 2"
RING = "diffusers context parallelism, ring 2"
ROWS = [("one process (eager diffusers)", 1), (RUNTIME, WORLD), (ULYSSES, WORLD), (RING, WORLD)]
TIMEOUT_S = 300  # a rank waits this long for the others (rank 0's one-process row, FLUX-sized builds)
TEXT_TOKENS = 8  # a multiple of the degree: the CP plan splits the text tokens too
# size -> transformer config (None: the tests' tiny one), image side, default steps, description
SIZES = {
    "tiny": (None, 128, 8, "the tests' tiny FLUX transformer (2 double + 2 single blocks, 2 heads x 8), 128x128 "
                           "(64 image tokens + 8 text tokens)"),
    "flux": ("flux-dev", 1024, 28, "FLUX.1-dev's shapes (19 double + 38 single blocks, 24 heads x 128, 12B "
                                   "parameters), random weights, 1024x1024 (4096 image tokens + 8 text tokens)"),
}
# diffusers' attention backend for its context-parallel rows: ring attention merges partial
# results by their log-sum-exp, which the "native" backend (SDPA) does not return; the
# flash kernel through torch (fp16/bf16, CUDA) does, and runs Ulysses too.
CP_BACKEND = "_native_flash"


def dtype_on(device):
    """float32 on the CPU, fp16 on GPUs (the flash kernel the context-parallel rows use needs it)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def visible_cuda_devices():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def context_parallel_unavailable(gpus, backend, device_type):
    """Why diffusers' context parallelism cannot run on these ranks, or None: from the
    visible CUDA devices and the process group's backend, before anything is built."""
    reasons = []
    if gpus < WORLD:
        reasons.append(f"{gpus} CUDA device(s) visible, needs {WORLD} GPUs: diffusers puts rank r on accelerator "
                       f"r % torch.accelerator.device_count() (ZeroDivisionError with none; one GPU would hold "
                       f"both ranks, which NCCL refuses)")
    elif device_type != "cuda":
        reasons.append(f"the ranks run on {device_type} (--device), diffusers' mesh on the GPUs")
    if backend != "nccl":
        why = "" if torch.distributed.is_nccl_available() else " (this torch build has no NCCL)"
        reasons.append(f"the process group's backend is {backend}, needs nccl{why}: diffusers builds its device "
                       f"mesh with the accelerator's backend")
    return "; ".join(reasons) or None


def check_size(size, cuda, gpus):
    """Refuse `--size flux` where the ranks would not run on GPUs."""
    if size == "flux" and not cuda:
        raise Refusal(f"--size flux is FLUX.1-dev's shapes in fp16 (24 GB of weights per rank): GPUs only, one per "
                      f"rank ({gpus} CUDA device(s) visible, {WORLD} needed); on the CPU use --size tiny")


def build_pipeline(size, device, seed=0):
    """A `FluxPipeline` holding only a random transformer of `size`, rank 0's weights on
    every rank."""
    import diffusers
    import torch.distributed as dist

    from ..models.configs import build_from_config, denoiser_config
    from ..models.tiny_pipelines import TINY_FLUX

    name, dtype = SIZES[size][0], dtype_on(device)
    config = TINY_FLUX if name is None else denoiser_config(name)[1]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: FLUX.1's 12B parameters would take 48 GB in float32
    try:
        transformer = build_from_config("FluxTransformer2DModel", config, device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    if dist.is_initialized():
        for t in list(transformer.parameters()) + list(transformer.buffers()):
            dist.broadcast(t.data, src=0)
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_arguments(pipe, size, steps, device):
    """The pipeline call's arguments: random prompt embeddings (the same on every rank),
    latents out."""
    config = pipe.transformer.config
    g = torch.Generator().manual_seed(1)
    dtype = dtype_on(device)
    embeds = torch.randn(1, TEXT_TOKENS, config.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=g).to(device, dtype)
    side = SIZES[size][1]
    return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=side, width=side,
                num_inference_steps=steps, output_type="latent")


def enable_context_parallelism(pipe, label):
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=WORLD) if label == ULYSSES else ContextParallelConfig(
        ring_degree=WORLD)
    pipe.transformer.set_attention_backend(CP_BACKEND)
    pipe.transformer.enable_parallelism(config=config)


def run(args):
    gpus = visible_cuda_devices()
    cuda = gpus >= WORLD and args.device != "cpu"
    check_size(args.size, cuda, gpus)
    if "RANK" not in os.environ:
        raise Refusal("--context-parallel runs one process per device: start it with torchrun, e.g. "
                      "torchrun --nproc-per-node 2 --no-python asyncdiff-rt bench --context-parallel")
    if int(os.environ["WORLD_SIZE"]) != WORLD:
        raise Refusal(f"--context-parallel compares N=2 with degree-2 Ulysses and ring: start {WORLD} ranks "
                      f"(torchrun --nproc-per-node {WORLD}), not {os.environ['WORLD_SIZE']}")
    import torch.distributed as dist

    from .. import parallelize
    from ..engine.process_group import PIN_VARIABLE, join_group, pinning

    size = args.size
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if args.no_pin:  # the runtime's own pinning off too: every thread on every core
        os.environ[PIN_VARIABLE] = "0"
    torch.set_num_threads(args.threads)
    join_group(None, WORLD, device.type, timeout_s=TIMEOUT_S)  # NCCL for GPUs (and sets the rank's GPU), gloo
    pinned = "not pinned (GPU ranks)" if cuda else pinning()  # on the CPU the runtime pins each rank (join_group)
    rank, backend = dist.get_rank(), dist.get_backend()
    why_not_cp = context_parallel_unavailable(gpus, backend, device.type)  # before any work
    steps = args.steps or SIZES[size][2]
    repeats = args.repeats or 3
    card = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})"
    dtype = str(dtype_on(device)).replace("torch.", "")
    threads = "" if cuda else f" with {args.threads} intra-op thread(s), CPU affinity: {pinned}"
    settings = (f"{SIZES[size][3]}, {dtype}; FluxPipeline, flow-matching Euler, {steps} steps, guidance "
                f"embedding; {WORLD} ranks ({backend}), each on {device.type}{threads}; runtime W={args.warmup}; "
                f"diffusers' context parallelism on attention backend {CP_BACKEND}; median of {repeats} after one "
                f"warm-up call (the slowest rank's); "
                f"torch {torch.__version__}; command: torchrun --nproc-per-node {WORLD} --no-python asyncdiff-rt "
                f"bench {_arguments()}")
    if rank == 0:
        print(f"{card}: {settings}", flush=True)
        if why_not_cp:
            print(f"  diffusers context parallelism: empty here: {why_not_cp}", flush=True)
    rows = measure(size, device, steps, repeats, args.warmup, why_not_cp, parallelize)
    if rank == 0:
        text = table(rows, card, settings)
        print(text)
        if args.out:
            write_tables(Path(args.out), "bench_context_parallel", card, settings, rows, text)
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0


def measure(size, device, steps, repeats, warmup, why_not_cp, parallelize):
    """The rows (every rank runs this; rank 0's list is complete): latency_ms,
    max_abs_diff_vs_one_process and same_on_every_rank, or `empty` (why it cannot run
    here) or `error` (it failed, on any rank)."""
    import torch.distributed as dist

    rank, cuda = dist.get_rank(), device.type == "cuda"
    rows, reference, pipe = [], None, None
    for label, ranks in ROWS:
        row = {"row": label, "ranks": ranks}
        cp = label in (ULYSSES, RING)
        if cp and why_not_cp:
            row["empty"] = why_not_cp
            rows.append(row)
            continue
        error, images = None, None
        try:
            if pipe is None or cp:  # diffusers' parallelism cannot be undone: a fresh transformer
                pipe = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                pipe = build_pipeline(size, device)
            arguments = call_arguments(pipe, size, steps, device)

            def generate():
                return pipe(**arguments, generator=torch.Generator().manual_seed(0)).images

            if ranks == 1:
                if rank == 0:
                    row["latency_ms"], images = _timed(generate, repeats, device, cuda)
                    reference = images
            else:
                handle = None
                if label == RUNTIME:
                    handle = parallelize(pipe, n_components=WORLD, warmup=warmup, executor="distributed",
                                         timeout=TIMEOUT_S)
                else:
                    enable_context_parallelism(pipe, label)
                try:
                    latency, images = _timed(generate, repeats, device, cuda, before=dist.barrier)
                finally:
                    if handle is not None:
                        handle.remove()
                    handle = None  # nothing keeps this row's weights once the next row builds its own
                row["latency_ms"] = latency
        except Exception as e:  # one failing row keeps the others (the ranks agree on it below)
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        failed = _any_rank(error is not None, device)
        if failed:
            row.pop("latency_ms", None)
            row["error"] = error or "failed on another rank"
        elif ranks > 1:
            row["latency_ms"] = _max_over_ranks(row["latency_ms"], device)
            row["same_on_every_rank"] = _same_on_every_rank(images, WORLD)
        if rank == 0 and "latency_ms" in row and reference is not None:
            row["max_abs_diff_vs_one_process"] = float((images.float() - reference.float()).abs().max())
        rows.append(row)
        if rank == 0:
            print(f"  {label}: {row.get('latency_ms', row.get('error'))}", flush=True)
        dist.barrier()
    return rows


def _any_rank(flag, device):
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def table(rows, card, settings):
    best = min((r["latency_ms"] for r in rows if r["ranks"] == 1 and "latency_ms" in r), default=None)
    lines = [f"# asyncdiff-rt bench --context-parallel: {card}", "", settings, "",
             "| row | ranks | latency ms | vs best one-process row | max abs diff vs one process (latents) "
             "| same on every rank |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "latency_ms" not in r:
            lines.append(f"| {r['row']} | {r['ranks']} | empty: {r.get('empty') or r.get('error')} | | | |")
            continue
        speed = f"{best / r['latency_ms']:.2f}x" if best else "-"
        diff = r.get("max_abs_diff_vs_one_process")
        lines.append(f"| {r['row']} | {r['ranks']} | {r['latency_ms']:.1f} | {speed} "
                     f"| {'-' if diff is None else format(diff, '.2e')} | {r.get('same_on_every_rank', '-')} |")
    return "\n".join(lines) + "\n"
