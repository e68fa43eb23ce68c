"""Diffusion transformers: replicas hold their own blocks and the shared modules only,
FLUX's t/1000 timestep, and what cannot run yet is refused with the reason."""
import warnings
from itertools import chain

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.engine.replica import weight_bytes
from asyncdiff_rt.models.tiny_pipelines import tiny_prompt_embeddings, tiny_transformer_pipeline

warnings.filterwarnings("ignore")
EMBEDS, POOLED = tiny_prompt_embeddings()


def flux(pipe, **kwargs):
    return pipe(prompt_embeds=EMBEDS, pooled_prompt_embeds=POOLED, height=16, width=16, num_inference_steps=4,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart", "dit"])
def test_replicas_hold_their_own_blocks_and_the_shared_modules(family):
    pipe = tiny_transformer_pipeline(family)
    transformer = pipe.transformer
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*3", n_components=3)
    try:
        if handle.plan is None:  # planned from the first call
            from test_families import FAMILIES

            FAMILIES[family][1](pipe, 0)
        plan, runner = handle.plan, handle.denoiser.executor

        def tensors(module, prefix=""):
            return {id(t) for name, t in chain(module.named_parameters(prefix), module.named_buffers(prefix))
                    if t.device.type != "meta"}

        units, outside = set(plan.graph.paths), set(plan.graph.read_outside)
        in_units = set().union(*(tensors(transformer.get_submodule(p)) for p in units))
        shared = tensors(transformer) - in_units
        kept = set().union(set(), *(tensors(transformer.get_submodule(p)) for p in outside))
        for d, replica in enumerate(runner.replicas):  # on the CPU they share the original's tensors
            own = set().union(*(tensors(transformer.get_submodule(p)) for p in plan.partition.components[d]))
            assert tensors(replica.module) == shared | own | kept
            assert weight_bytes(replica.module) < weight_bytes(transformer)
            assert weight_bytes(replica.module) == plan.summary()["weight_bytes_per_device"][d]  # the plan says so
        assert bool(kept) == (family == "dit")  # DiT's forward reads transformer_blocks[0].norm1.emb itself
    finally:
        handle.remove()


def test_flux_timesteps_are_matched_as_the_model_receives_them():
    """FLUX receives t/1000 in the latent dtype: the step is found, and W = K is exact."""
    pipe = tiny_transformer_pipeline("flux")
    sequential = flux(pipe)
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2, warmup=4)
    try:
        assert torch.equal(flux(pipe), sequential)
        assert handle.stats()["steps"] == {"warmup": 4}
    finally:
        handle.remove()


def test_flux_true_cfg_runs_each_guidance_pass_as_its_own_role():
    """True CFG calls the transformer twice per step: two roles, each with its own
    caches. W = K is the sequential pipeline; the local executor equals the reference."""
    pipe = tiny_transformer_pipeline("flux")
    cfg = dict(true_cfg_scale=2.0, negative_prompt_embeds=-EMBEDS, negative_pooled_prompt_embeds=-POOLED)
    sequential, results = flux(pipe, **cfg), {}
    for executor, warmup in (("reference", 4), ("reference", 1), ("local", 1)):
        handle = asyncdiff_rt.parallelize(pipe, executor=executor, devices="cpu*2", n_components=2, warmup=warmup)
        try:
            results[executor, warmup] = flux(pipe, **cfg)
            steps = handle.stats()["steps"]
        finally:
            handle.remove()
    assert torch.equal(results["reference", 4], sequential)
    assert torch.equal(results["local", 1], results["reference", 1])
    assert not torch.equal(results["local", 1], sequential)
    assert steps == {"warmup": 2, "async": 6}  # two roles of 4 steps each


def test_what_cannot_run_is_refused_with_the_reason():
    pipe = tiny_transformer_pipeline("wan")
    pipe.transformer_2 = tiny_transformer_pipeline("wan", seed=1).transformer  # Wan 2.2's second expert
    with pytest.raises(TypeError, match="WanPipeline with a transformer_2"):
        asyncdiff_rt.parallelize(pipe)
    with pytest.raises(TypeError, match="`unet` or `transformer` module.*got AutoencoderKLWan"):
        asyncdiff_rt.parallelize(pipe.vae)
