"""`parallelize(pipe, ...)`: swap a diffusers pipeline's denoiser (`pipe.unet` or
`pipe.transformer`) for an AsyncDenoiser."""
import logging
from contextlib import contextmanager

import torch

from ..async_denoiser import AsyncDenoiser
from ..engine import make_executor
from ..plan import make_plan
from ..engine.process_group import averaged_over, device_type, group_rank, join_group, rank_device
from ..engine.transports import check_transport
from ..settings import check_distributed, check_settings
from ..step_cache import check_step_cache
from ..example_inputs import example_inputs
from ..trace import TraceError

log = logging.getLogger(__name__)


class AsyncDiffHandle:
    """What `parallelize` returns: the plan, live statistics, and `remove()`. The plan
    and statistics stay readable after `remove()` (the last ones)."""

    def __init__(self, pipe, attribute, original, wrapper):
        self._pipe, self._attribute, self._original, self._wrapper = pipe, attribute, original, wrapper

    @property
    def plan(self):
        """The plan; None until the first call for a UNet whose inputs only the pipeline knows."""
        return self._wrapper.plan

    @property
    def denoiser(self):
        return self._wrapper

    @property
    def original(self):
        """The denoiser `parallelize` was given (unchanged: the wrapper only reads it)."""
        return self._original

    def stats(self):
        executor = self._wrapper.executor
        if executor is None:  # planned at the first call
            return {"executor": None, "generations": 0, "rebuilds": self._wrapper.rebuilds}
        out = {"executor": executor.name, **executor.stats.as_dict(), "rebuilds": self._wrapper.rebuilds}
        if hasattr(executor, "weights_per_device"):
            out["weight_bytes_per_device"] = executor.weights_per_device()
        if hasattr(executor, "describe"):
            out.update(executor.describe())
        return out

    def set_step_cache(self, step_cache):
        """The runtime's step cache (a StepCache, a list of steps, or None) from the next
        generation on; refused while a generation runs."""
        plan = self._wrapper.plan
        self._wrapper.set_step_cache(check_step_cache(step_cache, plan.warmup if plan is not None else 1))

    def reset(self):
        """Abandon a generation that was interrupted (the next call starts a new one)."""
        self._wrapper.reset()

    @contextmanager
    def profile(self, folder=None, stem="timeline"):
        """Record what the local executor queues while inside (forwards per lane, sends per
        copy stream, host time per step); at exit the timeline is resolved and, with
        `folder`, written there as a Chrome trace, a Gantt PNG and a summary. Yields the
        `Timeline` (its `summary()` after exit)."""
        from ..profiling.timeline import Timeline

        timeline = Timeline()
        self._wrapper.record(timeline)
        try:
            yield timeline
        finally:
            self._wrapper.record(None)
            timeline.resolve()
            if folder is not None:
                timeline.write(folder, stem)

    def remove(self):
        """Put the original UNet back; the pipeline is then exactly as before. Pipelines
        made from it meanwhile (from_pipe) still hold the wrapper, which now calls the
        original UNet plainly. A UNet assigned to `pipe.unet` since is left in place."""
        wrapper = self._wrapper
        if wrapper.removed:
            return
        wrapper.removed = True
        wrapper.close()
        self._pipe.__dict__.pop("save_pretrained", None)
        now = self._pipe.__dict__.get(self._attribute)
        if now is not wrapper:
            raise RuntimeError(
                f"pipe.{self._attribute} was replaced after parallelize (it is now a {type(now).__name__}); "
                "remove() left it in place and released the parallelized denoiser (handle.original)")
        self._pipe.__dict__[self._attribute] = self._original


