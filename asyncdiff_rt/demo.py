"""`make demo`: sequential generation against asynchronous denoising, offline.

By default it runs the shipped trained tiny model (quality and timing table, PNG grid);
`--random` runs a random-weight Stable Diffusion 1.5 layout instead and shows the
exactness invariants (W = K gives zero difference).
"""
import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--random", action="store_true", help="random-weight SD 1.5 layout instead of the trained model")
    parser.add_argument("--out", default="out/demo", help="folder for the PNG grid")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    if args.random:
        random_weights_demo()
    else:
        from .evaluation import run_demo

        run_demo(args.out)


if __name__ == "__main__":
    main()
