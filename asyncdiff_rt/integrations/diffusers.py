"""`parallelize(pipe, ...)`: swap a diffusers pipeline's UNet for an AsyncDenoiser."""
import torch

from ..async_denoiser import AsyncDenoiser
from ..engine import make_executor, resolve_executor
from ..engine.devices import count_devices
from ..plan import make_plan
from ..schedule import validate_settings
from ..trace import unet_inputs


class AsyncDiffHandle:
    """What `parallelize` returns: the plan, live statistics, and `remove()`."""

    def __init__(self, pipe, original, wrapper):
        self._pipe, self._original, self._wrapper = pipe, original, wrapper

    @property
    def plan(self):
        return self._wrapper.plan

    @property
    def denoiser(self):
        return self._wrapper

    def stats(self):
        return {"executor": self._wrapper.executor.name, **self._wrapper.executor.stats.as_dict()}

    def remove(self):
        """Put the original UNet back; the pipeline is then exactly as before."""
        if self._wrapper is None:
            return
        self._pipe.__dict__["unet"] = self._original
        self._wrapper.executor.close()
        self._wrapper = None


def parallelize(pipe, n_components=2, stride=1, warmup=1, time_shift=False, partition="auto",
                stride_reuse="component", devices=None, executor="auto", graphs=True):
    """Run `pipe`'s denoiser with asynchronous denoising (AsyncDiff).

    Works on any diffusers pipeline whose denoiser is `pipe.unet` and whose scheduler is
    `pipe.scheduler` (StableDiffusion, StableDiffusionXL, their img2img and inpainting
    variants, ...). Everything is checked before any work; the warm-up is checked
    against the step count at the first call. `devices`: one per device of the plan, e.g.
    ["cuda:0", "cuda:1"], "cuda:0*2" (virtual devices on one GPU) or "cpu*2"; `executor`
    "auto" runs `local` on GPU device lists and `reference` otherwise. `graphs=False`
    makes the local executor run every forward eagerly (for debugging and profiling
    single kernels); the reference executor always does.
    """
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, AsyncDenoiser):
        raise ValueError("this pipeline is already parallelized; call handle.remove() first")
    if not isinstance(unet, torch.nn.Module) or not hasattr(getattr(pipe, "scheduler", None), "timesteps"):
        raise TypeError(
            f"parallelize expects a diffusers pipeline with a `unet` module and a `scheduler` "
            f"(e.g. StableDiffusionPipeline), got {type(pipe).__name__}"
        )
    validate_settings(None, warmup, stride, n_components, stride_reuse, time_shift)
    n_devices = n_components + stride - 1
    listed = count_devices(devices) if devices is not None else None  # ValueError on a malformed entry
    if listed is not None and listed != n_devices:
        raise ValueError(
            f"devices {devices!r} names {listed} devices, but n_components={n_components} with stride={stride} "
            f"uses n_components + stride - 1 = {n_devices}; list {n_devices} devices (e.g. "
            f"'cuda:0*{n_devices}' for virtual devices on one GPU) or pass devices=None"
        )
    executor = resolve_executor(executor, devices)  # refuses unknown names before any tracing
    plan = make_plan(unet, unet_inputs(unet), n_components, stride, warmup, time_shift, partition, stride_reuse)
    runner = make_executor(executor, unet, plan, devices, **({"graphs": graphs} if executor == "local" else {}))
    wrapper = AsyncDenoiser(unet, plan, runner, lambda: pipe.scheduler)
    # Bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline's config.
    pipe.__dict__["unet"] = wrapper
    return AsyncDiffHandle(pipe, unet, wrapper)
