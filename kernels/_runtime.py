"""Where Triton can run, and kernels that are compiled for the mode in force.

Triton decides between compiling and interpreting when `triton.jit` decorates a
function, including its own `tl.sum`, `tl.zeros`, ... at `import triton`. We
decorate our kernels lazily, per mode, and in the interpreter swap in
interpreted versions of those library functions for the launch, so that setting
`TRITON_INTERPRET=1` after triton was imported (as the CPU tests do) still works.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("asyncdiff_rt.kernels")

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton is not installed ({exc}); `pip install triton` to use the fused kernels"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernels cannot run on `device` (None: they can).

    With no device given, asks whether they can run anywhere in this process.
    """
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if interpreting():
        return None  # the interpreter copies any tensor to the host and back
    if device is None:
        if torch.cuda.is_available():
            return None
        return "no CUDA device and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to interpret on the CPU; slow)"
    if torch.device(device).type != "cuda":
        return (
            f"tensor is on {torch.device(device).type}: Triton kernels run on CUDA tensors "
            "(or anywhere with TRITON_INTERPRET=1, slowly)"
        )
    return None


class LazyKernel:
    """`kernel[grid](...)` that jit-compiles `fn` for the current mode on first use."""

    def __init__(self, fn):
        self.fn = fn
        self._by_mode: dict[bool, object] = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        mode = interpreting()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            if triton is None:
                raise RuntimeError(_IMPORT_ERROR)
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        if mode and _compiled_stdlib():
            return functools.partial(_launch_with_interpreted_stdlib, kernel[grid])
        return kernel[grid]


@functools.cache
def _compiled_stdlib() -> dict:
    """Interpreted twins of the `triton.language` functions that were jit-compiled at import."""
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
    from triton.runtime.jit import JITFunction

    class Twin(InterpretedFunction):
        # As InterpretedFunction.__call__, but undoing its language patches afterwards, so
        # that a later real compile in the same process (the compile tests) sees plain Triton.
        def __call__(self, *args, **kwargs):
            scope = _patch_lang(self.fn)
            try:
                return self.rewrite()(*args, **kwargs)
            finally:
                scope.restore()

    return {name: Twin(obj.fn) for name, obj in vars(tl).items() if isinstance(obj, JITFunction)}


def _launch_with_interpreted_stdlib(launch, *args, **kwargs):
    twins = _compiled_stdlib()
    saved = {name: getattr(tl, name) for name in twins}
    try:
        for name, fn in twins.items():
            setattr(tl, name, fn)
        return launch(*args, **kwargs)
    finally:
        for name, fn in saved.items():
            setattr(tl, name, fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_device_or_raise(t: torch.Tensor, what: str) -> None:
    reason = unavailable_reason(t.device)
    if reason is not None:
        raise RuntimeError(f"{what}: {reason}")
