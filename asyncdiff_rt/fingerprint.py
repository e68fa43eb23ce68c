"""A cheap fingerprint of everything about a denoiser that can change what it computes.

Executors copy parts of the denoiser (replicas hold their own modules, graphs hold
addresses), so a change made after `parallelize` (FreeU, attention processors, LoRA,
fused projections, `load_state_dict`, a dtype or device move, `train()`) would not
reach them. Comparing fingerprints at the start of every generation finds such a change
in a few milliseconds: module identities and types, plain attributes (values, or the
identity and attributes of objects such as attention processors), and every parameter
and buffer's identity, address, version counter, dtype, shape and device. Diffusers'
hooks (step caches) count by which hooks are installed, not by their state.
"""
from collections import OrderedDict
from itertools import chain

import torch

# Attributes that are not state of the model: the module tree itself (walked), and what
# executors install while they drive the denoiser.
_SKIP = {"_parameters", "_buffers", "_modules", "forward", "_asyncdiff_switch"}
_GONE = object()
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_PLAIN_TYPES = frozenset(_PLAIN)
_EMPTY_TYPES = frozenset((dict, list, tuple, OrderedDict))


def fingerprint(denoiser):
    """A tuple of (module path, what, description) entries; equal tuples, same model."""
    entries = []
    for path, module in denoiser.named_modules(remove_duplicate=False):
        entries.append((path, "module", (type(module).__qualname__, id(module))))
        for key, value in module.__dict__.items():
            if key == "_diffusers_hook":  # the pipelines' cache_context adds empty ones
                if value._hook_order:
                    entries.append((path, key, _hooks(value)))
            elif key not in _SKIP:
                entries.append((path, key, _describe(value, depth=2)))
        for name, tensor in chain(module._parameters.items(), module._buffers.items()):
            entries.append((path, name, _tensor(tensor)))
    return tuple(entries)


def first_change(before, after):
    """A short description of one entry that differs, for messages."""
    old = {(path, what): value for path, what, value in before}
    new = {(path, what): value for path, what, value in after}
    for key in new.keys() | old.keys():
        if old.get(key, _GONE) != new.get(key, _GONE):
            path, what = key
            how = "was added" if key not in old else "was removed" if key not in new else "changed"
            return f"{path or 'the denoiser'}: {what!r} {how}"
    return "nothing"


def _hooks(registry):
    """A diffusers HookRegistry by the hooks it holds, in order: their state (step caches'
    residuals, lazily built lists) changes at every call and is no change of the model."""
    return tuple((name, id(registry.hooks[name])) for name in registry._hook_order)


def _tensor(t):
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    return (id(t), t.data_ptr(), version, t.dtype, t.shape, t.device)


def _describe(value, depth):
    kind = type(value)  # the common cases first: this runs for every attribute of every module
    if kind in _PLAIN_TYPES:
        return value
    if kind in _EMPTY_TYPES and not value:
        return ()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, torch.nn.Module):
        return ("module", id(value))  # its own state is walked as part of the tree
    if depth == 0:
        return ("object", type(value).__qualname__, id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return tuple((k, _describe(v, depth - 1)) for k, v in value.items())
    state = getattr(value, "__dict__", None)
    inner = tuple((k, _describe(v, depth - 1)) for k, v in state.items()) if isinstance(state, dict) else ()
    return ("object", type(value).__qualname__, id(value), inner)
