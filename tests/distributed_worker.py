"""One rank of a distributed test run (launched by tests/test_executor_distributed.py with
torchrun's environment variables, or by torchrun itself).

    python tests/distributed_worker.py OUT N S STEPS [--inject raise|kill|hang --at-rank R --at-call C]
                                       [--steps-at-rank STEPS --at-rank R]
                                       [--group R1,R2,...] [--timeout SECONDS] [--cuda]
                                       [--transport NAME] [--same-gpu] [--interrupt-after K]
                                       [--step-cache K1,K2,...]

Generates with the shipped tiny model and `executor="distributed"`, then writes
OUT/rank<r>.pt (the images) and OUT/rank<r>.json (stats, or the error it raised).
`--inject` breaks rank R at its C-th time-embedding call (a shared module: every
forward runs it). `--group` runs the program on those ranks of a bigger world (the
host-framework case) and then checks the whole world still works (an all-reduce).
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PROMPTS = ["a red cube", "a blue ball"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("n", type=int)
    p.add_argument("s", type=int)
    p.add_argument("steps", type=int)
    p.add_argument("--inject", choices=("raise", "kill", "hang"))
    p.add_argument("--at-rank", type=int, default=0)
    p.add_argument("--at-call", type=int, default=4)
    p.add_argument("--group", default=None)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--cuda", action="store_true",
                   help="each rank on GPU LOCAL_RANK (NCCL; with --same-gpu all on cuda:0 over gloo)")
    p.add_argument("--transport", default=None)
    p.add_argument("--same-gpu", action="store_true",
                   help="every rank on cuda:0, a gloo group (NCCL refuses two ranks on one GPU): for ipc")
    p.add_argument("--interrupt-after", type=int, default=None,
                   help="first a generation that stops calling the denoiser after this step")
    p.add_argument("--steps-at-rank", type=int, default=None, help="rank --at-rank runs this many steps instead")
    p.add_argument("--step-cache", type=lambda s: [int(k) for k in s.split(",")], default=None,
                   help="steps the runtime's step cache skips, e.g. 3,4")
    args = p.parse_args()
    try:
        run(args)
    finally:
        if (args.same_gpu or args.group is not None) and dist.is_initialized():  # the runtime destroys its own
            dist.destroy_process_group()


def run(args):
    torch.set_num_threads(1)
    out, rank = Path(args.out), int(os.environ["RANK"])
    from asyncdiff_rt import parallelize
    from asyncdiff_rt.models.tiny_t2i import load_tiny

    gpu = 0 if args.same_gpu else os.environ.get("LOCAL_RANK", 0)
    pipe = load_tiny(device=f"cuda:{gpu}" if args.cuda else None)
    if args.inject and rank == args.at_rank:
        _inject(pipe.unet.time_embedding, args.inject, args.at_call)
    group = None
    if args.same_gpu:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    if args.group is not None:
        dist.init_process_group("gloo")
        members = [int(r) for r in args.group.split(",")]
        group = dist.new_group(members)  # every rank of the world takes part in making it
        if rank not in members:
            _world_check(out, rank)
            return
    record = {"rank": rank}
    start = time.monotonic()
    try:
        handle = parallelize(pipe, n_components=args.n, stride=args.s, warmup=1,
                             executor="distributed", process_group=group, timeout=args.timeout,
                             transport=args.transport, step_cache=args.step_cache)
        steps = args.steps_at_rank if args.steps_at_rank and rank == args.at_rank else args.steps
        if args.interrupt_after is not None:
            _interrupted_generation(pipe, steps, args.interrupt_after)
        images = pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        torch.save(images.cpu(), out / f"rank{rank}.pt")
        record["stats"] = handle.stats()
    except Exception as e:
        record["error"], record["type"] = str(e), type(e).__name__
    record["seconds"] = time.monotonic() - start
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if group is not None:
        _world_check(out, rank)


def _interrupted_generation(pipe, steps, last):
    """A generation whose pipeline stops calling the denoiser after step `last`, as
    diffusers' pipelines do once a callback sets `interrupt`."""
    denoiser = pipe.unet

    class Stopping:
        calls, out = 0, None

        def __getattr__(self, name):
            return getattr(denoiser, name)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            if self.calls <= last + 1:
                self.out = denoiser(*args, **kwargs)
                return self.out
            return (torch.zeros_like(self.out[0]),)

    pipe.__dict__["unet"] = Stopping()
    try:
        pipe(PROMPTS, num_inference_steps=steps, output_type="pt")
    finally:
        pipe.__dict__["unet"] = denoiser


def _inject(module, how, at_call):
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] < at_call:
            return
        if how == "raise":
            raise RuntimeError("injected failure")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)

    module.register_forward_pre_hook(hook)


def _world_check(out, rank):
    """The ranks outside the group (and those in it) still reduce over the whole world."""
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    (out / f"world{rank}.json").write_text(json.dumps({"sum": value.item()}))


if __name__ == "__main__":
    sys.exit(main())
