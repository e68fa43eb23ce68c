"""Transfer benchmark: the extension's copy_batch against torch copy_.

    python profiling/bench_transfer.py [--out DIR]

Measures, on one GPU (device -> same device) and, with two or more, across a
peer link (0 -> 1): GPU time per copy by CUDA events (median of trials after a
warm-up), bandwidth, and host time per call, for sizes 4 KB .. 256 MB; then one
batch of 64 tensors in one copy_batch call against 64 separate calls. Writes a
Markdown table and JSON named after the card to DIR (default: the
ASYNCDIFF_RT_RESULTS_DIR environment variable, else print only).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

SIZES = [4096 * 4**k for k in range(9)]  # 4 KB .. 256 MB
BATCH, BATCH_SIZES = 64, [4096, 256 * 1024, 4 * 1024 * 1024]
TRIALS = 5


def timed(fn, stream, reps):
    """(GPU ms per call, host ms per call): medians over TRIALS after a warm-up."""
    with torch.cuda.stream(stream):
        fn()
        stream.synchronize()
        gpu, host = [], []
        for _ in range(TRIALS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            t1 = time.perf_counter()
            end.record(stream)
            end.synchronize()
            gpu.append(start.elapsed_time(end) / reps)
            host.append((t1 - t0) * 1e3 / reps)
    return statistics.median(gpu), statistics.median(host)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:g} {unit}"
        n /= 1024
    return f"{n:g} TB"


def routes():
    out = [(0, 0)]
    if torch.cuda.device_count() > 1:
        out.append((0, 1))
    return out


def size_sweep(C):
    rows = []
    for sd, dd in routes():
        stream = torch.cuda.Stream(device=sd)  # copies run on the source device's stream
        src = torch.randint(0, 256, (SIZES[-1],), dtype=torch.uint8, device=f"cuda:{sd}")
        dst = torch.zeros(SIZES[-1], dtype=torch.uint8, device=f"cuda:{dd}")
        torch.cuda.synchronize(sd)
        torch.cuda.synchronize(dd)
        for size in SIZES:
            reps = max(3, min(200, (512 << 20) // size))
            s, d = src[:size], dst[:size]
            methods = {"torch copy_": lambda: d.copy_(s, non_blocking=True)}
            if C is not None:
                entry = [(d.data_ptr(), dd, s.data_ptr(), sd, size)]
                methods["_C copy_batch"] = lambda: C.copy_batch(entry, stream.cuda_stream)
            for name, fn in methods.items():
                d.zero_()
                torch.cuda.synchronize(dd)  # the zeroing must not race the timed copies
                gpu_ms, host_ms = timed(fn, stream, reps)
                assert torch.equal(d.cpu(), s.cpu()), f"{name} copied wrong bytes"
                rows.append({"route": f"{sd}->{dd}", "bytes": size, "method": name, "gpu_us": gpu_ms * 1e3,
                             "host_us": host_ms * 1e3, "GB_per_s": size / (gpu_ms * 1e-3) / 1e9})
        del src, dst
        torch.cuda.empty_cache()
    return rows


def batch_compare(C):
    rows = []
    for sd, dd in routes():
        stream = torch.cuda.Stream(device=sd)
        for size in BATCH_SIZES:
            srcs = [torch.randint(0, 256, (size,), dtype=torch.uint8, device=f"cuda:{sd}") for _ in range(BATCH)]
            dsts = [torch.zeros(size, dtype=torch.uint8, device=f"cuda:{dd}") for _ in range(BATCH)]
            torch.cuda.synchronize(sd)
            torch.cuda.synchronize(dd)
            methods = {"torch copy_ x64": lambda: [d.copy_(s, non_blocking=True) for d, s in zip(dsts, srcs)]}
            if hasattr(torch, "_foreach_copy_"):
                methods["torch _foreach_copy_"] = lambda: torch._foreach_copy_(dsts, srcs, non_blocking=True)
            if C is not None:
                entries = [(d.data_ptr(), dd, s.data_ptr(), sd, size) for d, s in zip(dsts, srcs)]
                h = stream.cuda_stream
                methods["_C copy_batch(64)"] = lambda: C.copy_batch(entries, h)
                methods["_C copy_batch(64), unchecked"] = lambda: C.copy_batch(entries, h, check_pointers=False)
                methods["_C copy_batch(1) x64"] = lambda: [C.copy_batch([e], h) for e in entries]
            for name, fn in methods.items():
                try:
                    gpu_ms, host_ms = timed(fn, stream, reps=20)
                except RuntimeError as e:  # e.g. _foreach_copy_ across devices
                    print(f"  {name} at {fmt_bytes(size)} {sd}->{dd}: skipped ({e})", file=sys.stderr)
                    continue
                assert all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dsts, srcs)), f"{name} wrong bytes"
                for d in dsts:
                    d.zero_()
                torch.cuda.synchronize(dd)
                rows.append({"route": f"{sd}->{dd}", "bytes_each": size, "method": name, "gpu_us": gpu_ms * 1e3,
                             "host_us": host_ms * 1e3, "GB_per_s": BATCH * size / (gpu_ms * 1e-3) / 1e9})
    return rows


def markdown(meta, sweep, batch):
    lines = [f"# Transfer benchmark: {meta['card']}", "",
             f"{meta['when']}; torch {meta['torch']}, CUDA {meta['cuda']}, {meta['gpus']} GPU(s); "
             f"extension: {meta['extension']}. Command: `{meta['command']}`.", "",
             "GPU time per copy by CUDA events (median of 5 trials); host time per call by the host clock; "
             "GB/s = bytes copied / GPU time.", "",
             "## Size sweep", "", "| route | size | method | GPU us | host us | GB/s |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in sweep:
        lines.append(f"| {r['route']} | {fmt_bytes(r['bytes'])} | {r['method']} | {r['gpu_us']:.1f} | "
                     f"{r['host_us']:.1f} | {r['GB_per_s']:.1f} |")
    lines += ["", f"## One batch of {BATCH} tensors", "", "| route | size each | method | GPU us | host us | GB/s |",
              "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in batch:
        lines.append(f"| {r['route']} | {fmt_bytes(r['bytes_each'])} | {r['method']} | {r['gpu_us']:.1f} | "
                     f"{r['host_us']:.1f} | {r['GB_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("ASYNCDIFF_RT_RESULTS_DIR"), help="folder for the tables")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transfer: needs a CUDA GPU (torch sees none); nothing measured", file=sys.stderr)
        return 2
    try:
        from asyncdiff_rt import _C

        _C.device_count()
        ext = f"_C (CUDA runtime {_C.runtime_version()}, archs {_C.build_info()['cuda_archs']})"
    except Exception as e:  # not built, or unusable: measure torch alone and say why
        _C, ext = None, f"unavailable ({e}); torch only"
    if _C is not None and torch.cuda.device_count() > 1 and _C.can_access_peer(0, 1):
        _C.enable_peer_access(0, 1)
        _C.enable_peer_access(1, 0)
    card = torch.cuda.get_device_name(0)
    meta = {"card": card, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(), "extension": ext,
            "command": "python profiling/bench_transfer.py"}
    sweep, batch = size_sweep(_C), batch_compare(_C)
    table = markdown(meta, sweep, batch)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
        (out / f"bench_transfer_{slug}.md").write_text(table)
        (out / f"bench_transfer_{slug}.json").write_text(json.dumps(
            {"meta": meta, "size_sweep": sweep, "batch": batch}, indent=1))
        print(f"wrote {out}/bench_transfer_{slug}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
