"""Sequential, the runtime's step cache alone, asynchronous alone (N=2, distributed), and
asynchronous + the step cache, side by side in one run on the shipped tiny UNet and tiny
transformer (CPU), under torchrun with 2 ranks:

    torchrun --nproc-per-node 2 scripts/step_cache_table.py --out profiling/results/step_cache_cpu

The skip list is calibrated (step_cache.calibrate's criterion) on one generation of
training-set prompts, never on the held-out prompts it is scored on. Rows that run in one
process (sequential, cache alone) run on rank 0 while rank 1 waits; each rank is pinned to
a core of its own and uses one intra-op thread. Wall time: median over --repeats
generations of --timing-prompts prompts; quality: one generation of --prompts held-out prompts.
Run without torchrun it runs the one-process rows only, with cache-dit's DBCache on the
transformer (cache-dit hangs when torch.distributed is initialised with a rank it does not use).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from asyncdiff_rt import parallelize
from asyncdiff_rt.commands.bench_distributed import pin_to_own_cores
from asyncdiff_rt.engine.process_group import join_group
from asyncdiff_rt.evaluation import adherence, eval_specs, generate, judge_images, psnr
from asyncdiff_rt.models.judge import load_judge
from asyncdiff_rt.step_cache import StepCache, choose_skips, record_predictions, relative_changes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--thresholds", default="0.1,0.2")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--timing-prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="unet,dit")
    p.add_argument("--cache-dit-threshold", type=float, default=0.08)
    p.add_argument("--format", action="store_true", help="print the tables of the JSON files in --out and exit")
    args = p.parse_args()
    if args.format:
        return print(markdown(Path(args.out)))
    distributed = "RANK" in os.environ
    pinned = pin_to_own_cores(1) if distributed else "one process, not pinned"
    torch.set_num_threads(1)
    if distributed:
        join_group(None, 2, "cpu", timeout_s=600)
    rank = dist.get_rank() if distributed else 0
    judge = load_judge(device="cpu")
    launcher = "torchrun --nproc-per-node 2 " if distributed else ".venv/bin/python "
    result = {"command": launcher + "scripts/step_cache_table.py " + " ".join(sys.argv[1:]),
              "pinned": pinned, "torch": torch.__version__, "settings": vars(args), "models": {}}
    for model in args.models.split(","):
        result["models"][model] = table(model, args, judge, rank, distributed)
        if rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            name = "step_cache_cpu.json" if distributed else "one_process_cpu.json"
            (Path(args.out) / name).write_text(json.dumps(result, indent=1))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def markdown(folder):
    """The rows of both runs' JSON files as Markdown tables, one per model and run."""
    lines = []
    for name in ("step_cache_cpu.json", "one_process_cpu.json"):
        if not (folder / name).exists():
            continue
        run = json.loads((folder / name).read_text())
        lines += [f"`{run['command']}` ({run['pinned']})", ""]
        for model, t in run["models"].items():
            lines += [f"**{model}**: skips {t['skips']}", "",
                      "| row | processes | denoiser forwards per generation | wall s (median) | speedup | "
                      "adherence | PSNR dB vs sequential |", "|---|---|---|---|---|---|---|"]
            for r in t["rows"]:
                lines.append(f"| {r['row']} | {r['ranks']} | {r['forwards']} | {r['seconds']:.2f} | "
                             f"{r['speedup']:.2f}x | {100 * r['adherence']:.1f}% | {r['psnr_db']:.2f} |")
            lines.append("")
    return "\n".join(lines)


def load(model):
    if model == "dit":
        from asyncdiff_rt.models.tiny_dit import load_tiny_dit
        return load_tiny_dit(device="cpu")
    from asyncdiff_rt.models.tiny_t2i import load_tiny
    return load_tiny(device="cpu")


