"""One rank of a distributed test run (launched by tests/test_executor_distributed.py with
torchrun's environment variables, or by torchrun itself).

    python tests/distributed_worker.py OUT N S STEPS [--inject raise|kill|hang --at-rank R --at-call C]
                                       [--steps-at-rank STEPS --at-rank R]
                                       [--group R1,R2,...] [--timeout SECONDS] [--cuda]
                                       [--transport NAME] [--same-gpu] [--interrupt-after K] [--full-first]
                                       [--mismatches --at-rank R]
                                       [--step-cache K1,K2,...]

Generates with the shipped tiny model and `executor="distributed"`, then writes
OUT/rank<r>.pt (the images) and OUT/rank<r>.json (stats, or the error it raised, and
how many messages went through mailboxes). `--full-first` generates once more before
anything else: OUT/rank<r>_first.pt, its stats as "first_stats".
`--inject` breaks rank R at its C-th time-embedding call (a shared module: every
forward runs it) and writes when to OUT/injected.json. `--group` runs the program on
those ranks of a bigger world (the host-framework case) and then checks the whole world
still works (an all-reduce).
`--mismatches` first runs two generations in which rank R alone passes other inputs
(its prompts in the other order, then seed 1 instead of 0) and records what each raised.
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
    p.add_argument("--mismatches", action="store_true",
                   help="first two generations where rank --at-rank passes other prompts, then another seed")
    p.add_argument("--full-first", action="store_true", help="a whole generation before everything else")
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
    from asyncdiff_rt.engine.mailbox import Mailbox
    from asyncdiff_rt.models.tiny_t2i import load_tiny

    gpu = 0 if args.same_gpu else os.environ.get("LOCAL_RANK", 0)
    pipe = load_tiny(device=f"cuda:{gpu}" if args.cuda else None)
    if args.inject and rank == args.at_rank:
        _inject(pipe.unet.time_embedding, args.inject, args.at_call, out)
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
    record = {"rank": rank, "mailbox_sends": 0}
    _count_calls(Mailbox, "send", record, "mailbox_sends")
    start = time.monotonic()
    try:
        handle = parallelize(pipe, n_components=args.n, stride=args.s, warmup=1,
                             executor="distributed", process_group=group, timeout=args.timeout,
                             transport=args.transport, step_cache=args.step_cache)
        steps = args.steps_at_rank if args.steps_at_rank and rank == args.at_rank else args.steps
        if args.full_first:
            torch.save(_generate(pipe, steps), out / f"rank{rank}_first.pt")
            record["first_stats"] = handle.stats()
        if args.interrupt_after is not None:
            _interrupted_generation(pipe, steps, args.interrupt_after)
        if args.mismatches:
            record["mismatches"] = _mismatches(pipe, steps, rank == args.at_rank)
        torch.save(_generate(pipe, steps), out / f"rank{rank}.pt")
        record["stats"] = handle.stats()
    except Exception as e:
        record["error"], record["type"], record["failed_at"] = str(e), type(e).__name__, time.time()
    record["seconds"] = time.monotonic() - start
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if group is not None:
        _world_check(out, rank)


def _generate(pipe, steps):
    return pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="pt").images.cpu()


def _count_calls(cls, name, record, key):
    real = getattr(cls, name)

    def counted(*args, **kwargs):
        record[key] += 1
        return real(*args, **kwargs)

    setattr(cls, name, counted)


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
        pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
    finally:
        pipe.__dict__["unet"] = denoiser


def _mismatches(pipe, steps, odd_one):
    """Two generations in which this rank, if `odd_one`, alone passes other prompts, then
    another seed: [{"type", "error"}] of what each raised (None where nothing was raised)."""
    raised = []
    for prompts, seed in ((PROMPTS[::-1] if odd_one else PROMPTS, 0), (PROMPTS, 1 if odd_one else 0)):
        try:
            pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
            raised.append(None)
        except Exception as e:
            raised.append({"type": type(e).__name__, "error": str(e)})
    return raised


def _inject(module, how, at_call, out):
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] < at_call:
            return
        (out / "injected.json").write_text(json.dumps({"at": time.time()}))  # the clock the ranks share
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
