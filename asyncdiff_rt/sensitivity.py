"""Sensitivity to staleness, for `partition="quality"`.

Which places of a denoiser tolerate stale inputs is measured, not assumed: a few
calibration generations at S = 1, W = 1 with the reference executor, compared with the
sequential images of the same seeds. A *cut* before unit i (components units[:i] and
units[i:]) makes every activation crossing it one step old; its cost is the mean squared
error its two-component run adds. Only cuts that some balanced split of the requested
sizes uses are measured. A split's cost is modelled as the sum of its cuts' costs (the
errors of independent perturbations add in MSE); the few cheapest balanced splits are then
run as they are and the one with the smallest measured error wins.

Calibration prompts: for the shipped tiny models, the model's training combinations
(never the held-out ones the eval table scores); for any other pipeline the caller's.
Measurements are kept per denoiser, so planning N = 2, 3 and 4 shares the cut runs.
"""
import weakref

import torch

from .partition import MAX_IMBALANCE, contiguous_splits, ranked_splits

CALIBRATION_PROMPTS = 4
CALIBRATION_STEPS = 10
CALIBRATION_SEED = 10_000  # seeds apart from the eval table's (0..255)
VERIFIED = 3  # cheapest modelled splits run as they are
_MEASURED = weakref.WeakKeyDictionary()  # denoiser -> {(calibration, partition, stride, warmup): MSE, and
#                                          (calibration, "sequential"): (images, unit graph)}


class Calibration:
    """Prompts, step count and seed of the calibration generations, and their sequential images."""

    def __init__(self, pipe, prompts=None, steps=CALIBRATION_STEPS, seed=CALIBRATION_SEED, guidance=None):
        from .models import shapes

        if prompts is None:
            if not _is_shipped(pipe):
                raise ValueError('partition="quality" measures staleness on calibration prompts: give a few '
                                 'prompts typical of your use (calibration_prompts=[...]); only the shipped tiny '
                                 "models have default ones")
            prompts = [shapes.caption(s) for s in _training_specs(CALIBRATION_PROMPTS)]
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"calibration prompts {prompts!r}: give a non-empty list of prompt strings")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"calibration steps={steps!r}: give an integer >= 2 (asynchronous steps follow W = 1)")
        self.pipe, self.prompts, self.steps, self.seed = pipe, list(prompts), steps, seed
        self.guidance = 4.0 if guidance is None and _is_shipped(pipe) else guidance  # the eval table's
        self.key = (tuple(self.prompts), steps, seed, self.guidance)
        self._sequential, self.graph = None, None

    def render(self):
        """Images in [0, 1] of the calibration prompts with the pipeline as it is now."""
        gens = [torch.Generator().manual_seed(self.seed + i) for i in range(len(self.prompts))]
        kwargs = dict(num_inference_steps=self.steps, generator=gens)
        if self.guidance is not None:
            kwargs["guidance_scale"] = self.guidance
        with torch.no_grad():
            if _is_shipped(self.pipe) and hasattr(self.pipe, "transformer"):
                from .models.tiny_dit import images

                return images(self.pipe, self.prompts, **kwargs).cpu()
            return self.pipe(self.prompts, output_type="pt", **kwargs).images.float().cpu()

    def sequential(self):
        """The sequential images, made through a plan at W = K (exactly sequential), which
        also yields the denoiser's unit graph."""
        if self._sequential is None:
            cache = _MEASURED.setdefault(_denoiser(self.pipe), {})
            if (self.key, "sequential") not in cache:
                from . import parallelize

                handle = parallelize(self.pipe, n_components=2, warmup=self.steps)
                try:
                    images = self.render()
                finally:
                    handle.remove()
                cache[(self.key, "sequential")] = (images, handle.plan.graph)
            self._sequential, self.graph = cache[(self.key, "sequential")]
        return self._sequential

    def error(self, partition, stride=1, warmup=1):
        """MSE against sequential of a run of `partition` (lists of unit paths), S = 1 and
        W = 1 unless given."""
        from . import parallelize

        denoiser = _denoiser(self.pipe)
        parts = tuple(tuple(c) for c in partition)
        cache, key = _MEASURED.setdefault(denoiser, {}), (self.key, parts, stride, warmup)
        if key not in cache:
            reference = self.sequential()
            handle = parallelize(self.pipe, n_components=len(parts), stride=stride, warmup=warmup,
                                 partition=[list(c) for c in parts], executor="reference")
            try:
                images = self.render()
            finally:
                handle.remove()
            cache[key] = (images.double() - reference.double()).pow(2).mean().item()
        return cache[key]


def cut_costs(calibration, sizes, max_imbalance=MAX_IMBALANCE):
    """{i: MSE of the two-component run cut before unit i} for every cut a balanced split
    into any of `sizes` components uses."""
    calibration.sequential()
    graph = calibration.graph
    flops, paths = [u.flops for u in graph.units], graph.paths
    cuts = sorted({i for n in sizes if n > 1 for split in contiguous_splits(flops, n, max_imbalance) for i in split})
    return {i: calibration.error([paths[:i], paths[i:]]) for i in cuts}


def quality_partition(pipe, n_components, calibration=None, max_imbalance=MAX_IMBALANCE, verify=VERIFIED):
    """The explicit split (N lists of unit paths) `partition="quality"` runs: the balanced
    contiguous split with the least measured staleness error (module docstring)."""
    calibration = calibration or Calibration(pipe)
    if n_components == 1:
        calibration.sequential()
        return [list(calibration.graph.paths)]
    costs = cut_costs(calibration, [n_components], max_imbalance)
    ranked = ranked_splits(calibration.graph, n_components, costs, max_imbalance)[:max(verify, 1)]
    best = min(ranked, key=lambda p: calibration.error(p.components)) if len(ranked) > 1 else ranked[0]
    return [list(c) for c in best.components]


def _training_specs(n):
    from .evaluation import eval_specs

    return eval_specs(n, "train")


def _is_shipped(pipe):
    """The bundled tiny UNet pipeline or the bundled tiny transformer (a PixArt pipeline
    without a VAE: its latents are the pixels)."""
    from .models.tiny_t2i import TinyT2IPipeline

    return isinstance(pipe, TinyT2IPipeline) or (hasattr(pipe, "transformer") and getattr(pipe, "vae", 1) is None)


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer
