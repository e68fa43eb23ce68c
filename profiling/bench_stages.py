"""Wall time per generation of the shipped tiny pipeline at N = 2, per forward stage.

    python -m asyncdiff_rt.profiling.bench_stages [--steps 20] [--repeats 5] [--threads 1] [--compile default]

Runs the trained tiny text-to-image model (asyncdiff_rt/models/tiny_t2i.py) with
`parallelize(n_components=2, executor="local", devices=DEVICES)` eagerly and with
`compile=MODE`: one untimed generation first (it compiles), then the median of
`--repeats` generations, and the largest difference between the two images.
Prints a Markdown table; it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def generate(pipe, steps):
    return pipe("a red circle at the top left", num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def measure(pipe, steps, repeats, devices, **stages):
    import asyncdiff_rt

    handle = asyncdiff_rt.parallelize(pipe, n_components=2, executor="local", devices=devices, **stages)
    try:
        start = time.perf_counter()
        image = generate(pipe, steps)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(pipe, steps)
            times.append(time.perf_counter() - start)
        return image, first, times
    finally:
        handle.remove()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--devices", default="cpu*2")
    parser.add_argument("--compile", default="default", help="torch.compile mode of the compiled run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from asyncdiff_rt.models.tiny_t2i import load_tiny

    pipe = load_tiny()
    rows = []
    eager = None
    for name, stages in (("eager", {"compile": False}), (f"compile={args.compile}", {"compile": args.compile})):
        image, first, times = measure(pipe, args.steps, args.repeats, args.devices, **stages)
        eager = image if eager is None else eager
        rows.append((name, first, statistics.median(times), times, (image - eager).abs().max().item()))
    print(f"tiny_t2i, N=2, {args.devices}, {args.steps} steps, {args.threads} thread(s), torch {torch.__version__}")
    print("| forward | first generation (s) | median (s) | runs (s) | max abs diff vs eager |")
    print("| --- | --- | --- | --- | --- |")
    for name, first, median, times, diff in rows:
        print(f"| {name} | {first:.2f} | {median:.3f} | {', '.join(f'{t:.3f}' for t in times)} | {diff:.2e} |")
    print(f"compile / eager (median): {rows[1][2] / rows[0][2]:.3f}x the time")


if __name__ == "__main__":
    main()
