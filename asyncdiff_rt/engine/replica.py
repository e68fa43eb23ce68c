"""A replica: one device's copy of the denoiser and the static inputs its forwards read.

The copy keeps real weights only for the shared modules and the units the device
computes; every other unit's weights become meta tensors (those units never run there:
their substitutes return cached outputs). Weights already on the device are shared with
the original, not copied. The call's tensor arguments are copied into static tensors
only when they change, so a captured graph can read them at fixed addresses.
"""
import copy
import inspect
from itertools import chain

import torch
import torch.utils._pytree as pytree

from .substitution import UnitSwitch


def replicate(denoiser, foreign, device):
    """A copy of `denoiser` on `device` holding no weights of the `foreign` units."""
    prefixes = tuple(f"{p}." for p in foreign)
    named = list(chain(denoiser.named_parameters(remove_duplicate=False),
                       denoiser.named_buffers(remove_duplicate=False)))
    needed = {id(t) for name, t in named if not name.startswith(prefixes)}
    memo = {}
    for _, t in named:
        if id(t) in memo:
            continue
        if id(t) not in needed:
            new = torch.empty_like(t, device="meta")
        elif t.device == device:
            new = t
        else:
            new = t.detach().to(device)
        if isinstance(t, torch.nn.Parameter) and new is not t:
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad and id(t) in needed)
        memo[id(t)] = new
    return copy.deepcopy(denoiser, memo)


def weight_bytes(module):
    """Bytes of the real (non-meta) parameters and buffers a module holds."""
    seen, total = set(), 0
    for t in chain(module.parameters(), module.buffers()):
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def call_parts(call):
    """(signature, latent name, timestep name, arguments) of a DenoiserCall."""
    return call.signature, call.latent_name, call.timestep_name, call.arguments


def call_layout(call):
    """A hashable description of everything but the latent's values and the timestep's
    value (shapes, dtypes, devices, non-tensor arguments); None if it cannot key a graph."""
    signature, latent_name, timestep_name, arguments = call_parts(call)
    others = {k: v for k, v in arguments.items() if k not in (latent_name, timestep_name)}
    leaves, spec = pytree.tree_flatten(others)
    timestep = call.timestep
    if not isinstance(timestep, torch.Tensor):
        return None
    described = [_spec(call.latent), _spec(timestep), spec]
    for leaf in leaves:
        described.append(_spec(leaf) if isinstance(leaf, torch.Tensor) else leaf)
    layout = tuple(described)
    try:
        hash(layout)
    except TypeError:
        return None
    return layout


def _spec(t):
    return ("tensor", tuple(t.shape), t.stride(), t.dtype, str(t.device))


def _identity(t):
    try:
        return (t.data_ptr(), t._version, tuple(t.shape))
    except RuntimeError:  # inference tensors have no version counter: copy every time
        return None


class Replica:
    """`module` (a replica, or the original for whole forwards) computing `compute`."""

    def __init__(self, module, unit_paths, compute, device):
        self.module, self.device = module, device
        self.compute = frozenset(compute)
        self.switch = UnitSwitch(module, unit_paths)
        self._layout = self._leaves = self._spec = self._seen = self._timestep = None

    def close(self):
        self.switch.remove()

    def load(self, call, layout, tau, table):
        """Refresh the static inputs on the current stream: the call's other arguments
        (copied when they changed since the last copy of this generation) and timestep
        `tau` from `table` (the generation's timesteps on this device). Returns whether
        it copied any of the caller's tensors: the caller must then keep them alive, or
        order its stream after these copies, until they have run."""
        signature, latent_name, timestep_name, arguments = call_parts(call)
        others = {k: v for k, v in arguments.items() if k not in (latent_name, timestep_name)}
        leaves, spec = pytree.tree_flatten(others)
        if layout is None or layout != self._layout:
            self._layout, self._spec = layout, spec
            self._leaves = [torch.empty_like(v, device=self.device) if isinstance(v, torch.Tensor) else v
                            for v in leaves]
            self._seen = [None] * len(leaves)
            ts = call.timestep
            self._timestep = torch.empty_like(ts, device=self.device) if isinstance(ts, torch.Tensor) else None
        copied = False
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                seen = _identity(leaf)
                if seen is None or seen != self._seen[i]:
                    self._leaves[i].copy_(leaf, non_blocking=True)
                    self._seen[i] = seen
                    copied = True
        if self._timestep is not None:
            self._timestep.copy_(table[tau], non_blocking=True)
            timestep = self._timestep
        else:
            timestep = type(call.timestep)(table[tau])
        bound = dict(arguments)
        bound.update(pytree.tree_unflatten(self._leaves, self._spec))
        bound[timestep_name] = timestep
        self._bound = (signature, latent_name, bound)
        return copied

    def forgot(self):
        """Start a new generation: copy every argument again at the next load."""
        if self._seen is not None:
            self._seen = [None] * len(self._seen)

    def static_inputs(self):
        return [t for t in self._leaves if isinstance(t, torch.Tensor)] + (
            [self._timestep] if self._timestep is not None else [])

    def forward(self, latent, cache, compute=None):
        """(output, {unit: output}) of a forward on the loaded inputs and `latent`, units
        outside `compute` (default: this replica's) returning `cache[unit]`."""
        signature, latent_name, bound = self._bound
        arguments = dict(bound)
        arguments[latent_name] = latent
        call = inspect.BoundArguments(signature, arguments)
        record = {}
        with self.switch.forward_with(self.compute if compute is None else compute, cache, record):
            out = self.module(*call.args, **call.kwargs)
        return out, record
