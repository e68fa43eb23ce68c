"""Wall time per generation of the shipped tiny pipeline at N = 2, eager vs compiled units.

    python -m asyncdiff_rt.profiling.bench_stages [--steps 20] [--repeats 7] [--threads 1] [--compile default]

Two copies of the trained tiny text-to-image model (asyncdiff_rt/models/tiny_t2i.py),
each under `parallelize(n_components=2, executor="local", devices=DEVICES)`, one eager
and one with `compile=MODE`. One untimed generation each first (it compiles), then
`--repeats` rounds that time one generation of each back to back, so that a busy
machine slows both alike; prints the medians, the median of the per-round ratios and
the largest difference between the two images. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def generate(pipe, steps):
    return pipe("a red circle at the top left", num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def timed(pipe, steps):
    start = time.perf_counter()
    image = generate(pipe, steps)
    return image, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--devices", default="cpu*2")
    parser.add_argument("--compile", default="default", help="torch.compile mode of the compiled copy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_t2i import load_tiny

    names = ["eager", f"compile={args.compile}"]
    pipes = [load_tiny(), load_tiny()]
    handles = [asyncdiff_rt.parallelize(pipe, n_components=2, executor="local", devices=args.devices,
                                        compile=stage) for pipe, stage in zip(pipes, (False, args.compile))]
    try:
        firsts = [timed(pipe, args.steps) for pipe in pipes]
        rounds = [[timed(pipe, args.steps)[1] for pipe in pipes] for _ in range(args.repeats)]
    finally:
        for handle in handles:
            handle.remove()
    diff = (firsts[1][0] - firsts[0][0]).abs().max().item()
    print(f"tiny_t2i, N=2, {args.devices}, {args.steps} steps, {args.threads} thread(s), torch {torch.__version__}")
    print("| forward | first generation (s) | median (s) | runs (s) |")
    print("| --- | --- | --- | --- |")
    for i, name in enumerate(names):
        times = [r[i] for r in rounds]
        print(f"| {name} | {firsts[i][1]:.2f} | {statistics.median(times):.3f} | "
              f"{', '.join(f'{t:.3f}' for t in times)} |")
    ratio = statistics.median(r[1] / r[0] for r in rounds)
    print(f"compiled / eager, median of the rounds: {ratio:.3f}x the time; max abs image difference {diff:.2e}")


if __name__ == "__main__":
    main()
