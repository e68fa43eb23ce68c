"""Cache substitution: make chosen units return a cached output instead of running.

Each unit's `forward` is wrapped once. Outside `UnitSwitch.forward_with(...)` the
wrapper calls the original, so the denoiser behaves exactly as before; `remove()`
restores the original attributes.
"""
from contextlib import contextmanager

_MISSING = object()


class CacheMiss(RuntimeError):
    pass


class UnitSwitch:
    def __init__(self, denoiser, unit_paths):
        if getattr(denoiser, "_asyncdiff_switch", None) is not None:
            raise RuntimeError("this denoiser is already driven by an executor; remove that one first")
        denoiser._asyncdiff_switch = self
        self._denoiser = denoiser
        self._modules = {p: denoiser.get_submodule(p) for p in unit_paths}
        self._saved, self._wrappers = {}, {}
        self._active = None  # (compute set, cache mapping, record dict) during a forward
        for path, module in self._modules.items():
            self._saved[path] = module.__dict__.get("forward", _MISSING)
            module.forward = self._wrappers[path] = self._wrap(path, module.forward)

    def _wrap(self, path, original):
        def forward(*args, **kwargs):
            if self._active is None:
                return original(*args, **kwargs)
            compute, cache, record, delegate = self._active
            if path in compute:
                out = original(*args, **kwargs)
                record[path] = out
                return out
            if delegate is not None:
                return delegate(path, args, kwargs)
            try:
                return cache[path]
            except KeyError:
                raise CacheMiss(f"unit {path!r} has no cached output on this device: the program sent it none") from None

        return forward

    @contextmanager
    def forward_with(self, compute, cache, record, delegate=None):
        """Inside: units in `compute` run and their outputs go into `record`; the rest
        return `cache[path]`, or `delegate(path, args, kwargs)` when it is given (a unit
        computed elsewhere)."""
        if self._active is not None:
            raise RuntimeError("nested forwards of one parallelized denoiser are not supported")
        self._active = (frozenset(compute), cache, record, delegate)
        try:
            yield
        finally:
            self._active = None

    def remove(self):
        for path, module in self._modules.items():
            saved = self._saved[path]
            if module.__dict__.get("forward") is not self._wrappers[path]:
                continue  # wrapped since (a diffusers hook enabled after): ours stays in its chain, passing through
            if saved is _MISSING:
                del module.forward
            else:
                module.forward = saved
        self._modules, self._saved, self._wrappers = {}, {}, {}
        self._denoiser._asyncdiff_switch = None
