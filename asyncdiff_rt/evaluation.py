"""Quality of asynchronous denoising against the sequential model, offline.

Metrics (the judge stands in for CLIP / Inception / LPIPS, see models/judge.py):
- adherence: share of samples whose every attribute the judge reads as the
  prompt says (like CLIP score);
- frechet: Frechet distance between judge features of generated and real images
  of the same prompts (like FID; biased at small sample counts, compare rows
  of one run only);
- against the sequential output of the same seed: PSNR (dB, of the MSE over
  all samples; inf if identical),
  max |diff| (images in [0, 1]) and feature distance (squared L2 distance of
  unit-normalised judge features, like LPIPS).
`run_eval` runs the table behind `asyncdiff-rt eval`; `run_demo` is `make demo`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .models import shapes

# ---------------------------------------------------------------- metrics


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]; inf where identical."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)  # 1/0 -> inf


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n, d)."""
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = torch.cov(fa.T), torch.cov(fb.T)
    # tr sqrt(ca cb) = tr sqrt(sa cb sa) with sa = sqrt(ca): symmetric, so eigh is stable.
    w, v = torch.linalg.eigh(ca)
    sa = (v * w.clamp_min(0).sqrt()) @ v.T
    tr_covmean = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0).sqrt().sum()
    d = (mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_covmean
    return max(d.item(), 0.0)


def feature_distance(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Per-pair squared L2 distance of unit-normalised features."""
    na = torch.nn.functional.normalize(fa.double(), dim=1)
    nb = torch.nn.functional.normalize(fb.double(), dim=1)
    return (na - nb).pow(2).sum(1)


@torch.no_grad()
def judge_images(judge, images01: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted labels) for images in [0, 1]."""
    feats, preds = [], []
    for i in range(0, len(images01), batch):
        x = images01[i:i + batch].float().to(next(judge.parameters()).device) * 2 - 1
        f = judge.features(x)
        feats.append(f.cpu())
        preds.append(torch.stack([h(f).argmax(-1) for h in judge.heads.values()], 1).cpu())
    return torch.cat(feats), torch.cat(preds)


def adherence(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose every attribute is as the prompt says."""
    return (pred == labels).all(1).float().mean().item()


def attribute_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share of samples the judge reads as the prompt says, per attribute (says which one fails)."""
    return {k: (pred[:, i] == labels[:, i]).float().mean().item() for i, k in enumerate(shapes.ATTRIBUTES)}


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class RunConfig:
    """One row of the table; n_components == 1 is the sequential baseline."""
    n_components: int = 1
    stride: int = 1
    warmup: int = 1
    partition: str = "auto"
    stride_reuse: str = "component"

    @property
    def name(self) -> str:
        if self.n_components == 1:
            return "sequential"
        reuse = f" {self.stride_reuse}" if self.stride == 2 else ""
        return f"{self.n_components}x{self.stride} W={self.warmup} {self.partition}{reuse}"


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'1,2x1,2x2' -> [(1, 1), (2, 1), (2, 2)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        n, _, s = item.partition("x")
        try:
            n, s = int(n), int(s or 1)
        except ValueError:
            raise ValueError(f"bad config {item!r}: write N or NxS, e.g. 1,2x1,3x2") from None
        if n < 1 or s not in (1, 2) or (n == 1 and s != 1):
            raise ValueError(f"bad config {item!r}: N >= 1 components, stride S in {{1, 2}}, 1 means sequential")
        out.append((n, s))
    return out


def expand_runs(configs: Sequence[tuple[int, int]], warmups: Sequence[int], partitions: Sequence[str],
                reuses: Sequence[str]) -> list[RunConfig]:
    """Every combination, without rows that cannot differ (stride_reuse only matters for S = 2)."""
    runs = []
    for n, s in configs:
        if n == 1:
            runs.append(RunConfig())
            continue
        for w in warmups:
            for p in partitions:
                for r in (reuses if s == 2 else reuses[:1]):
                    runs.append(RunConfig(n, s, w, p, r if s == 2 else "component"))
    if RunConfig() not in runs:  # every row is compared with the sequential output
        runs.insert(0, RunConfig())
    return list(dict.fromkeys(runs))


def eval_specs(n: int, prompts: str = "heldout") -> list[shapes.Spec]:
    """n prompts cycling through the held-out (or training) combinations."""
    train, held = shapes.split_combos()
    pool = {"heldout": held, "train": train, "all": shapes.all_combos()}.get(prompts)
    if pool is None:
        raise ValueError(f"prompts={prompts!r}: use heldout, train or all")
    return [pool[i % len(pool)] for i in range(n)]


MODELS = ("unet", "dit")  # the shipped tiny UNet, the shipped tiny transformer (PixArt DiT)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"model={model!r}: use unet (the shipped tiny UNet) or dit (the shipped tiny transformer)")


def default_partitions(model: str) -> tuple[str, ...]:
    """The partitions a table compares: the reference code publishes splits for UNets only."""
    _check_model(model)
    return ("auto",) if model == "dit" else ("auto", "upstream")


@torch.no_grad()
def generate(pipe, specs: Sequence[shapes.Spec], seed: int, steps: int, guidance: float,
             batch: int = 64, progress=None, model: str = "unet") -> torch.Tensor:
    """Images in [0, 1] (n, 3, 32, 32), sample i drawn from seed + i whatever the batching.
    `model` says which shipped model `pipe` is: "unet" decodes its own images, "dit"'s
    latents are the pixels (told, not guessed from the pipeline's attributes: a pipeline
    with a `transformer` and a VAE decodes like the UNet's)."""
    _check_model(model)
    out = []
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        prompts, kwargs = [shapes.caption(s) for s in chunk], dict(num_inference_steps=steps, guidance_scale=guidance,
                                                                   generator=gens)
        if model == "dit":
            from .models.tiny_dit import images as dit_images

            imgs = dit_images(pipe, prompts, **kwargs)
        else:
            imgs = pipe(prompts, output_type="pt", **kwargs).images
        out.append(imgs.cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(out)


# ---------------------------------------------------------------- the table


@dataclass
class Row:
    config: str
    n_components: int
    stride: int
    warmup: int
    partition: str
    stride_reuse: str
    critical_path_steps: int
    seconds: float
    adherence: float
    frechet: float
    psnr_db: float
    max_abs_diff: float
    feature_distance: float
    extra: dict = field(default_factory=dict)


def _critical_path(run: RunConfig, steps: int) -> int:
    if run.n_components == 1:
        return steps
    from .schedule import critical_path_steps
    return critical_path_steps(steps, run.warmup, run.stride)


def run_eval(configs: str = "1,2x1,3x1,4x1,2x2,3x2", warmups: Sequence[int] = (1, 3), samples: int = 256,
             steps: int = 50, partitions: Optional[Sequence[str]] = None,
             stride_reuse: Sequence[str] = ("component", "previous"), guidance: float = 4.0,
             prompts: str = "heldout", seed: int = 0, batch: int = 64, grid_cols: int = 8,
             out_dir: Optional[str] = None, device: Optional[str] = None, pipe=None, judge=None,
             progress: bool = True, command: str = "", model: str = "unet") -> dict:
    """Generate `samples` images per row, score them, write eval.json and eval_grid.png.
    `model`: "unet" (the shipped tiny UNet) or "dit" (the shipped tiny transformer; `pipe`,
    if given, must be that model); `partitions`: default `default_partitions(model)`."""
    from tqdm import tqdm

    from .models.judge import load_judge
    from .models.tiny_dit import load_tiny_dit
    from .models.tiny_t2i import load_tiny

    partitions = default_partitions(model) if partitions is None else partitions
    if model == "dit" and "upstream" in partitions:
        raise ValueError('the reference code publishes no split for a transformer: use partition "auto" (or '
                         '"measured") with --model dit')
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if pipe is None:
        pipe = load_tiny_dit(device=device) if model == "dit" else load_tiny(device=device)
    judge = load_judge(device=device) if judge is None else judge
    runs = expand_runs(parse_configs(configs), warmups, partitions, stride_reuse)
    specs = eval_specs(samples, prompts)
    labels = torch.tensor([s.labels() for s in specs])
    real = (torch.from_numpy(shapes.render_specs(specs, seed=seed + 1_000_000)) + 1) / 2
    real_feat, real_pred = judge_images(judge, real)

    result = {
        "command": command, "device": str(device), "model": model,
        "settings": {"samples": samples, "steps": steps, "guidance_scale": guidance, "scheduler": "DDIM",
                     "prompts": prompts, "seed": seed, "batch": batch},
        "real_images": {"adherence": adherence(real_pred, labels)},
        "rows": [],
    }
    bar = tqdm(total=samples * len(runs), desc="eval", unit="img", disable=not progress, mininterval=5)
    rows, images, seq = [], {}, None
    for run in runs:  # runs[0] is the sequential baseline
        bar.set_description(f"eval {run.name}")
        handle = None
        if run.n_components > 1:
            from . import parallelize
            handle = parallelize(pipe, n_components=run.n_components, stride=run.stride, warmup=run.warmup,
                                 partition=run.partition, stride_reuse=run.stride_reuse)
        try:
            t0 = time.perf_counter()
            imgs = generate(pipe, specs, seed, steps, guidance, batch, progress=bar, model=model)
            seconds = time.perf_counter() - t0
            imbalance = handle.plan.summary()["imbalance"] if handle is not None else 1.0
        finally:
            if handle is not None:
                handle.remove()
        feat, pred = judge_images(judge, imgs)
        if seq is None:
            seq = (imgs, feat)
        rows.append(Row(
            config=run.name, n_components=run.n_components, stride=run.stride,
            warmup=run.warmup if run.n_components > 1 else 0, partition=run.partition if run.n_components > 1 else "-",
            stride_reuse=run.stride_reuse if run.stride == 2 else "-",
            critical_path_steps=_critical_path(run, steps), seconds=round(seconds, 2),
            adherence=adherence(pred, labels), frechet=frechet_distance(feat, real_feat),
            psnr_db=psnr(imgs.flatten()[None], seq[0].flatten()[None]).item(),  # of the pooled MSE
            max_abs_diff=max_abs_diff(imgs, seq[0]), feature_distance=feature_distance(feat, seq[1]).mean().item(),
            extra={"attribute_accuracy": attribute_accuracy(pred, labels), "imbalance": imbalance}))
        images[run.name] = imgs[:grid_cols]
        result["rows"] = [asdict(r) for r in rows]
        if out_dir:  # after every row, so that a run cut short still leaves its table
            _write_json(out_dir, result)
    bar.close()
    if out_dir:
        save_grid(images, os.path.join(out_dir, "eval_grid.png"), [shapes.caption(s) for s in specs[:grid_cols]])
    return result


def _write_json(out_dir: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)


def format_table(result: dict) -> str:
    head = f"{'config':34s} {'crit':>5s} {'sec':>7s} {'adher':>6s} {'frechet':>8s} {'psnr':>7s} {'maxdiff':>7s} {'featd':>7s}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['config']:34s} {r['critical_path_steps']:5d} {r['seconds']:7.1f} {r['adherence']:6.3f} "
                     f"{r['frechet']:8.3f} {r['psnr_db']:7.2f} {r['max_abs_diff']:7.3f} {r['feature_distance']:7.4f}")
    s = result["settings"]
    lines.append(f"{s['samples']} samples, {s['steps']} DDIM steps, guidance {s['guidance_scale']}, "
                 f"{s['prompts']} prompts; real images adherence {result['real_images']['adherence']:.3f}")
    return "\n".join(lines)


def save_grid(images: dict, path: str, captions: Sequence[str], scale: int = 2) -> None:
    """One labelled row per config, the sequential row above each (same seeds)."""
    from PIL import Image, ImageDraw

    names = list(images)
    seq, others = names[0], names[1:] or names[:1]
    order = [n for o in others for n in (seq, o)] if names[1:] else [seq]
    cols = len(images[seq])
    cell, label_w, pad = 32 * scale, 230, 2
    height = (len(order) + 1) * (cell + pad)
    canvas = Image.new("RGB", (label_w + cols * (cell + pad), height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(captions[:cols]):  # column header: short attribute form of each prompt
        sp = shapes.parse_caption(c)
        draw.text((label_w + j * (cell + pad), 4), f"{shapes.COLOR_NAMES[sp.color][:3]} {shapes.KINDS[sp.kind][:4]}",
                  fill=(220, 220, 220))
        draw.text((label_w + j * (cell + pad), 16), f"{shapes.SIZES[sp.size][:2]} {shapes.POSITIONS[sp.position]}",
                  fill=(160, 160, 160))
    for i, name in enumerate(order):
        y = (i + 1) * (cell + pad)
        draw.text((4, y + cell // 2 - 5), name, fill=(255, 255, 255) if name != seq else (150, 150, 150))
        arr = (images[name].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for j in range(cols):
            tile = Image.fromarray(arr[j]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + pad), y))
    canvas.save(path)


# ---------------------------------------------------------------- make demo


def run_demo(out_dir: str, samples: int = 8, steps: int = 50, guidance: float = 4.0) -> dict:
    """Few held-out prompts, sequential and N = 2; print the table, write the grid; the result."""
    result = run_eval(configs="1,2x1", warmups=(3,), samples=samples, steps=steps, partitions=("auto", "upstream"),
                      stride_reuse=("component",), guidance=guidance, out_dir=out_dir, progress=True,
                      command=f"asyncdiff_rt.evaluation.run_demo({out_dir!r})")
    print(format_table(result))
    print(f"wrote {os.path.join(out_dir, 'eval.json')} and {os.path.join(out_dir, 'eval_grid.png')}")
    return result
