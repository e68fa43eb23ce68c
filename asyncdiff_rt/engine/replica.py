"""A replica: one device's copy of the denoiser and the static inputs its forwards read.

The copy keeps real weights only for the shared modules, the units the device computes
and the parts of other units that code outside them reads; every other weight becomes a
meta tensor (those units never run there: their substitutes return cached outputs).
Weights already on the device are shared with the original, not copied. The call's
tensor arguments the device is sent are copied at every call (a device copy costs
microseconds; judging freshness by address or version lets stale data in, since
allocators reuse addresses) into static tensors owned per input layout, so a captured
graph reads them at fixed addresses.
"""
import copy
from itertools import chain

import torch
import torch.utils._pytree as pytree

from .stages import EAGER, apply_stages
from .substitution import UnitSwitch


def replicate(denoiser, foreign, device, keep=()):
    """A copy of `denoiser` on `device` holding no weights of the `foreign` units, except
    those of the modules in `keep` (parts of units that code outside them reads)."""
    prefixes = tuple(f"{p}." for p in foreign)
    kept = tuple(f"{p}." for p in keep)
    named = list(chain(denoiser.named_parameters(remove_duplicate=False),
                       denoiser.named_buffers(remove_duplicate=False)))
    needed = {id(t) for name, t in named if not name.startswith(prefixes) or name.startswith(kept)}
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


def call_layout(call):
    """A hashable description of everything but the latent's values and the timestep's
    value (shapes, dtypes, devices, non-tensor arguments); None if it cannot key a graph."""
    leaves, _, structure = call.flat_others()
    timestep = call.timestep
    if not isinstance(timestep, torch.Tensor):
        return None
    described = [_spec(call.latent), _spec(timestep), structure]
    for leaf in leaves:
        described.append(_spec(leaf) if isinstance(leaf, torch.Tensor) else leaf)
    layout = tuple(described)
    try:
        hash(layout)
    except TypeError:
        return None
    return layout


def _flat_spec(others):
    """The TreeSpec of `others` with every value a leaf (pytree.tree_flatten's)."""
    return pytree.tree_flatten(dict.fromkeys(others))[1]


def _spec(t):
    return ("tensor", tuple(t.shape), t.stride(), t.dtype, str(t.device))


class _StaticInputs:
    """One input layout's static copies of a call's arguments: the addresses the graphs
    captured for that layout read, alive exactly as long as those graphs. Arguments the
    device is not sent stay zeros (only glue whose result no unit of it reads sees them)."""

    def __init__(self, call, device):
        leaves, self.spec, _ = call.flat_others()
        self.labels = [label for label, _ in call.labelled_others()]
        self.leaves = [torch.zeros_like(v, device=device) if isinstance(v, torch.Tensor) else v for v in leaves]
        timestep = call.timestep
        self.timestep = torch.empty_like(timestep, device=device) if isinstance(timestep, torch.Tensor) else None
        # The arguments as the forward takes them: built once where they are a flat dict of
        # leaves (each forward copies the dict); nested ones are built at every forward, so
        # that a forward that changes a container in place cannot reach the next.
        flat = self.spec == _flat_spec(call.others())
        self.others = dict(zip(call.others(), self.leaves)) if flat else None

    def arguments(self):
        return self.others if self.others is not None else pytree.tree_unflatten(self.leaves, self.spec)

    def tensors(self):
        return [t for t in self.leaves if isinstance(t, torch.Tensor)] + (
            [self.timestep] if self.timestep is not None else [])


class Replica:
    """`module` (one device's copy of the denoiser) computing the units `compute`."""

    def __init__(self, module, unit_paths, compute, device, skipped=frozenset(), stages=EAGER):
        """`skipped`: labels of call arguments this device is not sent (arguments.py);
        `stages`: kernels and compile (stages.py), installed under the unit switch."""
        self.module, self.device = module, device
        self.compute, self.skipped = frozenset(compute), frozenset(skipped)
        self.stages = apply_stages(module, unit_paths, [p for p in unit_paths if p in self.compute], stages)
        self.switch = UnitSwitch(module, unit_paths)
        self._statics = {}  # input layout -> _StaticInputs
        self._loaded = None

    def close(self):
        self.switch.remove()
        self.stages.remove()
        self._statics.clear()

    def drop(self, layout):
        """Free the static inputs of `layout` (its graphs are gone)."""
        self._statics.pop(layout, None)

    def load(self, call, layout, tau, table, everything=False):
        """Copy, on the current stream, the call's other arguments this device is sent (all
        of them with `everything`) and timestep `tau` from `table` (the generation's
        timesteps on this device) into the static inputs of `layout` (None: fresh ones, no
        graph reads them). Returns the bytes it copied from the caller's tensors: the
        caller must then order its stream after these copies."""
        latent_name, timestep_name, arguments = call.latent_name, call.timestep_name, call.arguments
        static = self._statics.get(layout) if layout is not None else None
        if static is None:
            static = _StaticInputs(call, self.device)
            if layout is not None:
                self._statics[layout] = static
        copied = 0
        skipped = () if everything else self.skipped
        for target, leaf, label in zip(static.leaves, call.flat_others()[0], static.labels):
            if isinstance(leaf, torch.Tensor) and label not in skipped:
                target.copy_(leaf, non_blocking=True)
                copied += leaf.nbytes
        if static.timestep is not None:
            static.timestep.copy_(table[tau], non_blocking=True)
            timestep = static.timestep
        else:
            timestep = type(call.timestep)(table[tau])
        bound = dict(arguments)
        bound.update(static.arguments())
        bound[timestep_name] = timestep
        self._bound = (call.binder, latent_name, bound)
        self._loaded = static
        return copied

    def static_inputs(self):
        """The tensors the last `load` filled (what a graph of its layout reads)."""
        return self._loaded.tensors()

    def forward(self, latent, cache, compute=None, delegate=None, record=None):
        """(output, {unit: output}) of a forward on the loaded inputs and `latent`, units
        outside `compute` (default: this replica's) returning `cache[unit]`, or
        `delegate(path, args, kwargs)` when given. `record`: the dict the computed units'
        outputs go into, each as soon as it is made (default: a new one)."""
        binder, latent_name, bound = self._bound
        arguments = dict(bound)
        arguments[latent_name] = latent
        args, kwargs = binder.split(arguments)
        record = {} if record is None else record
        with self.switch.forward_with(self.compute if compute is None else compute, cache, record, delegate):
            out = self.module(*args, **kwargs)
        return out, record
