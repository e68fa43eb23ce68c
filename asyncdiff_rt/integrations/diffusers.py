"""`parallelize(pipe, ...)`: swap a diffusers pipeline's denoiser (`pipe.unet` or
`pipe.transformer`) for an AsyncDenoiser."""
import functools
import logging
from contextlib import contextmanager

import torch

from ..async_denoiser import AsyncDenoiser
from ..engine import make_executor
from ..engine.stages import resolve_stages
from ..plan import make_plan
from ..engine.process_group import averaged_over, device_type, group_rank, join_group, rank_device
from ..engine.transports import check_transport
from ..settings import check_distributed, check_settings, check_stages
from ..stacking import PIPELINE_METHODS, check_stack
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
        for name in PIPELINE_METHODS:
            self._pipe.__dict__.pop(name, None)
        now = self._pipe.__dict__.get(self._attribute)
        if now is not wrapper:
            raise RuntimeError(
                f"pipe.{self._attribute} was replaced after parallelize (it is now a {type(now).__name__}); "
                "remove() left it in place and released the parallelized denoiser (handle.original)")
        self._pipe.__dict__[self._attribute] = self._original


def parallelize(pipe, n_components=2, stride=1, warmup=1, time_shift=False, partition="auto",
                stride_reuse="component", devices=None, executor="auto", graphs=True, process_group=None,
                timeout=30.0, transport=None, kernels="auto", compile=False, config=None,
                step_cache=None):
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

    How each device's forward is built: `kernels` routes the UNet's GroupNorm(+SiLU)
    through the Triton kernels ("auto": where forwards replay CUDA graphs on GPUs, where
    they were measured faster; True: wherever Triton runs; False: never); `compile`
    compiles each unit the device computes with torch.compile (False: eager, the default;
    True or a mode such as "max-autotune-no-cudagraphs"). A stage that cannot run (no
    Triton, no compiler) is dropped with one logged reason.

    `executor="distributed"` runs one process per device (README, "Several processes"):
    call parallelize on every rank with the same arguments; under torchrun it joins or
    creates the default group, or it runs on the ranks of `process_group`. `timeout`:
    seconds a rank waits for another before raising a message that names it. `transport`
    carries the per-step messages: "nccl" or "ipc" (GPUs on one node) for GPUs, "gloo" or
    "shm" (shared memory on one node) for the CPU; None takes nccl or gloo.

    `config`: a `tune` result (or "auto": tune now, on `devices` or every visible GPU)
    whose N, S, W, split, devices, executor and transport replace those arguments.
    `partition="quality"` runs calibration generations first (sensitivity.py).
    `step_cache`: the runtime's step cache, a StepCache (or a list of steps to skip; see
    asyncdiff_rt.step_cache.calibrate), part of every generation's program.
    """
    if config is not None:
        from ..tune import config_settings

        n_components, stride, warmup, partition, devices, executor, transport = config_settings(pipe, config, devices)
    attribute = _denoiser_attribute(pipe)
    unet = getattr(pipe, attribute)
    # Every setting is checked (and counts made Python ints) before the trace and any device work.
    (n_components, stride, warmup, time_shift, partition, stride_reuse, devices, executor, graphs) = check_settings(
        unet, n_components, stride, warmup, time_shift, partition, stride_reuse, devices, executor, graphs)
    check_distributed(executor, process_group, timeout, transport)
    check_stages(unet, kernels, compile)
    check_stack(unet, executor)
    if partition == "quality":  # calibration generations with the pipeline as it is, before it is wrapped
        from ..sensitivity import quality_partition

        partition = quality_partition(pipe, n_components)
    step_cache = check_step_cache(step_cache, warmup)
    runs_on = rank_device(devices if executor != "reference" else None, unet, 0).type
    stages = resolve_stages(kernels, compile, executor, runs_on, graphs)
    options, agree = ({"graphs": graphs, "stages": stages} if executor == "local" else {"stages": stages}), None
    if executor == "distributed":
        kind = device_type(devices, unet)
        check_transport(transport, kind)
        group, _ = join_group(process_group, n_components + stride - 1, kind, timeout)
        options = {"group": group, "timeout_s": float(timeout), "graphs": graphs, "transport": transport,
                   "stages": stages}
        agree = averaged_over(group, rank_device(devices, unet, group_rank(group)))

    def build(call=None):  # from example inputs, or from a real call (see AsyncDenoiser)
        check_stack(unet, executor)  # again: the denoiser may have changed since
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
    _save_the_originals()
    for name, changes in PIPELINE_METHODS.items():
        if hasattr(type(pipe), name):
            pipe.__dict__[name] = _with_the_original(pipe, attribute, unet, wrapper, name, changes)
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


def _save_the_originals():
    """Make `DiffusionPipeline.save_pretrained` write the original denoiser in place of every
    AsyncDenoiser a pipeline holds (once per process). diffusers saves only its own model
    classes: it would drop the wrapper, and its entry, from the checkpoint. Pipelines made
    from a parallelized one (from_pipe, **pipe.components) hold the wrapper too, and
    diffusers builds them where `parallelize` never sees them: hence the class."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # no diffusers: no pipeline to save
        return
    plain = DiffusionPipeline.save_pretrained
    if getattr(plain, "saves_the_originals", False):
        return

    @functools.wraps(plain)
    def save_pretrained(self, *args, **kwargs):
        with _originals_in_place(self):
            return plain(self, *args, **kwargs)

    save_pretrained.saves_the_originals = True
    DiffusionPipeline.save_pretrained = save_pretrained


@contextmanager
def _originals_in_place(pipe):
    """The pipeline as if it were not parallelized: each AsyncDenoiser it holds replaced by
    the denoiser it wraps, in its attribute and in its config entry (a pipeline made from a
    parallelized one registered the wrapper's class there)."""
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    wrappers = {name: value for name, value in vars(pipe).items() if isinstance(value, AsyncDenoiser)}
    if not wrappers:
        yield
        return
    entries = {name: pipe.config[name] for name in wrappers if name in pipe.config}
    try:
        for name, wrapper in wrappers.items():
            pipe.__dict__[name] = wrapper.denoiser  # bypasses DiffusionPipeline.__setattr__ and its config
        pipe.register_to_config(**{name: _fetch_class_library_tuple(pipe.__dict__[name]) for name in entries})
        yield
    finally:
        pipe.__dict__.update(wrappers)
        pipe.register_to_config(**entries)


def _with_the_original(pipe, attribute, original, wrapper, name, changes):
    """`pipe.<name>` run with the original denoiser in place, as if the pipeline were not
    parallelized (diffusers cannot save the wrapper, and its LoRA methods skip it: its class
    is no diffusers model). One that `changes` the denoiser is refused within a generation."""
    method = getattr(type(pipe), name)

    def run(*args, **kwargs):
        if changes and wrapper.running():
            wrapper.reset()  # the generation ends with this error; the pipeline stays usable
            raise RuntimeError(
                f"pipe.{name}() was called within a generation (e.g. from a step callback): it would change the "
                "denoiser under the caches this generation's devices computed without it. Call it between "
                "generations: it takes effect from the next one")
        before = pipe.__dict__[attribute]  # the original, when one method calls another (set_adapters)
        pipe.__dict__[attribute] = original
        try:
            return method(pipe, *args, **kwargs)
        finally:
            pipe.__dict__[attribute] = before

    run.__name__ = run.__qualname__ = name
    return run


def _example_inputs(denoiser):
    """Inputs built for the denoiser's class, or None: then the plan waits for the first call."""
    try:
        return example_inputs(denoiser)
    except TypeError:
        return None
