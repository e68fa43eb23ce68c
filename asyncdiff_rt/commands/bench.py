"""`asyncdiff-rt bench`: the local executor against the sequential diffusers UNet loop,
measured in one run on one device (random weights, DDIM, classifier-free guidance).

GPU: SD 1.5's architecture in fp16 at 512x512, 50 steps: eager diffusers; `local` with
N = 1 (graphs only); virtual devices N = 2, 3, 4 at S = 1 and N = 2, 3 at S = 2, on
streams and on SM partitions; and N = 1 on one SM partition of each size used, for the
scaling efficiency (speedup of the partitions over one partition / ideal speedup).
`--quick`: the tiny SD 1.5 layout for a few steps (a smoke test; runs on the CPU).
Baselines in the same run: `torch.compile` (inductor) of the same UNet beside eager, and,
on the shipped tiny transformer (PixArt), what a one-device user would pick instead (a
step cache) and diffusers' context parallelism (bench_baselines.py); `--context-parallel`
(under torchrun, 2 ranks): diffusers' Ulysses and ring against the distributed executor on
one FLUX transformer (bench_context_parallel.py). Every row's final
latents are compared with eager's; speedups are over eager and over the best one-device
row (eager, compiled, or the runtime at N = 1).
Latency: median over repeats after one warm-up generation (CUDA events on a GPU).
"""
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from ..async_denoiser import AsyncDenoiser
from ..dataflow import transfer_plan
from ..engine import make_executor
from ..models.configs import build_unet
from ..partition import resolve_partition
from ..plan import Plan
from ..trace import unet_inputs
from ..units import find_units

ASYNC = [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2)]
COMPILED = "torch.compile (inductor)"


def register(subparsers):
    p = subparsers.add_parser("bench", help="measure the local executor against sequential diffusers",
                              description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, few configurations (smoke test)")
    p.add_argument("--device", default=None, help="default: cuda:0 when a GPU is visible, else cpu")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --quick 6)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed generations per row (default 3; --quick 2)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (GPU run)")
    p.add_argument("--no-sm", action="store_true", help="skip the SM-partition rows")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile rows (inductor takes minutes on a busy CPU)")
    p.add_argument("--no-transformer", action="store_true", help="skip the tiny transformer's table")
    p.add_argument("--budget-s", type=float, default=None, help="stop adding rows after this many seconds")
    p.add_argument("--out", default=None, help="folder for bench_local_<device>.md and .json")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: the distributed executor against one process (bench_distributed.py)")
    p.add_argument("--context-parallel", action="store_true",
                   help="under torchrun, 2 ranks: one process, the distributed executor at N=2 and diffusers' "
                        "context parallelism (Ulysses 2, ring 2) on one FLUX transformer (bench_context_parallel.py)")
    p.add_argument("--size", choices=("tiny", "flux"), default="tiny",
                   help="--context-parallel: the tests' tiny FLUX (CPU or GPU), or FLUX.1-dev's shapes with random "
                        "fp16 weights (GPUs only)")
    p.add_argument("--threads", type=int, default=1,
                   help="--distributed, --context-parallel on the CPU: intra-op threads per process")
    p.add_argument("--no-pin", action="store_true",
                   help="--distributed, --context-parallel on the CPU: leave each rank's CPU affinity alone "
                        "(ASYNCDIFF_RT_PIN=0; default: the runtime gives each rank cores of its own)")
    p.add_argument("--prompts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4],
                   help="--distributed: prompts per generation, a comma-separated list (default 1,4)")
    p.add_argument("--transports", type=lambda v: v.split(","), default=None,
                   help="--distributed: transports to compare (default gloo,shm on the CPU; nccl,ipc on GPUs)")
    p.set_defaults(func=run)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _rows(device, quick, sm):
    """(label, N, S, device list) per row; N = 0: the eager sequential loop."""
    if device.type != "cuda":
        return [("diffusers eager", 0, 1, None), (COMPILED, 0, 1, None), ("local N=1", 1, 1, "cpu*1"),
                ("local cpu*2", 2, 1, "cpu*2"), ("local cpu*3 S=2", 2, 2, "cpu*3")]
    dev = str(device)
    rows = [("diffusers eager", 0, 1, None), (COMPILED, 0, 1, None), ("local N=1 (graphs)", 1, 1, f"{dev}*1")]
    pairs = ASYNC[:1] + ASYNC[3:4] if quick else ASYNC
    rows += [(f"streams N={n} S={s}", n, s, f"{dev}*{n + s - 1}") for n, s in pairs]
    if sm:
        rows += [(f"SM parts N={n} S={s}", n, s, f"{dev}*{n + s - 1}@sm") for n, s in pairs]
        rows += [(f"1 of {d} SM parts", 1, 1, f"{dev}*1@sm/{d}") for d in sorted({n + s - 1 for n, s in pairs})]
    return rows


