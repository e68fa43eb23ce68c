"""`make demo`: sequential generation against asynchronous denoising, offline.

By default it runs the shipped trained tiny model (quality and timing table, PNG grid),
then the same N = 2 configuration on two CPU processes with the distributed executor
(torchrun, gloo; each rank on a core of its own): the measured wall-clock speedup over one
process beside the quality of the same images. `--random` runs a random-weight Stable
Diffusion 1.5 layout instead and shows the exactness invariants (W = K gives zero
difference).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from . import parallelize
from .models.tiny_pipelines import tiny_sd_pipeline


def random_weights_demo(steps=20):
    pipe = tiny_sd_pipeline("sd15")

    def generate():
        start = time.perf_counter()
        images = pipe("a red cube", num_inference_steps=steps, height=16, width=16,
                      generator=torch.Generator().manual_seed(0), output_type="latent").images
        return images, time.perf_counter() - start

    generate()  # first call pays one-off initialisation; keep it out of the timings
    sequential, seq_time = generate()
    print(f"sequential: {steps} steps in {seq_time:.2f} s (CPU)")
    for warmup in (steps, 1):
        handle = parallelize(pipe, n_components=2, stride=1, warmup=warmup, partition="upstream")
        if warmup == 1:
            print(handle.plan.describe(steps))
        images, async_time = generate()
        diff = (images - sequential).abs().max().item()
        print(f"N=2 S=1 W={warmup:2d}: max |latent - sequential| = {diff:.3e}, {async_time:.2f} s "
              f"on the reference executor (one CPU: no speedup expected)")
        handle.remove()


# The demo's quality table (evaluation.run_demo) and the configuration timed on two processes.
SAMPLES, STEPS, GUIDANCE, SEED = 8, 50, 4.0, 0
TIMED = dict(n_components=2, stride=1, warmup=3, partition="upstream")


def _two_process_rank(out_dir):
    """One rank (under torchrun): rank 0 times one process alone, then both ranks time
    the distributed executor on the same prompts and seeds; rank 0 writes the times and
    both sets of images to OUT/two_processes.pt. Short warm-up calls (4 steps, same
    batch) keep one-off set-up out of the times."""
    import torch.distributed as dist

    from .engine.process_group import join_group, pinning
    from .evaluation import eval_specs, generate
    from .models.tiny_t2i import load_tiny

    torch.set_num_threads(1)
    join_group(None, 2, "cpu", timeout_s=120)  # gives each rank a core of its own where it can
    pinned = pinning()
    rank, pipe, specs = dist.get_rank(), load_tiny(), eval_specs(SAMPLES)

    def timed():
        generate(pipe, specs, SEED, 4, GUIDANCE, batch=SAMPLES)
        dist.barrier()
        t0 = time.perf_counter()
        images = generate(pipe, specs, SEED, STEPS, GUIDANCE, batch=SAMPLES)
        return time.perf_counter() - t0, images

    if rank == 0:
        one_s, one = timed()
    else:
        dist.barrier()
    handle = parallelize(pipe, executor="distributed", **TIMED)
    two_s, two = timed()
    transport = handle.stats()["transport"]
    handle.remove()
    if rank == 0:
        torch.save({"one_process_s": one_s, "two_processes_s": two_s, "one": one, "two": two,
                    "transport": transport, "pinned": pinned}, os.path.join(out_dir, "two_processes.pt"))
    dist.destroy_process_group()


def two_process_speedup(out_dir, quality_rows):
    """Run the two ranks; print their speedup beside the quality of the images they made,
    and whether that equals the quality row of the same configuration (`quality_rows`:
    run_demo's rows), as the same images must."""
    from .evaluation import max_abs_diff, psnr

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if len(os.sched_getaffinity(0)) < 2:
        print("two processes: skipped (this process may use only one core)")
        return None
    os.makedirs(out_dir, exist_ok=True)
    print(f"\ntwo CPU processes, distributed executor (N=2 S=1 W={TIMED['warmup']} {TIMED['partition']}), "
          f"{SAMPLES} samples, {STEPS} steps:", flush=True)
    subprocess.run([torchrun if os.path.exists(torchrun) else "torchrun", "--standalone", "--nproc-per-node", "2",
                    "-m", "asyncdiff_rt.demo", "--two-process-rank", "--out", out_dir],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = torch.load(os.path.join(out_dir, "two_processes.pt"))
    quality = {"psnr_db": psnr(r["two"].flatten()[None], r["one"].flatten()[None]).item(),
               "max_abs_diff": max_abs_diff(r["two"], r["one"])}
    speedup = r["one_process_s"] / r["two_processes_s"]
    print(f"  one process: {r['one_process_s']:.2f} s; two processes ({r['transport']}): "
          f"{r['two_processes_s']:.2f} s: {speedup:.2f}x wall-clock speedup; CPU affinity: {r['pinned']}")
    name = f"2x1 W={TIMED['warmup']} {TIMED['partition']}"
    row = next(r for r in quality_rows if r["config"] == name)
    same = row["psnr_db"] == quality["psnr_db"] and row["max_abs_diff"] == quality["max_abs_diff"]
    print(f"  their images against one process's: PSNR {quality['psnr_db']:.2f} dB, max |diff| "
          f"{quality['max_abs_diff']:.3f}: {'equal to' if same else 'NOT equal to'} row {name!r} above "
          f"(adherence {row['adherence']:.3f}, Frechet {row['frechet']:.3f})")
    return {"speedup": speedup, "same_quality_as_row": same, **quality,
            **{k: r[k] for k in ("one_process_s", "two_processes_s", "transport")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--random", action="store_true", help="random-weight SD 1.5 layout instead of the trained model")
    parser.add_argument("--out", default="out/demo", help="folder for the PNG grid")
    parser.add_argument("--no-processes", action="store_true", help="skip the two-process speed row")
    parser.add_argument("--two-process-rank", action="store_true", help=argparse.SUPPRESS)  # under torchrun
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The tiny model: one intra-op thread is faster than two, and on a busy 2-core machine two
    # threads waiting for each other made the sequential row 6-7x slower (11.5 min against
    # 1.7 min for its 8 images, 2026-12-03); the two-process row's baseline uses one too.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.two_process_rank:
        _two_process_rank(args.out)
    elif args.random:
        random_weights_demo()
    else:
        from .evaluation import run_demo

        quality = run_demo(args.out)
        if not args.no_processes:
            result = two_process_speedup(args.out, quality["rows"])
            if result is not None:
                with open(os.path.join(args.out, "two_processes.json"), "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