def parallelize(pipe, n_components=2, stride=1, warmup=1, time_shift=False, partition="auto",
                stride_reuse="component", devices=None, executor="auto", graphs=True, process_group=None,
                timeout=30.0, transport=None, step_cache=None):
    """Run `pipe`'s denoiser with asynchronous denoising (AsyncDiff).

    Works on diffusers pipelines whose denoiser is `pipe.unet` or `pipe.transformer` and
    whose scheduler is `pipe.scheduler` (Stable Diffusion 1.x/2.x/XL and their variants,
    ControlNet, SVD, AnimateDiff, the x4 upscaler, SD3, FLUX, PixArt, DiT; see the README).
    Everything is checked before any work; the warm-up is checked against the step count
    at the first call. `devices`: one per device of the plan, e.g.
    ["cuda:0", "cuda:1"], "cuda:0*2" (virtual devices on one GPU) or "cpu*2"; `executor`
    "auto" runs `local` on GPU device lists and `reference` otherwise. `graphs=False`
    makes the local executor run every forward eagerly (for debugging and profiling
    single kernels); the reference executor always does.

    `executor="distributed"` runs one process per device (README, "Several processes"):
    call parallelize on every rank with the same arguments; under torchrun it joins or
    creates the default group, or it runs on the ranks of `process_group`. `timeout`:
    seconds a rank waits for another before raising a message that names it. `transport`
    carries the per-step messages: "nccl" or "ipc" (GPUs on one node) for GPUs, "gloo" or
    "shm" (shared memory on one node) for the CPU; None takes nccl or gloo.
    `step_cache`: the runtime's step cache, a StepCache (or a list of steps to skip; see
    asyncdiff_rt.step_cache.calibrate), part of every generation's program.
    """
    attribute = _denoiser_attribute(pipe)
    unet = getattr(pipe, attribute)
    # Every setting is checked (and counts made Python ints) before the trace and any device work.
    (n_components, stride, warmup, time_shift, partition, stride_reuse, devices, executor, graphs) = check_settings(
        unet, n_components, stride, warmup, time_shift, partition, stride_reuse, devices, executor, graphs)
    check_distributed(executor, process_group, timeout, transport)
    step_cache = check_step_cache(step_cache, warmup)
    options, agree = ({"graphs": graphs} if executor == "local" else {}), None
    if executor == "distributed":
        kind = device_type(devices, unet)
        check_transport(transport, kind)
        group, _ = join_group(process_group, n_components + stride - 1, kind, timeout)
        options = {"group": group, "timeout_s": float(timeout), "graphs": graphs, "transport": transport}
        agree = averaged_over(group, rank_device(devices, unet, group_rank(group)))

    def build(call=None):  # from example inputs, or from a real call (see AsyncDenoiser)
        inputs = call.example() if call is not None else _example_inputs(unet)
        plan = make_plan(unet, inputs, n_components, stride, warmup, time_shift, partition, stride_reuse,
                         agree=agree)
        return plan, make_executor(executor, unet, plan, devices, **options)

    planned = (None, None)
    if _example_inputs(unet) is not None:
        try:
            planned = build()
        except TraceError as e:  # the real call will have what the example lacked
            log.info("the plan waits for the pipeline's first call: %s", e)
    wrapper = AsyncDenoiser(unet, *planned, lambda: pipe.scheduler, rebuild=build)
    wrapper.step_cache = step_cache
    # Bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline's config.
    pipe.__dict__[attribute] = wrapper
    if hasattr(type(pipe), "save_pretrained"):
        pipe.__dict__["save_pretrained"] = _saving_the_original(pipe, attribute, unet, wrapper)
    return AsyncDiffHandle(pipe, attribute, unet, wrapper)


def _denoiser_attribute(pipe):
    """'unet' or 'transformer': where the pipeline keeps its denoiser; TypeError otherwise."""
    found = [a for a in ("unet", "transformer") if isinstance(getattr(pipe, a, None), torch.nn.Module)]
    if any(isinstance(getattr(pipe, a), AsyncDenoiser) for a in found):
        raise ValueError("this pipeline is already parallelized; call handle.remove() first")
    if not found or not hasattr(getattr(pipe, "scheduler", None), "timesteps"):
        raise TypeError(
            f"parallelize expects a diffusers pipeline with a `unet` or `transformer` module and a `scheduler` "
            f"(e.g. StableDiffusionPipeline, FluxPipeline), got {type(pipe).__name__}")
    if getattr(pipe, "transformer_2", None) is not None:
        raise TypeError(f"{type(pipe).__name__} with a transformer_2 (Wan 2.2's low-noise expert): only one "
                        "denoiser per pipeline runs asynchronously; set pipe.transformer_2 = None or run it plainly")
    return found[0]


def _saving_the_original(pipe, attribute, original, wrapper):
    """`pipe.save_pretrained` that writes the original denoiser (diffusers cannot save the
    wrapper: its class is no diffusers model), as if the pipeline were not parallelized."""
    save = type(pipe).save_pretrained

    def save_pretrained(*args, **kwargs):
        pipe.__dict__[attribute] = original
        try:
            return save(pipe, *args, **kwargs)
        finally:
            pipe.__dict__[attribute] = wrapper

    return save_pretrained


def _example_inputs(denoiser):
    """Inputs built for the denoiser's class, or None: then the plan waits for the first call."""
    try:
        return example_inputs(denoiser)
    except TypeError:
        return None
