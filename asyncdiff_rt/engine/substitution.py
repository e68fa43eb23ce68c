"""Cache substitution: make chosen units return a cached output instead of running.

Each unit's `forward` is wrapped once. Outside `UnitSwitch.forward_with(...)` the
wrapper calls the original, so the denoiser behaves exactly as before; `remove()`
restores the original attributes.
"""

_MISSING = object()


class CacheMiss(RuntimeError):
    pass


class _Forward:
    """The context of `UnitSwitch.forward_with` (a plain one: opened at every forward)."""

    __slots__ = ("active", "state")

    def __init__(self, active, state):
        self.active, self.state = active, state

    def __enter__(self):
        if self.active[0] is not None:
            raise RuntimeError("nested forwards of one parallelized denoiser are not supported")
        self.active[0] = self.state

    def __exit__(self, *exc):
        self.active[0] = None
        return False


class UnitSwitch:
    def __init__(self, denoiser, unit_paths):
        if getattr(denoiser, "_asyncdiff_switch", None) is not None:
            raise RuntimeError("this denoiser is already driven by an executor; remove that one first")
        denoiser._asyncdiff_switch = self
        self._denoiser = denoiser
        self._modules = {p: denoiser.get_submodule(p) for p in unit_paths}
        self._saved, self._wrappers = {}, {}
        # [(compute set, cache mapping, record dict, delegate)] during a forward, else [None]:
        # a list the wrappers hold, read without an attribute look-up (45 units a forward)
        self._active = [None]
        for path, module in self._modules.items():
            self._saved[path] = module.__dict__.get("forward", _MISSING)
            module.forward = self._wrappers[path] = self._wrap(path, module.forward)

    def _wrap(self, path, original):
        active = self._active

        def forward(*args, **kwargs):
            state = active[0]
            if state is None:
                return original(*args, **kwargs)
            compute, cache, record, delegate = state
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

    def forward_with(self, compute, cache, record, delegate=None):
        """Inside: units in `compute` run and their outputs go into `record`; the rest
        return `cache[path]`, or `delegate(path, args, kwargs)` when it is given (a unit
        computed elsewhere)."""
        return _Forward(self._active, (compute if type(compute) is frozenset else frozenset(compute), cache, record,
                                       delegate))

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
