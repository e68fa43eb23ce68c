"""One denoiser call as the pipeline made it, re-playable with another latent or timestep."""
import inspect

import torch
import torch.utils._pytree as pytree

from ..arguments import labelled_leaves, other_arguments


class DenoiserCall:
    def __init__(self, denoiser, args, kwargs):
        signature = inspect.signature(denoiser.forward)
        names = list(signature.parameters)
        if len(names) < 2:
            raise TypeError(f"{type(denoiser).__name__}.forward must take (latent, timestep, ...)")
        self._denoiser = denoiser
        self._bound = signature.bind(*args, **kwargs)
        self._latent_name, self._timestep_name = names[0], names[1]

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
            bound = inspect.BoundArguments(self._bound.signature, fake)
            args = bound.args
            if len(args) < 2:
                raise TypeError("the denoiser must receive its latent and timestep positionally or by their names")
            return args[0], args[1], args[2:], bound.kwargs

        return make

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
        bound.arguments[self._timestep_name] = _like(self.timestep, tau)
        return self._denoiser(*bound.args, **bound.kwargs)

    def argument_labels(self):
        """Labels of the tensor arguments but latent and timestep (arguments.py)."""
        return {label for label, leaf in labelled_leaves(self.others()) if isinstance(leaf, torch.Tensor)}

    def argument_bytes(self, skipped=frozenset()):
        """Bytes of the tensor arguments a device receives (all but `skipped`)."""
        return sum(leaf.nbytes for label, leaf in labelled_leaves(self.others())
                   if isinstance(leaf, torch.Tensor) and label not in skipped)


def _like(original, value):
    if isinstance(original, torch.Tensor):
        value = torch.as_tensor(value).to(device=original.device, dtype=original.dtype)
        return value.expand(original.shape)
    return type(original)(value.item() if isinstance(value, torch.Tensor) else value)


def _empty_like(value):
    """Inside the trace's fake mode: a fake tensor like `value` (no data is read)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device=value.device)
    return value
