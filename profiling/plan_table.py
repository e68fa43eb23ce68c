"""Plan figures for the known families: imbalance, ideal speedup and bytes per step.

    python -m asyncdiff_rt.profiling.plan_table > profiling/results/plan_figures.md

Built on the meta device (fp16, batch 2 for guidance, 50 steps, W=1, S=1): no weights,
no GPU. Bytes are per denoising step in steady state, received by the busiest device.
"""
import sys

from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs

MODELS = (("sd15", 512), ("sd21", 768), ("sdxl", 1024))


def rows(models=MODELS, counts=(2, 3, 4), partitions=("auto", "upstream")):
    for family, resolution in models:
        unet = build_unet(family)
        graph_inputs = unet_inputs(unet, height=resolution // 8, width=resolution // 8)
        for n in counts:
            for partition in partitions:
                s = make_plan(unet, graph_inputs, n, partition=partition).summary(50)
                yield family, resolution, n, partition, s


def main(out=sys.stdout):
    mib = 2**20
    print("| model | px | N | partition | imbalance | ideal speedup (K=50, W=1) | max MiB/step received: ours | reference broadcast | ratio |", file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    for family, resolution, n, partition, s in rows():
        ours, ref = max(s["bytes_per_step"]) / mib, max(s["broadcast_bytes_per_step"]) / mib
        print(f"| {family} | {resolution} | {n} | {partition} | {s['imbalance']:.3f} | {s['ideal_speedup']:.2f}x "
              f"| {ours:.1f} | {ref:.1f} | {ref / ours:.1f}x |", file=out)


if __name__ == "__main__":
    main()
