"""The judge: a small CNN that reads colour, kind, size and position of a shape.

It plays the role CLIP and Inception play for real models: its predictions give
prompt adherence, its penultimate features give the Frechet distance and the
LPIPS-like distance. Trained on the generator's images by `scripts/train_judge.py`.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from . import shapes

JUDGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "judge")
HEADS = {name: len(values) for name, values in shapes.ATTRIBUTES.items()}  # color, kind, size, position


class Judge(nn.Module):
    """Images (n, 3, 32, 32) in [-1, 1] -> one logit vector per attribute."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.AvgPool2d(2))
        # Flatten at 4x4 rather than pool globally: position is an attribute.
        self.trunk = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width),
                                   nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """int64 labels (n, 4) in the order color, kind, size, position."""
        out = self(x)
        return torch.stack([out[k].argmax(-1) for k in HEADS], dim=1)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(path, "judge.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config, f)


def load_judge(path: Optional[str] = None, device: Optional[str] = None) -> Judge:
    """The trained judge shipped with the package, in eval mode."""
    from safetensors.torch import load_file
    path = path or JUDGE_DIR
    weights = os.path.join(path, "judge.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no trained judge at {path}: reinstall the package with its package data, "
                                f"or train one with `python scripts/train_judge.py`")
    with open(os.path.join(path, "config.json")) as f:
        judge = Judge(**json.load(f))
    judge.load_state_dict(load_file(weights))
    return judge.eval().to(device or "cpu")
