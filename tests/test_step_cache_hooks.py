"""Diffusers' step caches (every config `enable_cache` takes) on a parallelized pipeline:
enabled before or after `parallelize`, W = K equals the cached plain pipeline bit for bit,
W < K and the local executor are refused by name, the trace never touches a hook's state,
and `remove()` leaves the cached plain pipeline reproducing its own result."""
import warnings

import pytest
import torch
from diffusers import hooks

import asyncdiff_rt
from asyncdiff_rt.models import tiny_pipelines as tiny
from asyncdiff_rt.stacking import CACHE_HOOKS, cache_hooks

warnings.filterwarnings("ignore")
STEPS = 4
EMBEDS, POOLED = tiny.tiny_prompt_embeddings()


def flux_call(pipe, callback=None):
    return pipe(prompt_embeds=EMBEDS, pooled_prompt_embeds=POOLED, height=16, width=16, output_type="latent",
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                callback_on_step_end=callback).images


def wan_call(pipe):
    return pipe(prompt_embeds=EMBEDS, negative_prompt_embeds=-EMBEDS, height=16, width=16, num_frames=5,
                guidance_scale=5.0, output_type="latent", num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0)).frames


# Settings that make each cache skip within STEPS steps of the tiny models (where it can).
CONFIGS = {
    "FirstBlockCacheConfig": lambda pipe: hooks.FirstBlockCacheConfig(threshold=1.0),
    "TaylorSeerCacheConfig": lambda pipe: hooks.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, max_order=1),
    "MagCacheConfig": lambda pipe: hooks.MagCacheConfig(
        mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, retention_ratio=0.2, threshold=0.5),
    "FasterCacheConfig": lambda pipe: hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 800),
        current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True),
    "PyramidAttentionBroadcastConfig": lambda pipe: hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 800),
        current_timestep_callback=lambda: pipe.current_timestep),
    "SeaCacheConfig": lambda pipe: hooks.SeaCacheConfig(threshold=10.0),
    "TextKVCacheConfig": lambda pipe: hooks.TextKVCacheConfig(),
}

# Recorded on the tiny FLUX at 4 steps: these two leave its result unchanged (SeaCache
# needs the step index in the cache context, which FluxPipeline does not pass, so it runs
# every block; TextKVCache is lossless); the others change it by 0.02 to 0.15.
UNCHANGED_ON_TINY_FLUX = {"SeaCacheConfig", "TextKVCacheConfig"}


def test_the_table_lists_every_cache_diffusers_offers():
    offered = {name for name in dir(hooks) if name.endswith("CacheConfig") or name.endswith("BroadcastConfig")}
    assert {entry.config for entry in CACHE_HOOKS} == offered == set(CONFIGS)


@pytest.fixture(scope="module")
def flux_plain():
    return flux_call(tiny.tiny_transformer_pipeline("flux"))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_cache_composes_at_w_equal_k_before_or_after_parallelize(config, flux_plain):
    pipe = tiny.tiny_transformer_pipeline("flux")
    pipe.transformer.enable_cache(CONFIGS[config](pipe))
    cached = flux_call(pipe)
    assert torch.equal(flux_call(pipe), cached)  # the cached plain pipeline repeats itself
    assert torch.equal(cached, flux_plain) == (config in UNCHANGED_ON_TINY_FLUX)
    assert [entry.config for entry in cache_hooks(pipe.transformer)] == [config]

    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)  # enabled before
    assert torch.equal(flux_call(pipe), cached)
    handle.remove()
    assert torch.equal(flux_call(pipe), cached)

    pipe.transformer.disable_cache()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    assert torch.equal(flux_call(pipe), flux_plain)
    pipe.transformer.enable_cache(CONFIGS[config](pipe))  # enabled after: found at the next generation
    assert torch.equal(flux_call(pipe), cached)
    assert torch.equal(flux_call(pipe), cached) and handle.stats()["rebuilds"] == 1  # its state is no change
    handle.remove()
    assert torch.equal(flux_call(pipe), cached)


@pytest.mark.parametrize("config", ["FirstBlockCacheConfig", "TaylorSeerCacheConfig"])
def test_asynchronous_steps_are_refused_by_name_and_touch_no_state(config):
    pipe = tiny.tiny_transformer_pipeline("flux")
    pipe.transformer.enable_cache(CONFIGS[config](pipe))
    cached = flux_call(pipe)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=1)  # traced here: hooks bypassed
    for _ in range(2):  # refused at every generation, and nothing half-made in between
        with pytest.raises(ValueError, match=f"{config}.*warmup 1 < {STEPS} steps.*disable_cache"):
            flux_call(pipe)
    handle.remove()
    assert torch.equal(flux_call(pipe), cached)

    pipe.transformer.disable_cache()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=1)
    asynchronous = flux_call(pipe)
    pipe.transformer.enable_cache(CONFIGS[config](pipe))  # enabled after: refused at the next generation
    with pytest.raises(ValueError, match=f"{config}.*disable_cache"):
        flux_call(pipe)
    pipe.transformer.disable_cache()
    assert torch.equal(flux_call(pipe), asynchronous)  # usable again, planned without it
    handle.remove()
    pipe.transformer.enable_cache(CONFIGS[config](pipe))
    assert torch.equal(flux_call(pipe), cached)


def test_the_local_executor_refuses_a_cache_before_or_after_parallelize():
    pipe = tiny.tiny_transformer_pipeline("flux")
    pipe.transformer.enable_cache(CONFIGS["FirstBlockCacheConfig"](pipe))
    cached = flux_call(pipe)
    with pytest.raises(ValueError, match="FirstBlockCacheConfig.*'local' executor.*disable_cache"):
        asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS, executor="local", devices="cpu*2")
    assert not isinstance(pipe.transformer, asyncdiff_rt.async_denoiser.AsyncDenoiser)
    pipe.transformer.disable_cache()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS, executor="local", devices="cpu*2")
    flux_call(pipe)
    pipe.transformer.enable_cache(CONFIGS["FirstBlockCacheConfig"](pipe))
    with pytest.raises(ValueError, match="FirstBlockCacheConfig.*'local' executor"):
        flux_call(pipe)
    handle.remove()
    assert torch.equal(flux_call(pipe), cached)


def test_a_cache_enabled_within_a_generation_is_refused_and_the_next_one_runs():
    pipe = tiny.tiny_transformer_pipeline("flux")
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    plain = flux_call(pipe)

    def enable(p, i, t, kwargs):
        if i == 1:
            p.transformer.enable_cache(CONFIGS["FirstBlockCacheConfig"](p))
        return kwargs

    with pytest.raises(RuntimeError, match="step cache or LoRA adapter.*within this generation"):
        flux_call(pipe, enable)
    pipe.transformer.disable_cache()
    assert torch.equal(flux_call(pipe), plain)
    handle.remove()


def test_wan_two_roles_compose_at_w_equal_k():
    """Wan's guidance passes are two roles, each with its own cache context ("cond",
    "uncond"): at W = K the runtime calls them as the pipeline does."""
    pipe = tiny.tiny_transformer_pipeline("wan")
    pipe.transformer.enable_cache(CONFIGS["FirstBlockCacheConfig"](pipe))
    cached = wan_call(pipe)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    assert torch.equal(wan_call(pipe), cached)
    handle.remove()
    assert torch.equal(wan_call(pipe), cached)
