"""How a component's forward is built, the same in every executor: the owned units'
modules on the device -> kernel routing -> `torch.compile` of each owned unit -> (on a
GPU) a CUDA graph of the forward (graphs.py).

`resolve_stages` turns the settings into what will run, before any device work: "auto"
picks by measurement, and a stage that cannot run on the devices (no Triton, no
compiler) is dropped with one logged reason. `apply_stages` installs them on a module
as instance `forward`s (as kernels.apply and UnitSwitch do: weights, state_dict and
module paths stay as they were) and `remove()` takes them off again. A user reproduces
what the runtime computes with the same call on a plain denoiser:
`apply_stages(unet, handle.plan.graph.paths, handle.plan.graph.paths, stages)`.
"""
import logging
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

# Modes that capture CUDA graphs of their own would nest them in ours (graphs.py).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
LAYOUTS_KEPT = 3  # input layouts an executor keeps (local.MAX_LAYOUTS): a unit's graphs at once


class Stages(NamedTuple):
    """What runs: the Triton kernels routed or not; `compile`: a torch.compile mode, or None."""

    kernels: bool = False
    compile: str = None


EAGER = Stages()


def resolve_stages(kernels, compile, executor, device_type, graphs):
    """The stages that will run for checked settings (settings.check_stages) on devices of
    `device_type` ("cuda" or "cpu"). kernels="auto" routes them where forwards replay
    CUDA graphs: SD 1.5 on an H100, graph + kernels 1.084x over graph, eager + kernels
    0.958x over eager (profiling/results/gpu_check_nvidia_h100/kernels_*.md); compile has
    no "auto" (off unless asked: measured slower on the CPU, README)."""
    mode = "default" if compile is True else (compile or None)
    if kernels == "auto":
        kernels = bool(executor in ("local", "distributed") and graphs and device_type == "cuda" and mode is None)
        explicit = False
    else:
        explicit = kernels
    if kernels:
        from ..kernels import unavailable_reason

        why = unavailable_reason(torch.device(device_type))
        if why is not None:
            (log.warning if explicit else log.info)("kernels: %s; GroupNorms run in torch", why)
            kernels = False
    if mode is not None:
        why = compile_unavailable_reason(device_type)
        if why is not None:
            log.warning("compile: %s; units run eagerly", why)
            mode = None
    return Stages(kernels, mode)


def compile_unavailable_reason(device_type):
    """Why torch.compile cannot build code for `device_type` here (None: it can)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python or platform"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs Triton for CUDA code and it is missing (pip install triton)"
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or a broken toolchain
        return f"inductor finds no C++ compiler for CPU code ({type(e).__name__}: install g++ or set CXX)"
    return None


class AppliedStages:
    """Stages installed on one module; `remove()` restores its forwards."""

    def __init__(self, module, units, compute, stages):
        """`units`: every unit path of the plan (kernels fuse nothing across them);
        `compute`: the units this module computes (the ones compiled)."""
        self._routing, self._compiled = None, []
        if stages.kernels:
            from ..kernels import apply

            self._routing = apply(module, units=units)
        if stages.compile is not None:
            # Each unit compiles once per input layout (dynamic=False: the same code for the
            # same shapes in every replica and in the plain denoiser, so results agree bit
            # for bit); units of one class share dynamo's cache and its recompile limit.
            import torch._dynamo

            limit = max(torch._dynamo.config.recompile_limit, len(units) * LAYOUTS_KEPT)
            for path in compute:
                unit = module.get_submodule(path)
                self._compiled.append((unit, unit.__dict__.get("forward")))
                unit.forward = _compiled(unit.forward, stages.compile, limit)

    def summary(self):
        """What is installed: GroupNorm sites routed through the kernels, units compiled."""
        routed = self._routing.routed if self._routing is not None else ()
        return {"kernel_sites": sum("GroupNorm" in r for r in routed), "compiled_units": len(self._compiled)}

    def remove(self):
        for unit, previous in reversed(self._compiled):
            if previous is None:
                unit.__dict__.pop("forward", None)
            else:
                unit.forward = previous
        self._compiled = []
        if self._routing is not None:
            self._routing.remove()
            self._routing = None


def apply_stages(module, units, compute, stages):
    """Install `stages` on `module` (see AppliedStages)."""
    return AppliedStages(module, units, compute, stages)


def _compiled(forward, mode, limit):
    compiled = torch.compile(forward, mode=mode, dynamic=False)

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args, **kwargs)

    return run
