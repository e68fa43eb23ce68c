"""`asyncdiff-rt bench --distributed`: the distributed executor against one process, in
one run, under torchrun (one process per device):

    torchrun --nproc-per-node 2 --no-python asyncdiff-rt bench --distributed [--out DIR]

The shipped tiny text-to-image model, DDIM, guidance on. Rank 0 first times the plain
pipeline alone (the others wait), then every rank runs each configuration whose device
count is the world size (2 ranks: N=2 S=1; 3 ranks: N=3 S=1 and N=2 S=2), with each
transport of `--transports` (gloo and shared memory on the CPU, NCCL and CUDA IPC on
GPUs, by default) and partitions auto and measured. On the CPU each process uses one
intra-op thread (`--threads`); the runtime gives each rank cores of its own as it would
any user's ranks (process_group.pin_local_rank; `--no-pin` turns that off, as
ASYNCDIFF_RT_PIN=0 does), so 2 ranks use 2 cores against the baseline's one, rank 0's. Each row also checks that every rank
returned the same images and that they equal the reference executor's bit for bit (CPU)
or to rounding (GPU).
"""
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..cli import Refusal
from ..engine.process_group import PIN_VARIABLE, join_group, pinning
from .bench import ASYNC, _fmt, card_slug

PROMPT = "a red cube on a blue ball"
PARTITIONS = ("auto", "measured")


def run(args):
    if "RANK" not in os.environ:
        raise Refusal("--distributed runs one process per device: start it with torchrun, e.g. "
                      "torchrun --nproc-per-node 2 --no-python asyncdiff-rt bench --distributed")
    import torch.distributed as dist

    from .. import parallelize
    from ..models.tiny_t2i import load_tiny

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if args.no_pin:  # the runtime's own pinning off too: every thread on every core
        os.environ[PIN_VARIABLE] = "0"
    torch.set_num_threads(args.threads)
    join_group(None, int(os.environ["WORLD_SIZE"]), device.type, timeout_s=120)  # NCCL sets the rank's GPU
    pinned = "not pinned (GPU ranks)" if cuda else pinning()  # on the CPU the runtime pins each rank (join_group)
    rank, world = dist.get_rank(), dist.get_world_size()
    steps, repeats = args.steps or 50, args.repeats or 3
    transports = args.transports or (["nccl", "ipc"] if cuda else ["gloo", "shm"])
    pipe = load_tiny(device=device)
    card = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})"
    settings = (f"shipped tiny model (32x32, latent 16x16), guidance on (batch 2 x prompts), DDIM {steps} "
                f"steps, W={args.warmup}; {world} ranks x {args.threads} intra-op thread(s) against one process "
                f"with {args.threads}; CPU affinity: {pinned}; median of {repeats} after one warm-up run; "
                f"torch {torch.__version__}; "
                f"command: torchrun --nproc-per-node {world} --no-python asyncdiff-rt bench {_arguments()}")

    rows = []
    for prompts in args.prompts:
        def generate():
            return pipe([PROMPT] * prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                        output_type="pt").images

        baseline = None
        if rank == 0:
            baseline, _ = _timed(generate, repeats, device, cuda)
            rows.append({"row": "one process (sequential)", "prompts": prompts, "ranks": 1, "latency_ms": baseline})
        dist.barrier()
        configurations = [(p, part, t) for p in ASYNC if p[0] + p[1] - 1 == world for part in PARTITIONS
                          for t in transports]
        for (n, s), partition, transport in configurations:
            handle = parallelize(pipe, n_components=n, stride=s, warmup=args.warmup, executor="distributed",
                                 partition=partition, transport=transport)
            latency, images = _timed(generate, repeats, device, cuda, before=dist.barrier)
            latency = _max_over_ranks(latency, device)
            stats = handle.stats()
            same = _same_on_every_rank(images, world)
            handle.remove()
            row = {"row": f"distributed N={n} S={s} partition={partition}", "prompts": prompts, "ranks": world,
                   "latency_ms": latency, "transport": stats["transport"], "same_images_on_every_rank": same,
                   "mib_received_per_step": _received_per_step(stats, steps, device)}
            if rank == 0:
                reference = _reference(pipe, generate, n, s, args.warmup, handle.plan.partition.components)
                row["equals_reference"] = bool(torch.equal(images.cpu(), reference.cpu())) if not cuda else \
                    float((images - reference).abs().max())
                row["speedup"] = baseline / latency
                rows.append(row)
            dist.barrier()
    if rank == 0:
        text = table(rows, card, settings)
        print(text)
        if args.out:
            write_tables(Path(args.out), "bench_distributed", card, settings, rows, text)
    dist.destroy_process_group()
    return 0


def _timed(generate, repeats, device, cuda, before=None):
    """(median ms, last images) over `repeats` generations after one warm-up run;
    `before()` runs ahead of each (a barrier: the ranks start together)."""
    generate()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images = generate()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, images


def _arguments():
    """This run's bench arguments without `--out DIR`: where the table went is no setting,
    and a path names the machine it ran on."""
    args, kept = sys.argv[2:], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join(kept)


def _max_over_ranks(value, device):
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _received_per_step(stats, steps, device):
    """MiB all ranks received per step (each rank counts its own)."""
    import torch.distributed as dist

    t = torch.tensor([float(sum(stats["received_bytes_per_device"]))], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / 2**20 / (steps * stats["generations"])


def _same_on_every_rank(images, world):
    import torch.distributed as dist

    gathered = [torch.empty_like(images) for _ in range(world)]
    dist.all_gather(gathered, images.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _reference(pipe, generate, n, s, warmup, components):
    from .. import parallelize

    handle = parallelize(pipe, n_components=n, stride=s, warmup=warmup, executor="reference",
                         partition=[list(c) for c in components])  # the split the ranks measured
    try:
        return generate()
    finally:
        handle.remove()


def table(rows, card, settings):
    lines = [f"# asyncdiff-rt bench --distributed: {card}", "", settings, "",
             "| row | prompts | ranks | latency ms | speedup vs one process | transport | MiB received/step (all "
             "ranks) | same images on every rank | equals reference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x"
        lines.append(f"| {r['row']} | {r['prompts']} | {r['ranks']} | {r['latency_ms']:.1f} | {speed} "
                     f"| {r.get('transport', '-')} "
                     f"| {_fmt(r.get('mib_received_per_step'), '.3f')} | {r.get('same_images_on_every_rank', '-')} "
                     f"| {r.get('equals_reference', '-')} |")
    return "\n".join(lines) + "\n"


def write_tables(out, name, card, settings, rows, text):
    """out/<name>_<card>.md (`text`) and .json (the rows and settings)."""
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if card.startswith("cpu") else card_slug(card)
    (out / f"{name}_{slug}.md").write_text(text)
    (out / f"{name}_{slug}.json").write_text(json.dumps({"device": card, "settings": settings, "rows": rows}, indent=1))
