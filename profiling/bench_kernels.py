"""Kernel benchmark: fused GroupNorm+SiLU and the UNet step with and without the kernels.

    python profiling/bench_kernels.py [--models sd15,sdxl] [--out DIR] [--no-unet] [--no-compile]

On one GPU, fp16, batch 2 (a classifier-free-guidance batch):
  1. GroupNorm+SiLU at the shapes SD 1.5 (512 px) and SDXL (1024 px) UNets run:
     the fused kernel vs eager torch (`group_norm` then `silu`) vs `torch.compile`
     of the same two ops. GPU time by CUDA events (median of trials after a
     warm-up, 20 calls per CUDA graph so launch overhead does not hide the
     kernel) and achieved bandwidth, counting the least traffic the op needs
     (read x once, write y once), as a share of a measured device-to-device copy.
  2. The whole UNet forward, randomly initialised (no download), eager and as a
     CUDA graph, each with and without `asyncdiff_rt.kernels.apply`.
Writes a Markdown table and JSON named after the card to DIR (default:
profiling/results next to this script). Without a GPU it says so and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TRIALS, REPS = 7, 20
GROUPS = 32

# GroupNorm inputs of the UNet at its largest resolutions, per family (B = 2, latent 64 / 128).
SHAPES = {
    "sd15": [(2, 320, 64, 64), (2, 640, 64, 64), (2, 960, 64, 64), (2, 640, 32, 32),
             (2, 1280, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8)],
    "sdxl": [(2, 320, 128, 128), (2, 640, 128, 128), (2, 960, 128, 128), (2, 640, 64, 64),
             (2, 1280, 64, 64), (2, 1280, 32, 32), (2, 2560, 32, 32)],
}


def gpu_ms(fn, reps=REPS) -> float:
    """Median GPU milliseconds per call of `fn` over TRIALS, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(TRIALS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def graph_ms(fn, reps=REPS) -> float:
    """GPU milliseconds per call with `reps` calls captured in one CUDA graph: no launch gaps,
    so small ops are timed by their memory traffic rather than by Python overhead."""
    graph, _ = _capture(lambda: [fn() for _ in range(reps)])
    return gpu_ms(graph.replay, reps=1) / reps


def copy_gbps() -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # read + write


def eager_gn_silu(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def bench_group_norm(models, use_compile: bool, copy_bw: float) -> list[dict]:
    from asyncdiff_rt.kernels import group_norm

    rows = []
    for model in models:
        for shape in SHAPES[model]:
            x = torch.randn(shape, device="cuda", dtype=torch.float16)
            w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            b = torch.randn_like(w)
            ideal_bytes = 2 * x.numel() * x.element_size()
            variants = {
                "fused": lambda: group_norm(x, GROUPS, w, b, 1e-5, silu=True),
                "eager": lambda: eager_gn_silu(x, w, b),
            }
            if use_compile:
                torch._dynamo.reset()  # one specialised graph per shape, no recompile limit
                compiled = torch.compile(eager_gn_silu, dynamic=False)
                variants["compile"] = lambda: compiled(x, w, b)
            ref = eager_gn_silu(x.float(), w.float(), b.float())
            err = (variants["fused"]().float() - ref).abs().max().item()
            row = {"model": model, "shape": list(shape), "max_abs_err_fp16": err}
            for name, fn in variants.items():
                ms = graph_ms(fn)
                gbps = ideal_bytes / ms / 1e6
                row[name] = {"ms": ms, "GBps": gbps, "of_copy": gbps / copy_bw}
            rows.append(row)
            print(_gn_line(row), flush=True)
    return rows


def _unet_inputs(model, unet):
    latent = 64 if model == "sd15" else 128
    cfg = unet.config
    kw = dict(device="cuda", dtype=torch.float16)
    args = (torch.randn(2, 4, latent, latent, **kw), torch.tensor([500.0, 500.0], device="cuda"),
            torch.randn(2, 77, cfg.cross_attention_dim, **kw))
    extra = {}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text, **kw),
                                      "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, **kw)}
    return args, extra


def bench_unet(model) -> dict:
    from asyncdiff_rt import kernels
    from asyncdiff_rt.models.configs import build_unet

    unet = build_unet(model, device="cuda", dtype=torch.float16).eval()
    args, extra = _unet_inputs(model, unet)
    row = {"model": model}
    with torch.inference_mode():
        for label in ("without", "with"):
            routing = kernels.apply(unet) if label == "with" else None
            row[f"eager_{label}_ms"] = gpu_ms(lambda: unet(*args, **extra), reps=5)
            graph, static = _capture(lambda: unet(*args, **extra).sample)
            row[f"graph_{label}_ms"] = gpu_ms(graph.replay, reps=5)
            row[f"out_{label}"] = static.float().abs().mean().item()
            if routing is not None:
                row["routed"] = sum("GroupNorm" in r for r in routing.routed)
                routing.remove()
            del graph, static
    del unet
    torch.cuda.empty_cache()
    print(_unet_line(row), flush=True)
    return row


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture (kernel compiles, cuDNN/cuBLAS choices)
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _gn_line(r) -> str:
    cells = [f"{r['model']}", "x".join(map(str, r["shape"]))]
    for name in ("fused", "eager", "compile"):
        if name in r:
            cells.append(f"{r[name]['ms'] * 1e3:.1f} us / {r[name]['GBps']:.0f} GB/s ({r[name]['of_copy']:.0%})")
        else:
            cells.append("-")
    cells.append(f"{r['eager']['ms'] / r['fused']['ms']:.2f}x")
    cells.append(f"{r['compile']['ms'] / r['fused']['ms']:.2f}x" if "compile" in r else "-")
    return "| " + " | ".join(cells) + " |"


def _unet_line(r) -> str:
    return (f"| {r['model']} | {r['eager_without_ms']:.2f} | {r['eager_with_ms']:.2f} | "
            f"{r['eager_without_ms'] / r['eager_with_ms']:.3f}x | {r['graph_without_ms']:.2f} | "
            f"{r['graph_with_ms']:.2f} | {r['graph_without_ms'] / r['graph_with_ms']:.3f}x | {r.get('routed', 0)} |")


def markdown(card, copy_bw, gn_rows, unet_rows, command) -> str:
    out = [f"# Kernel benchmark on {card}", "", f"`{command}`", "",
           f"fp16, batch 2, {GROUPS} groups. Device copy: {copy_bw:.0f} GB/s (read + write). "
           "GB/s counts one read of x and one write of y.", "",
           "## GroupNorm + SiLU", "",
           "| model | shape | fused | eager | torch.compile | eager / fused | compile / fused |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [_gn_line(r) for r in gn_rows]
    if unet_rows:
        out += ["", "## UNet forward (ms, median)", "",
                "| model | eager | eager + kernels | speedup | graph | graph + kernels | speedup | fused sites |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [_unet_line(r) for r in unet_rows]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    p.add_argument("--out", default=os.environ.get("ASYNCDIFF_RT_RESULTS_DIR")
                   or str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-unet", action="store_true", help="skip the whole-UNet timings")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no GPU available; nothing measured")
        return 0
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = set(models) - set(SHAPES)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {sorted(SHAPES)}")
    card = torch.cuda.get_device_name()
    copy_bw = copy_gbps()
    print(f"{card}: device copy {copy_bw:.0f} GB/s", flush=True)
    gn_rows = bench_group_norm(models, not a.no_compile, copy_bw)
    unet_rows = [] if a.no_unet else [bench_unet(m) for m in models]
    command = "python profiling/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(card, copy_bw, gn_rows, unet_rows, command.strip())
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_" + re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower()
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(
        {"card": card, "copy_GBps": copy_bw, "group_norm_silu": gn_rows, "unet": unet_rows,
         "torch": torch.__version__}, indent=1))
    print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
