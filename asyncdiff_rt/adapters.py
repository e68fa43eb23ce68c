"""Denoiser adapters: per model class, which argument is the latent and which the
timestep, and how the timestep the model receives maps to the scheduler's. Data, read by
one mechanism (engine/call.py); every other stage is the same for UNets and transformers.

A class not listed is read by parameter name: the latent is `sample`, `hidden_states` or
`x`, the timestep `timestep`, `timesteps` or `t`; failing those, the first two parameters.
"""
import functools
import inspect
from dataclasses import dataclass

_LATENT_NAMES = ("sample", "hidden_states", "x")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


@dataclass(frozen=True)
class Adapter:
    latent: str
    timestep: str
    # The model receives the scheduler's timestep cast to the timestep argument's dtype
    # and divided by this (FLUX: t / 1000), as its pipelines compute it.
    timestep_divisor: float = 1.0


# Classes whose pipelines pass something other than the scheduler's timestep.
_DIVISORS = {
    "FluxTransformer2DModel": 1000.0,
    "FluxControlNetModel": 1000.0,
}


def adapter_for(denoiser):
    return _adapter(type(denoiser))


@functools.lru_cache(maxsize=None)  # once per class: it is asked at every denoiser call
def _adapter(cls):
    names = list(inspect.signature(cls.forward).parameters)[1:]  # without self
    if len(names) < 2:
        raise TypeError(f"{cls.__name__}.forward must take a latent and a timestep")
    latent = next((n for n in _LATENT_NAMES if n in names), names[0])
    timestep = next((n for n in _TIMESTEP_NAMES if n in names), next(n for n in names if n != latent))
    divisor = next((_DIVISORS[c.__name__] for c in cls.__mro__ if c.__name__ in _DIVISORS), 1.0)
    return Adapter(latent, timestep, divisor)