class _Bench:
    def __init__(self, device, quick, steps, warmup, repeats, resolution):
        self.device, self.steps, self.warmup, self.repeats = device, steps, warmup, repeats
        gpu = device.type == "cuda"
        name, dtype = ("tiny-sd15", torch.float32) if quick or not gpu else ("sd15", torch.float16)
        self.unet = build_unet(name, device=device, dtype=dtype).eval()
        c = self.unet.config
        side = c.sample_size if quick or not gpu else resolution // 8
        g = torch.Generator().manual_seed(0)
        self.latent0 = torch.randn(1, c.in_channels, side, side, generator=g).to(device, dtype)
        self.cond = torch.randn(2, 77, c.cross_attention_dim, generator=g).to(device, dtype)
        self.graph = find_units(self.unet, unet_inputs(self.unet, height=side, width=side))
        self.model = f"{name} {str(dtype).replace('torch.', '')} latent {side}x{side}"

    def plan(self, n, s):
        parts = resolve_partition(self.graph, n, "auto", self.unet)
        return Plan(self.graph, parts, s, self.warmup, False, "component", transfer_plan(self.graph, parts, s))

    def generate(self, unet, host):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        sched.set_timesteps(self.steps)  # timesteps on the CPU: the loop never waits for the GPU
        self.scheduler = sched  # what an AsyncDenoiser follows
        latents = self.latent0.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                t0 = time.perf_counter()
                eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=self.cond, return_dict=False)[0]
                host.append(time.perf_counter() - t0)
                uncond, cond = eps.chunk(2)
                latents = sched.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
        return latents

    def time(self, unet):
        """(median latency ms, host ms per step, last latents) over the repeats after one
        warm-up run."""
        cuda = self.device.type == "cuda"
        self.generate(unet, [])
        latencies, host = [], []
        for _ in range(self.repeats):
            if cuda:
                torch.cuda.synchronize(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            latents = self.generate(unet, host)
            if cuda:
                end.record()
                end.synchronize()
                latencies.append(start.elapsed_time(end))
            else:
                latencies.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(latencies), 1e3 * sum(host) / len(host), latents

    def row(self, label, n, s, devices):
        """Row `label` measured; with its final latents' largest difference from eager's
        (the first row's, which is eager)."""
        out = self._row(label, n, s, devices)
        latents = out.pop("latents")
        if label == "diffusers eager":
            self.eager_latents = latents
        out["max_abs_diff_vs_eager"] = float((latents.float() - self.eager_latents.float()).abs().max())
        return out

    def _row(self, label, n, s, devices):
        out = {"row": label, "n_components": n, "stride": s, "devices": devices}
        if n == 0:
            unet = torch.compile(self.unet) if label == COMPILED else self.unet
            out["latency_ms"], out["host_ms_per_step"], out["latents"] = self.time(unet)
            out["weights_mib_per_device"] = [sum(p.numel() * p.element_size() for p in self.unet.parameters()) / 2**20]
            return out
        plan = self.plan(n, s)
        executor = make_executor("local", self.unet, plan, devices=devices)
        try:
            wrapper = AsyncDenoiser(self.unet, plan, executor, lambda: self.scheduler)
            out["latency_ms"], out["host_ms_per_step"], out["latents"] = self.time(wrapper)
            stats = executor.stats.as_dict()
            out["mib_moved_per_step"] = sum(stats["received_bytes_per_device"]) / 2**20 / max(
                stats["generations"] * self.steps, 1)
            out["weights_mib_per_device"] = [w / 2**20 for w in executor.weights_per_device()]
            out["graphs"] = len(executor.graphs)
            out["sms"] = [lane.sms for lane in executor.lanes]
            out["ideal_speedup"] = plan.summary(self.steps)["ideal_speedup"]
        finally:
            executor.close()
        return out


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def best_one_device(rows):
    """The lowest latency of the rows that use one whole device (eager, compiled, N = 1)."""
    one = [r["latency_ms"] for r in rows if "latency_ms" in r and r["n_components"] <= 1
           and "@sm" not in (r.get("devices") or "")]
    return min(one, default=None)


def table(rows, card, settings):
    eager = next((r["latency_ms"] for r in rows if r["row"] == "diffusers eager" and "latency_ms" in r), None)
    best = best_one_device(rows)
    base = {r["devices"].split("/")[-1]: r["latency_ms"] for r in rows
            if r.get("devices") and "@sm/" in r["devices"] and "latency_ms" in r}
    lines = [f"# asyncdiff-rt bench: {card}", "", settings, "",
             "| row | devices | latency ms | vs eager | vs best one-device row | max abs diff vs eager "
             "| host ms/step | MiB moved/step | weights MiB/device | ideal | SM efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['devices'] or '-'} | {r['error']} | | | | | | | | |")
            continue
        speed = eager / r["latency_ms"] if eager else None
        over_best = best / r["latency_ms"] if best else None
        eff = None
        if r.get("devices") and r["devices"].endswith("@sm") and r.get("ideal_speedup"):
            one = base.get(str(r["n_components"] + r["stride"] - 1))
            if one:
                eff = one / r["latency_ms"] / r["ideal_speedup"]
                r["sm_scaling_efficiency"] = eff
        weights = "/".join(f"{w:.0f}" if w >= 10 else f"{w:.2f}" for w in r["weights_mib_per_device"])
        lines.append(f"| {r['row']} | {r['devices'] or 'whole UNet'} | {r['latency_ms']:.1f} | {_fmt(speed, '.2f')}x "
                     f"| {_fmt(over_best, '.2f')}x | {_fmt(r.get('max_abs_diff_vs_eager'), '.2e')} "
                     f"| {r['host_ms_per_step']:.2f} | {_fmt(r.get('mib_moved_per_step'), '.2f')} | {weights} "
                     f"| {_fmt(r.get('ideal_speedup'), '.2f')} | {_fmt(eff, '.2f')} |")
    return "\n".join(lines) + "\n"


def run(args):
    if args.context_parallel:
        from .bench_context_parallel import run as run_context_parallel

        return run_context_parallel(args)
    if args.distributed:
        from .bench_distributed import run as run_distributed

        return run_distributed(args)
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    steps = args.steps or (6 if quick else 50)
    repeats = args.repeats or (2 if quick else 3)
    t_start = time.perf_counter()
    bench = _Bench(device, quick, steps, args.warmup, repeats, args.resolution)
    card = device_name(device)
    settings = (f"{bench.model}, DDIM {steps} steps, guidance on (batch 2), warm-up W={args.warmup}, "
                f"median of {repeats} after one warm-up run; torch {torch.__version__}; "
                f"command: asyncdiff-rt bench {' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}".rstrip())
    print(f"device: {card}\n{settings}", flush=True)
    rows = []
    for label, n, s, devices in _rows(device, quick, sm=not args.no_sm):
        if label == COMPILED and args.no_compile:
            continue
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            rows.append({"row": label, "n_components": n, "stride": s, "devices": devices,
                         "error": "skipped (time budget)"})
            continue
        try:
            rows.append(bench.row(label, n, s, devices))
        except Exception as e:  # one row failing (e.g. no SM partitions here) keeps the others
            rows.append({"row": label, "n_components": n, "stride": s, "devices": devices,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        print(f"  {rows[-1]['row']}: {rows[-1].get('latency_ms', rows[-1].get('error'))}", flush=True)
        if args.out:  # after every row, so that a run cut short still leaves its table
            _write(Path(args.out), card, settings, steps, rows)
    print(table(rows, card, settings))
    if args.out:
        print(f"wrote {' and '.join(str(p) for p in _write(Path(args.out), card, settings, steps, rows))}")
    failed = [r for r in rows if "error" in r and not r["error"].startswith("skipped") and "SM" not in r["row"]]
    if not args.no_transformer:
        from .bench_baselines import run_transformer

        failed += run_transformer(args, device, steps, repeats, card)
    return 1 if failed else 0


def card_slug(card):
    """A file-name part for a device name."""
    return re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")[:60]


def _write(out, card, settings, steps, rows):
    out.mkdir(parents=True, exist_ok=True)
    slug = card_slug(card)
    md, js = out / f"bench_local_{slug}.md", out / f"bench_local_{slug}.json"
    md.write_text(table(rows, card, settings))
    js.write_text(json.dumps({"device": card, "settings": settings, "steps": steps, "rows": rows},
                             indent=1, default=str))
    return md, js
