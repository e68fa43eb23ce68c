"""A denoiser's structure: everything its trace can depend on, and nothing it cannot.

A trace (trace.py) runs on fake or meta tensors, so what it finds (units, what each
reads, output shapes, FLOPs, weight bytes) depends on the module tree, the modules'
attributes and hooks, and the tensors' dtypes, shapes and devices, never on weight
values or on which Python objects hold them. Two denoisers with equal structures
therefore trace alike: a second pipeline of the same model, or the same denoiser after
a weight load, reuses the first one's trace (plan.py). Identities are replaced by the
order in which they are first met, so sharing (tied weights, one processor object in
several layers, a module under two paths) is still part of the structure.
"""
import functools
import types
from collections import OrderedDict

import torch

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_WALKED = {"_parameters", "_buffers", "_modules"}
# nn.Module's own dicts besides the tree (hooks and their flags): keyed by a process-wide
# handle counter, so only their values describe them.
_HOOK_DICTS = {k for k, v in torch.nn.Module().__dict__.items() if isinstance(v, dict)} - _WALKED
_DEPTH = 3  # nested objects deeper than this are described by their type and identity


def structure(denoiser):
    """A hashable description of `denoiser`; equal for denoisers that trace alike."""
    order = {}

    def ref(obj):
        return order.setdefault(id(obj), len(order))

    entries = []
    for path, module in denoiser.named_modules(remove_duplicate=False):
        entries.append((path, _qualname(module), ref(module)))
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers"):
                entries.extend((path, name, _describe(t, ref, 0)) for name, t in value.items())
            elif key in _HOOK_DICTS:
                entries.append((path, key, tuple(_describe(v, ref, _DEPTH) for v in value.values())))
            elif key != "_modules":
                entries.append((path, key, _describe(value, ref, _DEPTH)))
    return tuple(entries)


def _qualname(obj):
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _describe(value, ref, depth):
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", ref(value), value.dtype, tuple(value.shape), value.device, value.requires_grad)
    if isinstance(value, torch.nn.Module):
        return ("module", ref(value))  # its own entries come from the tree walk
    if isinstance(value, types.FunctionType):  # a hook made by a factory differs by what it closed over
        cells = tuple(_describe(c.cell_contents, ref, depth - 1) for c in value.__closure__ or ())
        return ("function", value.__module__, value.__qualname__, cells)
    if isinstance(value, types.BuiltinFunctionType):
        owner = value.__self__
        bound = None if owner is None or isinstance(owner, types.ModuleType) else _describe(owner, ref, depth - 1)
        return ("builtin", value.__qualname__, bound)
    if isinstance(value, types.MethodType):
        return ("method", _describe(value.__func__, ref, depth - 1), _describe(value.__self__, ref, depth - 1))
    if isinstance(value, (types.MethodWrapperType, types.WrapperDescriptorType)):  # e.g. a function's __call__
        return ("wrapper", value.__name__, _describe(getattr(value, "__self__", None), ref, depth - 1))
    if isinstance(value, functools.partial):
        return ("partial", *(_describe(v, ref, depth - 1) for v in (value.func, value.args, value.keywords)))
    if depth <= 0:
        return ("object", _qualname(value), ref(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_describe(v, ref, depth - 1) for v in items))
    if isinstance(value, (dict, OrderedDict)):
        return ("dict", tuple((_describe(k, ref, 0), _describe(v, ref, depth - 1)) for k, v in value.items()))
    state = getattr(value, "__dict__", None)
    inner = tuple((k, _describe(v, ref, depth - 1)) for k, v in state.items()) if isinstance(state, dict) else ()
    return ("object", _qualname(value), ref(value), inner)
