"""Is `tune` honest on the CPU? Tune the shipped tiny UNet for cpu*N, then measure what it
recommends: the sequential pipeline and the recommended configuration, each timed over a
few generations (median), measured speedup beside the projected one.

    python -m profiling.tune_cpu_check --devices 'cpu*4' --runs 3
"""
import argparse
import statistics
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", default="cpu*4")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--min-psnr", type=float, default=25.0)
    parser.add_argument("--partitions", default="auto,upstream")
    args = parser.parse_args()

    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_t2i import load_tiny
    from asyncdiff_rt.tune import tune

    torch.set_num_threads(1)
    pipe = load_tiny()
    result = tune(pipe, args.devices, min_psnr_db=args.min_psnr, steps=args.steps, warmups=(1,),
                  partitions=tuple(args.partitions.split(",")))
    print(result.describe())

    def seconds():
        runs = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            pipe("a red circle", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                 output_type="pt")
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs), runs

    pipe("a red circle", num_inference_steps=2, output_type="pt")  # warm
    sequential, seq_runs = seconds()
    if result.one_device:
        print(f"one device recommended; sequential {sequential * 1e3:.1f} ms measured")
        return
    handle = asyncdiff_rt.parallelize(pipe, config=result)
    try:
        pipe("a red circle", num_inference_steps=args.steps, output_type="pt")  # planned and warm
        parallel, par_runs = seconds()
    finally:
        handle.remove()
    measured = sequential / parallel
    print(f"sequential runs (s): {', '.join(f'{r:.3f}' for r in seq_runs)}")
    print(f"recommended runs (s): {', '.join(f'{r:.3f}' for r in par_runs)}")
    print(f"measured speedup {measured:.2f}x, projected {result.best.speedup:.2f}x, "
          f"measured/projected {measured / result.best.speedup:.3f}")


if __name__ == "__main__":
    main()
