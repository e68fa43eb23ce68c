"""What users stack on a denoiser that the runtime must know about: diffusers' step-cache
hooks (`enable_cache`), as data, and the checks that read it.

A step-cache hook keeps state across steps (residuals, Taylor factors, a step counter)
and decides from it what to skip. The runtime composes with it only where it can say
exactly what it computes (SEMANTICS.md, "Step caches"):

- with W = K (warmup >= steps) every forward is the whole denoiser, called in the
  pipeline's order, so the hook sees what it sees in the plain pipeline and the result
  is the cached plain pipeline's, bit for bit. That holds for the `reference` executor,
  which runs whole forwards on the denoiser itself; the `local` and `distributed`
  executors run units on replicas, where the hook's wrappers do not run as in the plain
  pipeline: refused there.
- with W < K the components run on stale inputs: the hook would read partial, stale
  forwards into its state and skip on them. Refused.

Planning (the trace) runs with these hooks bypassed (`hooks_bypassed`): it never reads
or writes their state.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheHook:
    """One of diffusers' step caches: the config that enables it, the names its hooks are
    registered under, and what it keeps across steps (for messages)."""

    config: str
    hooks: tuple
    keeps: str


# Every config diffusers 0.42.1's CacheMixin.enable_cache accepts (diffusers.hooks).
CACHE_HOOKS = (
    CacheHook("FirstBlockCacheConfig", ("fbc_leader_block_hook", "fbc_block_hook"),
              "the first block's residual and the other blocks' residuals of an earlier step"),
    CacheHook("TaylorSeerCacheConfig", ("taylorseer_cache",), "Taylor-series factors of earlier steps' outputs"),
    CacheHook("MagCacheConfig", ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
              "a step counter and the residual error accumulated over skipped steps"),
    CacheHook("FasterCacheConfig", ("faster_cache_denoiser", "faster_cache_block"),
              "earlier steps' attention outputs and guidance residuals"),
    CacheHook("PyramidAttentionBroadcastConfig", ("pyramid_attention_broadcast",),
              "earlier steps' attention outputs"),
    CacheHook("SeaCacheConfig", ("sea_cache_root", "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm"),
              "earlier steps' residuals and the gate's accumulated change"),
    CacheHook("TextKVCacheConfig", ("text_kv_cache_transformer", "text_kv_cache_block"),
              "the text tokens' attention keys and values of an earlier call"),
)
# The only executor whose forwards are the denoiser's own whole forwards.
COMPOSING_EXECUTORS = ("reference",)
_BY_HOOK = {name: entry for entry in CACHE_HOOKS for name in entry.hooks}
_ALTERNATIVE = ("disable it with {at}.disable_cache() and use the runtime's own step cache, which composes with "
                "asynchronous steps (parallelize(..., step_cache=asyncdiff_rt.step_cache.calibrate(...)))")


# Pipeline methods that find the denoiser by its class (diffusers' LoRA methods skip a
# component that is no ModelMixin, silently): on a parallelized pipeline they run with
# the original denoiser in place. True: the method changes the denoiser, so it is refused
# within a generation (the executors' caches were computed without the change).
PIPELINE_METHODS = {
    "get_active_adapters": False, "get_list_adapters": False,
    "load_lora_weights": True, "unload_lora_weights": True, "fuse_lora": True, "unfuse_lora": True,
    "set_adapters": True, "enable_lora": True, "disable_lora": True, "delete_adapters": True,
    "set_lora_device": True,
}


def where(denoiser):
    """How the pipeline names the denoiser, for messages."""
    return "pipe.unet" if "UNet" in type(denoiser).__name__ else "pipe.transformer"


def check_stack(denoiser, executor):
    """Refuse, before any trace or device work, what the executor cannot run as the plain
    pipeline would: a compiled denoiser, step caches off the reference executor, weights
    that are tensor subclasses (torchao's quantized tensors) on executors that copy them."""
    from torch._dynamo.eval_frame import OptimizedModule  # imported when used: dynamo is slow to import

    at = where(denoiser)
    compiled = [path or "the denoiser" for path, module in denoiser.named_modules()
                if module.__dict__.get("_compiled_call_impl") is not None]
    if isinstance(denoiser, OptimizedModule) or compiled:
        what = f"{at} = torch.compile(...)" if not compiled else f"{at}.compile() (on {compiled[0]})"
        raise ValueError(
            f"the denoiser is compiled ({what}): the runtime replaces its units' outputs per device and step and "
            "traces it on fake tensors, which compiled code does not follow. Parallelize the uncompiled module "
            f"({at} = {at}._orig_mod, or build it again without .compile()); the local executor replays CUDA "
            "graphs of each device's forward instead")
    check_executor(denoiser, executor, at)
    if executor not in COMPOSING_EXECUTORS:
        for name, p in denoiser.named_parameters():
            if type(p) not in (torch.Tensor, torch.nn.Parameter):
                raise ValueError(
                    f"{at}.{name} is a {type(p).__name__} (quantized weights, a tensor subclass): the {executor!r} "
                    "executor copies each device's weights into buffers of its own, which it does not support. "
                    "Parallelize with executor='reference', or run the quantized pipeline plainly")


def stack_signature(denoiser):
    """What a step cache or a LoRA adapter added within a generation changes at the
    denoiser's root: cheap enough to compare at every step. The config is held, so its id
    is not reused by another while the signature lives."""
    config = getattr(denoiser, "_cache_config", None)
    return id(config), config, tuple(getattr(denoiser, "peft_config", None) or ())


def cache_hooks(denoiser):
    """The step caches installed on `denoiser`, in table order; a config diffusers added
    later (not in the table) is named by its class, with keeps=None."""
    found = {_BY_HOOK[name] for _, registry in _registries(denoiser) for name in registry._hook_order
             if name in _BY_HOOK}
    out = [entry for entry in CACHE_HOOKS if entry in found]
    config = getattr(denoiser, "_cache_config", None)
    if config is not None and type(config).__name__ not in {entry.config for entry in out}:
        out.append(CacheHook(type(config).__name__, (), None))
    return out


def check_executor(denoiser, executor, at):
    """Refuse step caches on executors that run units apart from the denoiser."""
    for entry in cache_hooks(denoiser):
        if entry.keeps is None:
            raise ValueError(_unknown(entry, at))
        if executor not in COMPOSING_EXECUTORS:
            raise ValueError(
                f"{at} has diffusers' step cache {entry.config} enabled: it keeps {entry.keeps} across "
                f"steps, and the {executor!r} executor runs the units on replicas, where its hooks do not run as "
                f"in the plain pipeline. {_ALTERNATIVE.format(at=at)}, or parallelize with "
                "executor='reference' and warmup >= steps (then the result is the cached plain pipeline's)")


def check_steps(denoiser, warmup, steps, hooks=None):
    """Refuse step caches in a generation with asynchronous steps (W < K); `hooks`:
    `cache_hooks(denoiser)` when the caller knows it (it walks the module tree)."""
    at = where(denoiser)
    for entry in cache_hooks(denoiser) if hooks is None else hooks:
        if entry.keeps is None:
            raise ValueError(_unknown(entry, at))
        if warmup < steps:
            raise ValueError(
                f"{at} has diffusers' step cache {entry.config} enabled: it keeps {entry.keeps} across "
                f"steps, and with warmup {warmup} < {steps} steps it would see partitioned, stale forwards. "
                f"{_ALTERNATIVE.format(at=at)}, or parallelize with warmup >= steps (here "
                f"warmup={steps}: the cached plain pipeline's result)")


def _unknown(entry, at):
    return (f"{at} has a step cache this runtime does not know ({entry.config}); "
            f"{_ALTERNATIVE.format(at=at)} to parallelize it")


@contextmanager
def hooks_bypassed(denoiser):
    """Inside, the step-cache hooks and every other stateful diffusers hook of
    `denoiser` pass their module's forward through untouched: the hook objects and
    their state are neither called nor changed. Stateless hooks (layerwise casting)
    still run: they are part of what the denoiser computes."""
    saved = []
    for _, registry in _registries(denoiser):
        for name, ref in zip(registry._hook_order, registry._fn_refs):
            if name in _BY_HOOK or registry.hooks[name]._is_stateful:
                saved.append((ref, ref.pre_forward, ref.post_forward, ref.forward))
                ref.pre_forward, ref.post_forward = _pass_inputs, _pass_output
                if ref.original_forward is not None:  # the hook replaced the forward: skip it
                    ref.forward = ref.original_forward
    try:
        yield
    finally:
        for ref, pre, post, forward in saved:
            ref.pre_forward, ref.post_forward, ref.forward = pre, post, forward


def _registries(denoiser):
    for path, module in denoiser.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            yield path, registry


def _pass_inputs(module, *args, **kwargs):
    return args, kwargs


def _pass_output(module, output):
    return output
