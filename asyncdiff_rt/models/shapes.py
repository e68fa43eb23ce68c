"""Procedural caption -> image data: one coloured shape on black, 32x32 RGB.

Everything is a pure function of a seed (numpy's PCG64), so the training set,
the judge's test set and the evaluation prompts are reproducible without any
download. Attributes: colour (8), kind (4), size (2), position (3x3 grid).
Some attribute combinations are held out of training (`split_combos`) so that
evaluation prompts ask for pictures the model has never seen.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

RES = 32
COLORS = {
    "red": (220, 40, 40), "green": (40, 190, 40), "blue": (50, 80, 235),
    "yellow": (235, 225, 40), "cyan": (40, 215, 225), "magenta": (215, 50, 215),
    "white": (240, 240, 240), "orange": (245, 140, 20),
}
COLOR_NAMES = list(COLORS)
KINDS = ["circle", "square", "triangle", "cross"]
SIZES = ["small", "large"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
ATTRIBUTES = {"color": COLOR_NAMES, "kind": KINDS, "size": SIZES, "position": POSITIONS}
# Every word a caption can hold; the tokenizer's vocabulary is built from it.
VOCAB = sorted({w for names in ATTRIBUTES.values() for n in names for w in n.split()} | {"a", "at", "the"})

_CELL_CENTERS = (7.5, 16.0, 24.5)   # pixel centres of the 3x3 grid rows/columns
_RADIUS = {"small": 3.8, "large": 6.0}
_SUPER = 4                          # supersampling factor for anti-aliased edges


@dataclass(frozen=True)
class Spec:
    """One attribute combination, as indices into the attribute lists."""
    color: int
    kind: int
    size: int
    position: int

    def labels(self) -> tuple[int, int, int, int]:
        return (self.color, self.kind, self.size, self.position)


def caption(spec: Spec) -> str:
    return (f"a {SIZES[spec.size]} {COLOR_NAMES[spec.color]} {KINDS[spec.kind]}"
            f" at the {POSITIONS[spec.position]}")


def parse_caption(text: str) -> Spec:
    """Inverse of `caption`; raises ValueError on text the generator cannot make."""
    words = text.strip().lower().split()
    if len(words) < 6 or words[0] != "a" or words[4:6] != ["at", "the"]:
        raise ValueError(f"not a shapes caption: {text!r}; expected e.g. "
                         f"'a small red circle at the top left'")
    try:
        return Spec(COLOR_NAMES.index(words[2]), KINDS.index(words[3]),
                    SIZES.index(words[1]), POSITIONS.index(" ".join(words[6:])))
    except ValueError:
        raise ValueError(f"unknown attribute in {text!r}; known: {ATTRIBUTES}") from None


def all_combos() -> list[Spec]:
    return [Spec(c, k, s, p) for c, k, s, p in itertools.product(
        range(len(COLOR_NAMES)), range(len(KINDS)), range(len(SIZES)), range(len(POSITIONS)))]


def split_combos(n_heldout: int = 48, seed: int = 0) -> tuple[list[Spec], list[Spec]]:
    """(train, heldout): a fixed random 48 of the 576 combinations are held out."""
    combos = all_combos()
    idx = np.random.default_rng(seed).permutation(len(combos))
    held = sorted(idx[:n_heldout].tolist())
    held_set = set(held)
    return [c for i, c in enumerate(combos) if i not in held_set], [combos[i] for i in held]


def _mask(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    n = RES * _SUPER
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5) / _SUPER
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        m = dx * dx + dy * dy <= r * r
    elif kind == "square":
        s = r * 0.85
        m = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif kind == "triangle":  # upright, apex up; small rotation jitter
        ca, sa = np.cos(angle), np.sin(angle)
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        h = r * 1.1
        m = (v <= 0.6 * h) & (v >= -h + 1.6 * np.abs(u))
    elif kind == "cross":
        w = r * 0.34
        m = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return m.reshape(RES, _SUPER, RES, _SUPER).mean(axis=(1, 3))


def render(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """uint8 image (32, 32, 3); small jitter of place, size and colour from rng."""
    cx = _CELL_CENTERS[spec.position % 3] + rng.uniform(-1.0, 1.0)
    cy = _CELL_CENTERS[spec.position // 3] + rng.uniform(-1.0, 1.0)
    r = _RADIUS[SIZES[spec.size]] * rng.uniform(0.92, 1.08)
    alpha = _mask(KINDS[spec.kind], cx, cy, r, rng.uniform(-0.15, 0.15))
    rgb = np.clip(np.array(COLORS[COLOR_NAMES[spec.color]]) + rng.normal(0, 8, 3), 0, 255)
    bg = rng.uniform(0, 12)  # near-black background
    img = alpha[..., None] * rgb + (1 - alpha[..., None]) * bg
    return np.round(img).astype(np.uint8)


def sample(n: int, seed: int, combos: list[Spec] | None = None):
    """n random (image, caption, labels) from `combos` (default: all).

    Returns images as float32 array (n, 3, 32, 32) in [-1, 1], the captions,
    and int64 labels (n, 4) in the order color, kind, size, position.
    """
    combos = all_combos() if combos is None else combos
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(combos), n)
    specs = [combos[i] for i in picks]
    imgs = np.stack([render(s, rng) for s in specs]).astype(np.float32)
    imgs = imgs.transpose(0, 3, 1, 2) / 127.5 - 1.0
    labels = np.array([s.labels() for s in specs], dtype=np.int64)
    return imgs, [caption(s) for s in specs], labels


def render_specs(specs: list[Spec], seed: int) -> np.ndarray:
    """Images for given specs, float32 (n, 3, 32, 32) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    imgs = np.stack([render(s, rng) for s in specs]).astype(np.float32)
    return imgs.transpose(0, 3, 1, 2) / 127.5 - 1.0
