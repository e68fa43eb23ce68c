"""Host cost per step: the runtime's own work with the forwards made trivially cheap.

    python -m asyncdiff_rt.profiling.bench_host [--steps 20] [--repeats 5] [--profile DIR] [--out DIR]
    torchrun --nproc-per-node 2 -m asyncdiff_rt.profiling.bench_host --distributed [--transports gloo,shm]

(as a module: run as a script, this folder's nvtx.py would hide the nvtx package)

The tiny SD 1.5 layout (the real block structure, so the same units, dataflow and
messages as SD 1.5) on the CPU, with every unit's `forward` replaced, in this process
only, by one that returns the output it made in a real forward beforehand: what is left
of a forward is diffusers' glue between the units (time embedding, conv_in/out). The
denoiser class's `forward` is wrapped with a clock, so each step's time splits into
*in forwards* (glue + stubbed units + the runtime's unit switch) and *outside forwards*:
the runtime's own work (stepping, caches, copies, messages). Per device: divided by the
devices one host drives (local, reference); a distributed rank drives one.

Rows: the plain loop (no runtime), the reference executor, the local executor
(`cpu*N`, graphs on: the graph path as far as the CPU goes) at N = 1, 2, 4; under
torchrun, the distributed executor per transport at N = world size. Per generation
set-up is timed apart: the denoiser fingerprint (tiny layouts have the full models'
modules and parameters, which is what it walks) and the change check each generation
makes instead (fingerprint.Watch), program building and `start`.
`--profile DIR`: one generation per row under cProfile, top entries by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SIZES = (1, 2, 4)


# ---------------------------------------------------------------- stubs and clocks
def stub_units(unet, paths, call):
    """Make each unit of `paths` return the output it computes for `call` (a dict of the
    UNet's keyword arguments), at once; returns a function that undoes it."""
    outputs, hooks = {}, []
    for path in paths:
        hooks.append(unet.get_submodule(path).register_forward_hook(
            functools.partial(lambda p, module, args, out: outputs.__setitem__(p, out), path)))
    with torch.no_grad():
        unet(**call)
    for h in hooks:
        h.remove()
    for path in paths:
        unet.get_submodule(path).forward = functools.partial(_constant, outputs[path])

    def undo():
        for path in paths:
            del unet.get_submodule(path).forward
    return undo


def _constant(out, *args, **kwargs):
    return out


class ForwardClock:
    """Seconds (CPU time of this thread, wall-clock) spent inside `cls.forward` (every
    replica of the denoiser is an instance of the same class), and how many calls."""

    def __init__(self, cls):
        self.cls, self.original = cls, cls.forward
        self.cpu = self.wall = 0.0
        self.calls, self._depth = 0, 0
        clock = self

        @functools.wraps(self.original)
        def forward(module, *args, **kwargs):
            clock._depth += 1
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return clock.original(module, *args, **kwargs)
            finally:
                clock._depth -= 1
                if clock._depth == 0:
                    clock.cpu += time.thread_time() - c0
                    clock.wall += time.perf_counter() - t0
                    clock.calls += 1

        cls.forward = forward

    def now(self):
        """(thread CPU s, wall s, in-forward CPU s, in-forward wall s)."""
        return time.thread_time(), time.perf_counter(), self.cpu, self.wall

    def remove(self):
        self.cls.forward = self.original


# ---------------------------------------------------------------- one row
def generation(bench, denoiser, clock):
    """Per step (CPU s, wall s, in-forward CPU s, in-forward wall s) of one generation of
    bench's DDIM loop."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(bench.steps)
    bench.scheduler = sched
    latents, per_step = bench.latent0.clone(), []
    with torch.no_grad():
        for t in sched.timesteps:
            latent_in = torch.cat([latents] * 2)
            before = clock.now()
            eps = denoiser(latent_in, t, encoder_hidden_states=bench.cond, return_dict=False)[0]
            per_step.append(tuple(b - a for a, b in zip(before, clock.now())))
            uncond, cond = eps.chunk(2)
            latents = sched.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
    return per_step


def measure(bench, denoiser, clock, repeats, devices, profile_to=None):
    """A row: medians over the steps of `repeats` generations after one warm-up one, in
    CPU time of this thread (what the host spends; a busy machine's waits for a core left
    out) and wall-clock. The first step of a generation (the change check, the program's
    start, warm-up in lockstep) is kept apart."""
    generation(bench, denoiser, clock)
    first, steady = [], []
    for _ in range(repeats):
        steps = generation(bench, denoiser, clock)
        first.append(steps[0])
        steady += steps[bench.warmup:]

    def us(rows, f):
        return 1e6 * statistics.median(f(*r) for r in rows)

    row = {"devices_per_host": devices,
           "step_cpu_us": us(steady, lambda c, w, fc, fw: c),
           "in_forwards_cpu_us": us(steady, lambda c, w, fc, fw: fc),
           "runtime_cpu_us": us(steady, lambda c, w, fc, fw: c - fc),
           "step_wall_us": us(steady, lambda c, w, fc, fw: w),
           "runtime_wall_us": us(steady, lambda c, w, fc, fw: w - fw),
           "first_step_cpu_us": us(first, lambda c, w, fc, fw: c),
           "first_step_runtime_cpu_us": us(first, lambda c, w, fc, fw: c - fc)}
    row["runtime_cpu_us_per_device"] = row["runtime_cpu_us"] / devices
    if profile_to is not None:
        profiler = cProfile.Profile()
        profiler.enable()
        generation(bench, denoiser, clock)
        profiler.disable()
        row["profile"] = top_entries(profiler, profile_to)
    return row


def top_entries(profiler, path, count=25):
    """Write to `path` the `count` functions with the most own time, then the runtime's
    own functions (asyncdiff_rt/) by cumulative time; return the path."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(count)
    stats.sort_stats("cumulative").print_stats("asyncdiff_rt/", count)
    body = text.getvalue().replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(body)
    return str(path)


@contextmanager
def runtime(bench, executor_name, n, **options):
    """An AsyncDenoiser over bench's UNet with `executor_name` at N = n (S = 1)."""
    from asyncdiff_rt.async_denoiser import AsyncDenoiser
    from asyncdiff_rt.engine import make_executor

    plan = bench.plan(n, 1)
    executor = make_executor(executor_name, bench.unet, plan, **options)
    try:
        yield AsyncDenoiser(bench.unet, plan, executor, lambda: bench.scheduler), plan, executor
    finally:
        executor.close()


def setup_costs(bench, repeats=20):
    """Per generation set-up, CPU us of this thread: fingerprints of the tiny SD 1.5 and SDXL layouts (their
    full models' module trees) and the check every generation makes (the quick test that the recorded one
    still holds, nothing changed), program of bench.steps steps, local executor's `start`."""
    from asyncdiff_rt.fingerprint import Watch, fingerprint
    from asyncdiff_rt.models.configs import build_unet

    def median_us(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return 1e6 * statistics.median(times)

    sdxl = build_unet("tiny-sdxl")
    out = {"fingerprint sd15 layout": median_us(lambda: fingerprint(bench.unet)),
           "fingerprint sdxl layout": median_us(functools.partial(fingerprint, sdxl)),
           "change check sd15 layout (per generation)": median_us(Watch(bench.unet).changed),
           "change check sdxl layout (per generation)": median_us(Watch(sdxl).changed)}
    for n in (2, 4):
        with runtime(bench, "local", n, devices=f"cpu*{n}") as (_, plan, executor):
            program = plan.program(bench.steps)
            out[f"program N={n}"] = median_us(lambda: plan.program(bench.steps))
            out[f"local start N={n}"] = median_us(lambda: executor.start(program, bench.scheduler.timesteps))
    return out


# ---------------------------------------------------------------- tables
COLUMNS = [("step_cpu_us", "step CPU us"), ("in_forwards_cpu_us", "in forwards CPU us"),
           ("runtime_cpu_us", "runtime CPU us/step"), ("runtime_cpu_us_per_device", "runtime CPU us/step/device"),
           ("step_wall_us", "step wall us"), ("runtime_wall_us", "runtime wall us/step"),
           ("first_step_cpu_us", "first step CPU us"), ("first_step_runtime_cpu_us", "first step runtime CPU us")]


def table(title, settings, rows, setup=None):
    lines = [f"# {title}", "", settings, "", "| row | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(f"{r[k]:.0f}" for k, _ in COLUMNS) + " |")
    if setup:
        lines += ["", "Per generation set-up (median CPU us of the thread):", "", "| what | us |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in setup.items()]
    return "\n".join(lines) + "\n"


def settings_line(bench, repeats, extra=""):
    return (f"{bench.model} with every unit stubbed (returns a stored output), DDIM {bench.steps} steps, W="
            f"{bench.warmup}, guidance batch 2; medians over the steps after warm-up of {repeats} generations "
            f"after one warm-up generation; {torch.get_num_threads()} intra-op thread(s); torch {torch.__version__}"
            f"{extra}; command: python -m asyncdiff_rt.profiling.bench_host {' '.join(sys.argv[1:])}")


def write(out, name, text, payload):
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))


# ---------------------------------------------------------------- runs
def make_bench(steps, repeats):
    from asyncdiff_rt.commands.bench import _Bench

    bench = _Bench(torch.device("cpu"), True, steps, 1, repeats, None)
    undo = stub_units(bench.unet, bench.graph.paths, dict(
        sample=torch.cat([bench.latent0] * 2), timestep=torch.tensor(999), encoder_hidden_states=bench.cond))
    return bench, undo


def run_local(args):
    bench, _ = make_bench(args.steps, args.repeats)
    clock = ForwardClock(type(bench.unet))
    profile = (lambda name: Path(args.profile) / f"{name}.txt") if args.profile else (lambda name: None)
    rows = [{"row": "plain loop (no runtime)", **measure(bench, bench.unet, clock, args.repeats, 1,
                                                           profile("plain"))}]
    for n in SIZES:
        with runtime(bench, "reference", n) as (wrapper, _, _):
            rows.append({"row": f"reference N={n}", **measure(bench, wrapper, clock, args.repeats, n,
                                                                profile(f"reference_n{n}"))})
        with runtime(bench, "local", n, devices=f"cpu*{n}") as (wrapper, _, _):
            rows.append({"row": f"local cpu*{n} (graphs on)", **measure(bench, wrapper, clock, args.repeats, n,
                                                                        profile(f"local_n{n}"))})
        print(f"  N={n} done", flush=True)
    setup = setup_costs(bench)
    settings = settings_line(bench, args.repeats)
    text = table("Host cost per step, one process (CPU)", settings, rows, setup)
    print(text)
    write(args.out, "host_cost_local", text, {"settings": settings, "rows": rows, "setup_us": setup})


def run_distributed(args):
    import torch.distributed as dist

    from asyncdiff_rt.commands.bench_distributed import pin_to_own_cores
    from asyncdiff_rt.engine.process_group import join_group

    pinned = pin_to_own_cores(1)
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    group, _ = join_group(None, world, "cpu", timeout_s=120)
    rank = dist.get_rank()
    bench, _ = make_bench(args.steps, args.repeats)
    clock = ForwardClock(type(bench.unet))
    rows = []
    for transport in args.transports:
        profile = Path(args.profile) / f"distributed_{transport}_rank{rank}.txt" if args.profile else None
        with runtime(bench, "distributed", world, group=group, transport=transport) as (wrapper, _, _):
            dist.barrier()
            row = measure(bench, wrapper, clock, args.repeats, 1, profile)
        everyone = [None] * world
        dist.all_gather_object(everyone, row)
        for r, theirs in enumerate(everyone):
            rows.append({"row": f"distributed N={world} {transport}, rank {r}", **theirs})
    if rank == 0:
        settings = settings_line(bench, args.repeats, f"; {world} ranks, CPU affinity: {pinned}")
        text = table(f"Host cost per step, distributed executor, {world} ranks (CPU)", settings, rows)
        print(text)
        write(args.out, f"host_cost_distributed_{world}ranks", text, {"settings": settings, "rows": rows})
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="timed generations per row")
    p.add_argument("--distributed", action="store_true", help="under torchrun: the distributed executor")
    p.add_argument("--transports", type=lambda v: v.split(","), default=["gloo", "shm"])
    p.add_argument("--profile", default=None, help="folder for one cProfile listing per row")
    p.add_argument("--out", default=None, help="folder for the .md and .json tables")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    (run_distributed if args.distributed else run_local)(args)


if __name__ == "__main__":
    main()