class _CacheDit:
    """cache-dit's DBCache on the pipeline until remove(); counts the steps it cached."""

    def __init__(self, pipe, args):
        import cache_dit

        self.pipe, self.cache_dit = pipe, cache_dit
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=args.cache_dit_threshold,
            max_warmup_steps=args.warmup))

    def cached_steps(self):
        return len(self.cache_dit.summary(self.pipe)[0].cached_steps)

    def remove(self):
        self.cache_dit.disable_cache(self.pipe)


def cache_dit_on(pipe, args):
    return _CacheDit(pipe, args)


def table(model, args, judge, rank, distributed):
    pipe = load(model)
    denoiser = pipe.transformer if model == "dit" else pipe.unet
    specs = eval_specs(args.prompts, "heldout")
    labels = torch.tensor([s.labels() for s in specs])
    timing = eval_specs(args.timing_prompts, "heldout")
    calib = eval_specs(4, "train")

    def images(which, seed=0):
        return generate(pipe, which, seed, args.steps, 4.0, batch=len(which), model=model)

    preds = record_predictions(denoiser, lambda: images(calib, seed=10_000))
    skips = {t: choose_skips(preds, float(t), args.warmup) for t in args.thresholds.split(",")}

    def row(name, ranks, forwards, setup=None):
        """Run on rank 0 alone (ranks=1) or on both; quality from rank 0."""
        out = None
        if ranks == 2 and not distributed:
            return None
        if ranks == 2 or rank == 0:
            handle = setup() if setup else None
            try:
                images(timing)  # warm-up run (plans, first-call costs)
                seconds = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    images(timing)
                    seconds.append(time.perf_counter() - t0)
                imgs = images(specs)
                if isinstance(handle, _CacheDit):  # its steps cached in the last generation
                    forwards = f"{args.steps - handle.cached_steps()} (full: first block every step)"
            finally:
                if handle is not None:
                    handle.remove()
            out = {"row": name, "ranks": ranks, "forwards": forwards, "seconds": statistics.median(seconds),
                   "seconds_all": seconds, "images": imgs}
        if distributed:
            dist.barrier()
        return out

    rows = [row("sequential", 1, args.steps)]
    for t, skip in skips.items():
        cache = StepCache(skip)
        rows.append(row(f"step cache alone (threshold {t})", 1, args.steps - len(skip),
                        lambda c=cache: parallelize(pipe, n_components=1, warmup=args.warmup, executor="reference",
                                                    step_cache=c)))
    if model == "dit" and not distributed:  # cache-dit (it hangs under torchrun here: see README) supports PixArt (diffusers' own cache hooks support neither model)
        rows.append(row(f"cache-dit DBCache F1B0 (threshold {args.cache_dit_threshold})", 1, None,
                        lambda: cache_dit_on(pipe, args)))
    rows.append(row(f"async N=2 W={args.warmup}", 2, args.steps,
                    lambda: parallelize(pipe, n_components=2, warmup=args.warmup, executor="distributed",
                                        timeout=600)))
    for t, skip in skips.items():
        cache = StepCache(skip)
        rows.append(row(f"async N=2 W={args.warmup} + step cache (threshold {t})", 2, args.steps - len(skip),
                        lambda c=cache: parallelize(pipe, n_components=2, warmup=args.warmup,
                                                    executor="distributed", timeout=600, step_cache=c)))
    if rank != 0:
        return None
    rows = [r for r in rows if r is not None]
    seq, base, out = rows[0]["images"], rows[0]["seconds"], []
    for r in rows:
        imgs = r.pop("images")
        _, pred = judge_images(judge, imgs)
        out.append({**r, "speedup": base / r["seconds"], "adherence": adherence(pred, labels),
                    "psnr_db": psnr(imgs.flatten()[None], seq.flatten()[None]).item()})
    changes = relative_changes(preds)
    return {"skips": skips, "rows": out, "relative_changes": [round(c, 4) for c in changes[1:]]}


if __name__ == "__main__":
    main()
