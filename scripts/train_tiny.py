"""Train the tiny shapes text-to-image model (UNet, or with --model dit the transformer) on the CPU.

    python scripts/train_tiny.py   # how the shipped UNet was made: 6000 steps, ~50 min on 2 cores
    python scripts/train_tiny.py --model dit --steps 12000 --max-minutes 45   # the shipped transformer

The transformer starts from the trained UNet model's text encoder (models/tiny_dit.py).
v-prediction DDPM loss (cosine schedule) on fresh generator images of the
training combinations (held-out ones are never seen), 20% of captions dropped
to "" for classifier-free guidance, AdamW with linear warm-up and cosine decay,
and an EMA of the weights, which is what gets saved. Everything is seeded; the
loss log (CSV: step, loss, lr, seconds) is written next to the weights. Keep
the machine otherwise idle: with --threads 2 on two cores, any other busy
process stalls every step many times over.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from asyncdiff_rt.models import shapes  # noqa: E402
from asyncdiff_rt.models import tiny_dit as td  # noqa: E402
from asyncdiff_rt.models import tiny_t2i as tt  # noqa: E402


class UNetRecipe:
    """What differs between the two models: building, the forward, saving."""

    weights = tt.WEIGHTS_DIR

    def build(self, init):
        pipe = tt.build_pipeline() if not init else tt.load_tiny(init)
        return pipe, pipe.unet, pipe.text_encoder

    def encode(self, images):  # the UNet's latents: lossless space-to-depth
        return tt.encode(images)

    def predict(self, model, te, xt, t, ids, mask):
        return model(tt.with_coords(xt), t, encoder_hidden_states=te(ids)[0]).sample

    def pipeline(self, model, te, tok, prediction_type):
        return tt.TinyT2IPipeline(model, te, tok, tt.build_schedulers(prediction_type)[1])


class DiTRecipe(UNetRecipe):
    weights = td.WEIGHTS_DIR

    def build(self, init):
        pipe = td.build_pipeline() if not init else td.load_tiny_dit(init)
        return pipe, pipe.transformer, pipe.text_encoder

    def encode(self, images):  # the transformer works on the pixels
        return images

    def predict(self, model, te, xt, t, ids, mask):
        return model(xt, encoder_hidden_states=te(ids, attention_mask=mask)[0], encoder_attention_mask=mask,
                     timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def pipeline(self, model, te, tok, prediction_type):
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=None, transformer=model,
                                   scheduler=tt.build_schedulers(prediction_type)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet", choices=["unet", "dit"])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="wall-time budget: stop (and save) when it is spent, and decay the learning rate "
                         "by whichever of --steps and this runs out first; 0 = steps only (reproducible)")
    ap.add_argument("--prediction-type", default="v_prediction", choices=["epsilon", "v_prediction"])
    ap.add_argument("--high-t", type=float, default=0.0,
                    help="share of the batch whose timestep is drawn from [600, 1000) instead of [0, 1000)")
    ap.add_argument("--init", default=None, help="start from this saved pipeline (fine-tuning)")
    ap.add_argument("--out", default=None, help="default: the shipped weights' folder of --model")
    ap.add_argument("--log", default=None, help="loss log CSV; default: <out>_train_log.csv")
    args = ap.parse_args(argv)
    recipe = DiTRecipe() if args.model == "dit" else UNetRecipe()
    args.out = args.out or recipe.weights

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe, unet, te = recipe.build(args.init)
    unet, te, tok = unet.train(), te.train(), pipe.tokenizer
    unet.requires_grad_(True), te.requires_grad_(True)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    pred_type = args.prediction_type
    ddpm, _ = tt.build_schedulers(pred_type)
    abar = ddpm.alphas_cumprod.float()
    train_combos, _ = shapes.split_combos()
    empty = tok([""], padding="max_length", max_length=tt.MAX_LENGTH, return_tensors="pt")
    gen = torch.Generator().manual_seed(args.seed)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes:  # a shared CPU may not reach --steps: decay by the budget that ends first
            p = max(p, (time.time() - t0) / (60 * args.max_minutes))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))

    def save(tag: str) -> None:
        out = recipe.pipeline(ema_unet, ema_te, tok, pred_type)
        out.save_pretrained(args.out, safe_serialization=True)
        print(f"saved EMA weights ({tag}) to {args.out}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    log_path = args.out.rstrip("/") + "_train_log.csv"
    log = open(args.log or log_path, "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "loss", "lr", "seconds"])
    t0, run_loss = time.time(), None
    bar = tqdm(range(args.steps), mininterval=20, desc=f"train tiny {args.model}")
    for step in bar:
        imgs, caps, _ = shapes.sample(args.batch, seed=args.seed * 1_000_003 + step, combos=train_combos)
        x0 = recipe.encode(torch.from_numpy(imgs))
        tokens = tok(caps, padding="max_length", max_length=tt.MAX_LENGTH, return_tensors="pt")
        ids, mask = tokens.input_ids, tokens.attention_mask
        drop = torch.rand(args.batch, generator=gen) < args.p_uncond
        ids[drop], mask[drop] = empty.input_ids, empty.attention_mask
        t = torch.randint(0, ddpm.config.num_train_timesteps, (args.batch,), generator=gen)
        if args.high_t:  # the layout (hence prompt adherence) is decided at high noise: see it more often
            hi = torch.rand(args.batch, generator=gen) < args.high_t
            t[hi] = torch.randint(600, ddpm.config.num_train_timesteps, (int(hi.sum()),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        pred = recipe.predict(unet, te, xt, t, ids, mask)
        target = noise if pred_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # short EMA early on
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - decay)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        writer.writerow([step, f"{loss.item():.5f}", f"{g['lr']:.6f}", f"{time.time() - t0:.1f}"])
        bar.set_postfix(loss=f"{run_loss:.4f}", refresh=False)
        if (step + 1) % args.save_every == 0:
            log.flush()
            save(f"step {step + 1}, smoothed loss {run_loss:.4f}")
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"time limit of {args.max_minutes} min reached at step {step + 1}", flush=True)
            break
    log.close()
    save(f"final, smoothed loss {run_loss:.4f}, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
