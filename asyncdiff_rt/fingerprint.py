"""A cheap fingerprint of everything about a denoiser that can change what it computes.

Executors copy parts of the denoiser (replicas hold their own modules, graphs hold
addresses), so a change made after `parallelize` (FreeU, attention processors, LoRA,
fused projections, `load_state_dict`, a dtype or device move, `train()`) would not
reach them. Comparing fingerprints at the start of every generation finds such a change:
module identities and types, plain attributes (values, or the identity and attributes of
objects such as attention processors), and every parameter and buffer's identity,
address, version counter, dtype, shape and device. Diffusers' hooks (step caches) count
by which hooks are installed, not by their state.

Walking the module tree into that tuple costs milliseconds (about 0.7 us an attribute,
16,000 of them in SD 1.5). `Watch` walks it once and then answers "unchanged?" with
flat comparisons that run in C: the attribute dicts' keys and values, the module tree's,
parameter and buffer dicts' keys and identities, the tensors' versions, addresses,
dtypes, shapes and devices, and, described again as the fingerprint describes them, only
the attributes whose description can change without their identity changing
(processors, non-empty hook dicts, lists, tensors held as plain attributes). Anything it
cannot tell apart is compared by the full fingerprint.
"""
from collections import OrderedDict
from itertools import chain
from operator import attrgetter, itemgetter

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
            if key not in _SKIP:
                described = _attribute(key, value)
                if described is not _GONE:
                    entries.append((path, key, described))
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


# The dicts every nn.Module holds (parameters, buffers, children, hooks): their contents
# are compared in bulk, the dicts found again through their module at every check.
_MODULE_DICTS = tuple(k for k, v in torch.nn.Module().__dict__.items() if type(v) in (dict, OrderedDict))
_TREE = ("_parameters", "_buffers", "_modules")
_versions = attrgetter("_version")
_layouts = attrgetter("dtype", "shape", "device")


class Watch:
    """A denoiser's fingerprint, and a cheap test of whether it still holds.

    `changed()` is None while the fingerprint is as recorded. The quick test is exact:
    where it sees any difference (or cannot tell), the full fingerprint decides. It holds
    the modules of the last walk, their attribute dicts and plain attribute values (a
    module removed from the tree stays alive until the next `record()`), and of tensors
    only identities and states."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.record()

    def record(self):
        """Take the denoiser as it is now as the reference."""
        self.fingerprint = fingerprint(self.denoiser)
        self._snapshot()

    def changed(self):
        """None if the denoiser is as recorded, else a short description of a change (the
        reference is kept: `record()` takes the new state)."""
        if self._quick is not None:
            try:
                if self._state() == self._quick:
                    return None
            except Exception:  # a comparison that cannot answer (tensors' ==, a module dict gone)
                pass
        now = fingerprint(self.denoiser)
        if now == self.fingerprint:
            self._snapshot()  # an equal state reached another way (a value set again): quick next time
            return None
        return first_change(self.fingerprint, now)

    def _snapshot(self):
        modules = [m for _, m in self.denoiser.named_modules(remove_duplicate=False)]
        self._modules, self._dicts = modules, [m.__dict__ for m in modules]
        self._quick = None
        plain, empty, tree, tensors, self._deep = [], [], [], [], []
        position = 0
        for d in self._dicts:
            for key, value in d.items():
                if key in _TREE:
                    (tensors if key != "_modules" else tree).append(position)
                elif key in _SKIP:
                    plain.append(position)  # not described: compared by value only, to stay quick
                elif key in _MODULE_DICTS and type(value) in (dict, OrderedDict) and not value:
                    empty.append(position)
                elif _stable(value):
                    plain.append(position)
                else:
                    self._deep.append((d, key))
                position += 1
        if len(plain) < 2 or len(empty) < 2 or len(tree) < 1 or len(tensors) < 2:
            return  # too small to be worth it (and itemgetter of one position returns no tuple)
        self._plain, self._empty = itemgetter(*plain), itemgetter(*empty)
        self._tree, self._tensors = itemgetter(*(tree + tensors)), itemgetter(*tensors)
        try:
            self._quick = self._state()
        except Exception:  # a module without torch's dicts, inference tensors: the full walk each time
            self._quick = None

    def _state(self):
        """What the quick test compares: the attribute dicts' keys, their plain values by
        value and type, that the empty hook dicts are empty, the keys and identities in the
        module tree's, parameters' and buffers' dicts, the tensors' state, and the other
        attributes described as the fingerprint describes them."""
        values = list(chain.from_iterable(map(dict.values, self._dicts)))
        plain, tree = self._plain(values), self._tree(values)
        tensors = [t for t in chain.from_iterable(map(dict.values, self._tensors(values))) if t is not None]
        return (list(map(type, self._modules)), list(chain.from_iterable(self._dicts)), plain,
                list(map(type, plain)), any(self._empty(values)), list(chain.from_iterable(tree)),
                list(map(id, chain.from_iterable(map(dict.values, tree)))),
                list(map(_versions, tensors)), list(map(torch.Tensor.data_ptr, tensors)),
                list(map(_layouts, tensors)), [_attribute(key, d.get(key, _GONE)) for d, key in self._deep])


def _stable(value):
    """Whether an attribute's description changes only with its value (what the quick
    test compares by value and type), never in place."""
    kind = type(value)
    if kind in _PLAIN_TYPES or kind in (set, frozenset):  # a set: by identity in the fingerprint
        return True
    return kind is tuple and all(type(v) in _PLAIN_TYPES for v in value)


def _attribute(key, value):
    """A module attribute's description, or _GONE where the fingerprint has no entry."""
    if value is _GONE:
        return _GONE
    if key == "_diffusers_hook":  # the pipelines' cache_context adds empty ones
        return _hooks(value) if value._hook_order else _GONE
    return _describe(value, depth=2)


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
