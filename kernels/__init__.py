"""Triton kernels for the denoiser and the sampler loop (imported as `asyncdiff_rt.kernels`).

* `apply(denoiser, units=None)` / `remove(denoiser)`: GroupNorm(+SiLU) of diffusers UNets
  through one fused kernel (`group_norm.py`), reversibly, weights untouched; `units`: the
  runtime's (no SiLU fused across them). `parallelize(kernels=...)` applies it per device.
* `install_fused_step(scheduler)` / `fused_guided_step(...)`: guidance plus the DDIM,
  Euler or DPM-Solver++ 2M update in one launch (`scheduler_step.py`, `guided_step.py`).
* `group_norm(x, groups, weight, bias, eps, silu=False)`: the kernel as a function.

Where Triton cannot run (not installed; no GPU and `TRITON_INTERPRET` unset) `apply`
and the fused step change nothing and log why; `unavailable_reason()` says why.
"""
from ._runtime import interpreting, unavailable_reason
from .guided_step import FusedStepHandle, fused_guided_step, install_fused_step, uninstall_fused_step
from .routing import KernelRouting, apply, remove, routed_module


try:  # eager, so the function (not the submodule of the same name) is what the package exports
    from .group_norm import group_norm
except ImportError as _exc:  # triton missing: the kernels cannot run, apply() says so
    _why = str(_exc)

    def group_norm(*args, **kwargs):
        raise RuntimeError(f"asyncdiff_rt.kernels.group_norm needs triton: {_why}")


__all__ = [
    "apply", "remove", "routed_module", "KernelRouting", "group_norm",
    "fused_guided_step", "install_fused_step", "uninstall_fused_step", "FusedStepHandle",
    "interpreting", "unavailable_reason",
]
