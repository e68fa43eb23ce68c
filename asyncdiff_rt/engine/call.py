"""One denoiser call as the pipeline made it, re-playable with another latent or timestep."""
import inspect

import torch
import torch.utils._pytree as pytree

from ..adapters import adapter_for
from ..arguments import labelled_leaves, other_arguments


class DenoiserCall:
    def __init__(self, denoiser, args, kwargs):
        self._denoiser = denoiser
        self._bound = inspect.signature(denoiser.forward).bind(*args, **kwargs)
        self.adapter = adapter_for(denoiser)
        self._latent_name, self._timestep_name = self.adapter.latent, self.adapter.timestep
        if self._latent_name not in self._bound.arguments or self._timestep_name not in self._bound.arguments:
            raise TypeError(f"{type(denoiser).__name__} was called without its {self._latent_name!r} or "
                            f"{self._timestep_name!r} argument")

    @property
    def signature(self):
        return self._bound.signature

    @property
    def arguments(self):
        """The bound arguments by name (read-only by convention: `run` copies them)."""
        return self._bound.arguments

    @property
    def latent_name(self):
        return self._latent_name

    @property
    def timestep_name(self):
        return self._timestep_name

    @property
    def latent(self):
        return self._bound.arguments[self._latent_name]

    @property
    def timestep(self):
        return self._bound.arguments[self._timestep_name]

    def shapes(self):
        """Shape, dtype and device of every tensor argument but the timestep: what a
        generation's caches are sized for, so it must not change within one."""
        return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in pytree.tree_leaves(dict(self.arguments))
                     if isinstance(t, torch.Tensor) and t is not self.timestep)

    def example(self):
        """A `make_inputs` for the trace (trace.py) with this call's shapes, dtypes,
        devices and other arguments: the plan is made from what the pipeline really passes."""
        def make():
            fake = {k: pytree.tree_map(_empty_like, v) for k, v in self._bound.arguments.items()}
            latent, timestep = fake.pop(self._latent_name), fake.pop(self._timestep_name)
            return latent, timestep, (), _by_name(self._bound.signature, fake)

        return make

    def scheduler_value(self):
        """The call's timestep as the scheduler's value (a host read: once per generation)."""
        return float(_scalar(self.timestep)) * self.adapter.timestep_divisor

    def others(self):
        """The arguments but the latent and the timestep, by name."""
        return other_arguments(self._bound.arguments, self._latent_name, self._timestep_name)

    def run(self, latent, tau, skipped=frozenset()):
        """Call the denoiser with this call's other arguments, `latent` and timestep `tau`
        (a value from the scheduler's timesteps, given the type and shape of the original);
        the tensor arguments labelled in `skipped` (arguments.py) read as zeros, as on a
        device they are not sent to."""
        arguments = dict(self._bound.arguments)
        if skipped:
            others = self.others()
            leaves, spec = pytree.tree_flatten(others)
            leaves = [torch.zeros_like(leaf) if label in skipped else leaf
                      for (label, _), leaf in zip(labelled_leaves(others), leaves)]
            arguments.update(pytree.tree_unflatten(leaves, spec))
        bound = inspect.BoundArguments(self._bound.signature, arguments)
        bound.arguments[self._latent_name] = latent
        bound.arguments[self._timestep_name] = _like(self.timestep, tau, self.adapter.timestep_divisor)
        return self._denoiser(*bound.args, **bound.kwargs)

    def argument_labels(self):
        """Labels of the tensor arguments but latent and timestep (arguments.py)."""
        return {label for label, leaf in labelled_leaves(self.others()) if isinstance(leaf, torch.Tensor)}

    def argument_bytes(self, skipped=frozenset()):
        """Bytes of the tensor arguments a device receives (all but `skipped`)."""
        return sum(leaf.nbytes for label, leaf in labelled_leaves(self.others())
                   if isinstance(leaf, torch.Tensor) and label not in skipped)


def as_model_timestep(value, original, divisor=1.0):
    """Scheduler timestep(s) `value` as the model receives them: the type, dtype and device
    of `original`, divided by `divisor` in that dtype (as the pipelines compute it)."""
    if isinstance(original, torch.Tensor):
        value = torch.as_tensor(value).to(device=original.device, dtype=original.dtype)
        return value / divisor if divisor != 1.0 else value
    value = value.item() if isinstance(value, torch.Tensor) else value
    return type(original)(value / divisor if divisor != 1.0 else value)


def timestep_table(timesteps, call, device):
    """A generation's timesteps as the model receives them from `call`'s pipeline (its
    type, dtype and divisor), on `device`, indexed by the program's tau."""
    divisor = call.adapter.timestep_divisor
    if isinstance(call.timestep, torch.Tensor):
        return as_model_timestep(torch.as_tensor(timesteps), call.timestep, divisor).to(device)
    return [as_model_timestep(v, call.timestep, divisor) for v in timesteps]


def _like(original, value, divisor=1.0):
    value = as_model_timestep(value, original, divisor)
    return value.expand(original.shape) if isinstance(original, torch.Tensor) else value


def _scalar(t):
    return t.flatten()[0].item() if isinstance(t, torch.Tensor) else t


def _by_name(signature, arguments):
    """Bound arguments as keywords (a **kwargs parameter's dict spread out)."""
    out = {}
    for name, value in arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _empty_like(value):
    """Inside the trace's fake mode: a fake tensor like `value` (no data is read)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device=value.device)
    return value
