"""Train the judge (attribute classifier) on generator images, one CPU thread.

    python scripts/train_judge.py      # a few minutes; prints held-out accuracy

Trained on all 576 combinations (it must read held-out prompts too) with fresh
images every step; a little Gaussian noise makes it tolerant of the faint
residual noise in sampled images. Accuracy is measured on images from seeds the
training never draws from; training fails if any attribute is under 98%.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from asyncdiff_rt.models import shapes  # noqa: E402
from asyncdiff_rt.models.judge import HEADS, JUDGE_DIR, Judge  # noqa: E402

TEST_SEED = 987_654_321  # training seeds are 0 .. steps-1


def accuracy(judge: Judge, n: int = 2000) -> dict[str, float]:
    imgs, _, labels = shapes.sample(n, seed=TEST_SEED)
    judge.eval()
    pred = torch.cat([judge.predict(torch.from_numpy(imgs[i:i + 500])) for i in range(0, n, 500)])
    acc = {k: (pred[:, i] == torch.from_numpy(labels[:, i])).float().mean().item() for i, k in enumerate(HEADS)}
    acc["all"] = (pred == torch.from_numpy(labels)).all(1).float().mean().item()
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=JUDGE_DIR)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    bar = tqdm(range(args.steps), mininterval=10, desc="train judge")
    for step in bar:
        imgs, _, labels = shapes.sample(args.batch, seed=step)
        x = torch.from_numpy(imgs)
        x = x + args.noise * torch.rand(()) * torch.randn_like(x)
        out = judge(x)
        y = torch.from_numpy(labels)
        loss = sum(torch.nn.functional.cross_entropy(out[k], y[:, i]) for i, k in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    acc = accuracy(judge)
    print(f"held-out accuracy after {args.steps} steps, {time.time() - t0:.0f} s: {acc}")
    judge.save(args.out)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({"steps": args.steps, "batch": args.batch, "test_images": 2000, "accuracy": acc}, f, indent=1)
    if min(acc.values()) < 0.98:
        print("judge is under 98% on some attribute: train longer (--steps)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
