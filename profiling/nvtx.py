"""NVTX ranges named like the program ("step 12/dev 2/forward (replay)"), so an Nsight
Systems timeline reads as the program:

    nsys profile -t cuda,nvtx --cuda-graph-trace=node python my_pipeline.py

On by default: with no profiler attached a range costs 0.07 us through the `nvtx`
package's domain API (0.26 us through its plain `push_range`), measured on the 2-core CPU
machine; `ASYNCDIFF_RT_NVTX=0` turns them off. The `nvtx` package is used when installed,
else `torch.cuda.nvtx` on CUDA builds, else nothing. Every name's attributes are built
once and kept for the life of the process: a name made during CUDA-graph capture and then
collected crashes Nsight.
"""
import os
from contextlib import nullcontext

ENV = "ASYNCDIFF_RT_NVTX"


class _Nvtx:
    """The `nvtx` package, through one domain with interned attributes."""

    def __init__(self, module):
        self._domain = module.get_domain("asyncdiff_rt")
        self._attributes = {}

    def _attribute(self, name):
        if name not in self._attributes:
            self._attributes[name] = self._domain.get_event_attributes(message=name)
        return self._attributes[name]

    def push(self, name):
        self._domain.push_range(self._attribute(name))

    def pop(self):
        self._domain.pop_range()

    def start(self, name):
        return self._domain.start_range(self._attribute(name))

    def end(self, handle):
        self._domain.end_range(handle)


class _TorchNvtx:
    """`torch.cuda.nvtx` (CUDA builds only); names are kept alive here."""

    def __init__(self, nvtx):
        self._nvtx, self._names = nvtx, {}

    def _keep(self, name):
        return self._names.setdefault(name, name)

    def push(self, name):
        self._nvtx.range_push(self._keep(name))

    def pop(self):
        self._nvtx.range_pop()

    def start(self, name):
        return self._nvtx.range_start(self._keep(name))

    def end(self, handle):
        self._nvtx.range_end(handle)


def _backend():
    try:
        import nvtx

        return _Nvtx(nvtx)
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        return _TorchNvtx(torch.cuda.nvtx)
    return None


class Ranges:
    """The switch and the backend; `RANGES` is the one every module uses."""

    def __init__(self, backend=None, enabled=None):
        self.backend = backend if backend is not None else _backend()
        self.enabled = (os.environ.get(ENV, "1") != "0") if enabled is None else enabled

    @property
    def active(self):
        return self.enabled and self.backend is not None

    def range(self, name):
        """A nested range around the block (push/pop on this thread). A plain context
        manager, not a generator: executors open several per step."""
        return _Range(self.backend, name) if self.active else _NO_RANGE

    def start(self, name):
        """A range that may end on another call (a generation): a handle for `end`."""
        return self.backend.start(name) if self.active else None

    def end(self, handle):
        if handle is not None and self.backend is not None:
            self.backend.end(handle)


class _Range:
    __slots__ = ("backend", "name")

    def __init__(self, backend, name):
        self.backend, self.name = backend, name

    def __enter__(self):
        self.backend.push(self.name)

    def __exit__(self, *exc):
        self.backend.pop()
        return False


_NO_RANGE = nullcontext()

RANGES = Ranges()
