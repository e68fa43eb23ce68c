"""The step protocol, for frameworks that do not use diffusers' schedulers (k-diffusion
samplers, ComfyUI, a serving stack's own loop): `begin(timesteps)` starts a generation
with the timesteps the denoiser will receive, in order, then the framework calls
`handle.denoiser` once per step (more than once for separate guidance passes: roles), with
the denoiser's own signature. Everything else is `parallelize`'s: the plan, executors,
change detection, roles, `stats()`, `profile()`, `remove()`.
"""
from types import SimpleNamespace

import torch

from .diffusers import parallelize


class StepSchedule:
    """What AsyncDenoiser reads of a scheduler: the generation's timesteps."""

    def __init__(self):
        self.timesteps = torch.zeros(0)
        self.begin_index = None

    def begin(self, timesteps):
        """Start a generation over `timesteps` (those the denoiser receives, in order; a
        new tensor each time, so that repeating a list still starts a new generation)."""
        self.timesteps = torch.as_tensor(timesteps).clone()
        if self.timesteps.ndim != 1 or len(self.timesteps) == 0:
            raise ValueError(f"begin() takes a non-empty 1-D list of timesteps, got shape {tuple(self.timesteps.shape)}")
        return self.timesteps


def parallelize_denoiser(denoiser, **settings):
    """Asynchronous denoising for a bare denoiser (a diffusers UNet or transformer). Returns
    `parallelize`'s handle with `begin(timesteps)`; call `handle.denoiser` as the model.
    `settings` are `parallelize`'s (n_components, stride, warmup, devices, executor, ...)."""
    if not isinstance(denoiser, torch.nn.Module):
        raise TypeError(f"parallelize_denoiser takes the denoiser module, got {type(denoiser).__name__}")
    schedule = StepSchedule()
    handle = parallelize(SimpleNamespace(unet=denoiser, scheduler=schedule), **settings)
    handle.begin = schedule.begin
    return handle
