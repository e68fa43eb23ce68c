"""The runtime's own step cache (SEMANTICS.md, "Step caches"; docs/STEP_CACHE.md).

A skip list fixed before a generation starts: a skipped step runs nothing on any
device, commits nothing and emits the prediction of the step before. Because the list
is data in the program, every device and rank decides the same with no message and no
host read. The list is given explicitly or chosen by `calibrate` from one sequential
generation (a MagCache/TeaCache-style criterion on the predictions' relative change).
"""
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCache:
    """`skip`: indices of the denoising steps (0 .. K-1 of each call) that are skipped."""

    skip: tuple = ()

    def __post_init__(self):
        if isinstance(self.skip, (str, bytes)) or not hasattr(self.skip, "__iter__"):
            raise TypeError(f"StepCache(skip={self.skip!r}): give a list of step indices, e.g. [3, 5]")
        skip = tuple(self.skip)
        for k in skip:
            if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
                raise ValueError(f"StepCache(skip=...) holds {k!r}: give step indices as integers >= 0")
        object.__setattr__(self, "skip", tuple(sorted({int(k) for k in skip})))


def check_step_cache(step_cache, warmup):
    """`parallelize`'s step_cache= as a StepCache (None: no cache), checked against what is
    known before the first call; the step count is checked at each call's start."""
    if step_cache is None:
        return StepCache()
    if not isinstance(step_cache, StepCache):
        step_cache = StepCache(step_cache)  # a plain list of steps
    inside = [k for k in step_cache.skip if k < warmup]
    if inside:
        raise ValueError(f"step_cache skips {inside}, inside the warm-up (steps 0..{warmup - 1}): warm-up steps fill "
                         f"the caches and are never skipped; skip steps >= {warmup} or lower warmup")
    return step_cache


def relative_changes(predictions):
    """r_k = |eps_k - eps_{k-1}| / |eps_{k-1}| (L1) for k >= 1; r_0 = inf (nothing before it)."""
    out = [float("inf")]
    for before, now in zip(predictions, predictions[1:]):
        before, now = before.double(), now.double()
        out.append(float((now - before).abs().sum() / before.abs().sum().clamp_min(1e-30)))
    return out


def choose_skips(predictions, threshold, warmup=1, stride=1):
    """The steps to skip, from one sequential generation's predictions: walking from the
    warm-up on, a step (with stride 2 a compute+reuse pair) is skipped while the relative
    changes accumulated since the last computed step stay <= `threshold`; a computed step
    resets the sum. threshold 0 skips nothing."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: give the accumulated relative change allowed, a number in "
                         "[0, 1] (0 skips nothing; 0.1-0.3 is typical)")
    if stride not in (1, 2):
        raise ValueError(f"stride={stride!r}: use 1 or 2")
    changes, skip, total = relative_changes(predictions), [], 0.0
    k = warmup
    while k < len(predictions):
        group = list(range(k, min(k + stride, len(predictions))))
        cost = sum(changes[i] for i in group)
        if total + cost <= threshold:
            skip += group
            total += cost
        else:
            total = 0.0
        k += stride
    return skip


def record_predictions(denoiser, generate):
    """Call `generate()` (one sequential generation) and return `denoiser`'s outputs, one per call."""
    seen = []

    def keep(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        seen.append(out.detach().clone())

    handle = denoiser.register_forward_hook(keep)
    try:
        with torch.no_grad():
            generate()
    finally:
        handle.remove()
    return seen


def calibrate(pipe, threshold, *args, warmup=1, stride=1, **kwargs):
    """A StepCache chosen from one sequential generation `pipe(*args, **kwargs)` (call it
    before `parallelize`, with the step count and guidance the generations will use)."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    predictions = record_predictions(denoiser, lambda: pipe(*args, **kwargs))
    return StepCache(choose_skips(predictions, threshold, warmup, stride))
