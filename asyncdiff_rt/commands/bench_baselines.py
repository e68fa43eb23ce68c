"""`asyncdiff-rt bench`, second table: the shipped tiny transformer (PixArt, 32x32 pixels)
run by this runtime beside what else one could run it with, in one process and one run.

One device: eager diffusers, `torch.compile` (inductor) of the transformer, the runtime at
N = 1, and the step caches a one-device user would pick instead: diffusers' First Block
Cache and cache-dit's DBCache (F1B0, warm-up steps = the runtime's W). Several devices:
the runtime at N = 2 (`cpu*2` on the CPU, two virtual devices on a GPU) and diffusers'
context parallelism (Ulysses, ring), whose rows say why they are empty: PixArt has no
`_cp_plan`. Those two against the runtime on a FLUX transformer, on the same two ranks,
are `bench --context-parallel`'s table (bench_context_parallel.py). Each row builds a fresh pipeline, times whole pipeline calls (median after one
warm-up call) and compares its images with eager's.
"""
import json
from pathlib import Path

import torch

from .bench import best_one_device, card_slug
from .bench_distributed import PROMPT, _timed

CONTEXT_PARALLEL_COMMAND = "torchrun --nproc-per-node 2 --no-python asyncdiff-rt bench --context-parallel"
FIRST_BLOCK_THRESHOLD = 0.05  # FirstBlockCacheConfig's default
DB_CACHE_THRESHOLD = 0.08  # DBCacheConfig's default residual_diff_threshold


def _runtime(n):
    def setup(pipe, device, warmup):
        from .. import parallelize

        return parallelize(pipe, n_components=n, warmup=warmup, executor="local", devices=f"{device}*{n}").remove
    return setup


def _first_block_cache(pipe, device, warmup):
    from diffusers.models.cache_utils import CacheMixin
    from diffusers import FirstBlockCacheConfig

    if not isinstance(pipe.transformer, CacheMixin):
        raise NotApplicable(f"{type(pipe.transformer).__name__} has no CacheMixin (no enable_cache), and "
                            f"{type(pipe).__name__} opens no cache_context, which the hook needs")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=FIRST_BLOCK_THRESHOLD))
    return pipe.transformer.disable_cache


def _cache_dit(pipe, device, warmup):
    try:
        import cache_dit
    except ImportError:
        raise NotApplicable("cache-dit is not installed (pip install cache-dit)") from None
    cache_dit.disable_print()
    # F1B0: one block computed in front, none behind (cache-dit's default F8 needs more than
    # the tiny transformer's 6 blocks)
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup, residual_diff_threshold=DB_CACHE_THRESHOLD))
    return lambda: cache_dit.disable_cache(pipe)


def _context_parallel(pipe, device, warmup):
    """Why diffusers' context parallelism cannot run here (it never can on PixArt); its
    rows on a FLUX transformer are `bench --context-parallel`'s."""
    reasons = []
    if getattr(type(pipe.transformer), "_cp_plan", None) is None:
        reasons.append(f"{type(pipe.transformer).__name__} has no _cp_plan, and its attention processor calls "
                       "F.scaled_dot_product_attention, not dispatch_attention_fn where Ulysses and ring live")
    if not torch.distributed.is_initialized() or torch.accelerator.device_count() < 2:
        reasons.append("needs 2 GPUs under torchrun: diffusers maps ranks to torch.accelerator.device_count() "
                       "devices (ZeroDivisionError with none)")
    reasons.append(f"on a FLUX transformer, beside the runtime on the same ranks: {CONTEXT_PARALLEL_COMMAND}")
    raise NotApplicable("; ".join(reasons))


class NotApplicable(Exception):
    """A row that cannot run here; its message says why."""


# (row, devices it uses, setup(pipe, device, warmup) -> undo, or None for the plain pipeline)
ROWS = [("diffusers eager", 1, None),
        ("torch.compile (inductor)", 1, lambda pipe, device, warmup: pipe.transformer.compile()),
        ("runtime N=1 (local)", 1, _runtime(1)),
        (f"diffusers FirstBlockCache (threshold {FIRST_BLOCK_THRESHOLD})", 1, _first_block_cache),
        (f"cache-dit DBCache F1B0 (threshold {DB_CACHE_THRESHOLD})", 1, _cache_dit),
        ("runtime N=2 (local)", 2, _runtime(2)),
        ("diffusers context parallelism, Ulysses 2", 2, _context_parallel),
        ("diffusers context parallelism, ring 2", 2, _context_parallel)]


def measure(device, steps, repeats, warmup, no_compile=False):
    """The rows, each with latency_ms and max_abs_diff_vs_eager, or `empty` (why it cannot
    run here) or `error` (it failed)."""
    from ..models.tiny_dit import images, load_tiny_dit

    cuda = device.type == "cuda"
    rows, eager = [], None
    for label, devices, setup in ROWS:
        row = {"row": label, "devices": "one device" if devices == 1 else f"{devices} devices", "n_components": devices}
        if no_compile and "compile" in label:
            continue
        pipe = load_tiny_dit(device=device)
        try:
            undo = setup(pipe, device, warmup) if setup is not None else None
            row["latency_ms"], out = _timed(lambda: images(pipe, [PROMPT], num_inference_steps=steps,
                                                           generator=torch.Generator().manual_seed(0)),
                                            repeats, device, cuda)
            eager = out if eager is None else eager
            row["max_abs_diff_vs_eager"] = float((out - eager).abs().max())
            if callable(undo):
                undo()
        except NotApplicable as why:
            row["empty"] = str(why)
        except Exception as e:  # one failing row keeps the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        print(f"  {label}: {row.get('latency_ms', row.get('empty', row.get('error')))}", flush=True)
    return rows


def table(rows, card, settings):
    eager = next((r["latency_ms"] for r in rows if r["row"] == "diffusers eager" and "latency_ms" in r), None)
    best = best_one_device(rows)
    lines = [f"# asyncdiff-rt bench, tiny transformer: {card}", "", settings, "",
             "| row | devices | latency ms | vs eager | vs best one-device row "
             "| max abs diff vs eager (images in [0, 1]) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "latency_ms" not in r:
            lines.append(f"| {r['row']} | {r['devices']} | empty: {r.get('empty') or r.get('error')} | | | |")
            continue
        lines.append(f"| {r['row']} | {r['devices']} | {r['latency_ms']:.1f} | {eager / r['latency_ms']:.2f}x "
                     f"| {best / r['latency_ms']:.2f}x | {r['max_abs_diff_vs_eager']:.2e} |")
    return "\n".join(lines) + "\n"


def run_transformer(args, device, steps, repeats, card):
    """Measure, print and (with --out) write the table; the rows that failed."""
    settings = (f"shipped tiny PixArt transformer (pixel space 3x32x32, 6 blocks), 1 prompt, guidance on, DDIM "
                f"{steps} steps, W={args.warmup}; whole pipeline calls, median of {repeats} after one warm-up call; "
                f"torch {torch.__version__}")
    print(f"tiny transformer: {settings}", flush=True)
    rows = measure(device, steps, repeats, args.warmup, no_compile=args.no_compile)
    text = table(rows, card, settings)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = card_slug(card)
        (out / f"bench_transformer_{slug}.md").write_text(text)
        (out / f"bench_transformer_{slug}.json").write_text(
            json.dumps({"device": card, "settings": settings, "rows": rows}, indent=1))
    return [r for r in rows if "error" in r]
