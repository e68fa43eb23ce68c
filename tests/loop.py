"""A plain DDIM loop over a bare UNet: cheaper than a whole pipeline for executor tests."""
import torch
import torch.utils._pytree as pytree
from diffusers import DDIMScheduler

from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs


def scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def unet_call_kwargs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, c.cross_attention_dim, generator=g)}
    if c.addition_embed_type == "text_time":
        text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    return kwargs


def denoise(unet, sched, steps, seed=0, size=8, overwrite=False):
    """Run `steps` DDIM steps with classifier-free-guidance-sized batches on the UNet's
    device and dtype; return the latents. `overwrite`: the caller fills the tensors it
    passed with NaN right after each call (on its stream) and passes new ones next time:
    any copy of them that its stream does not wait for reads NaN."""
    weight = next(unet.parameters())
    sched.set_timesteps(steps, device=weight.device)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=g).to(weight.device, weight.dtype)
    kwargs = pytree.tree_map(lambda t: t.to(weight.device, weight.dtype), unet_call_kwargs(unet, seed))
    with torch.no_grad():
        for t in sched.timesteps:
            latent_in = torch.cat([latents] * 2)
            passed = pytree.tree_map(torch.clone, kwargs) if overwrite else kwargs
            eps = unet(latent_in, t, **passed, return_dict=False)[0]
            if overwrite:
                for tensor in (latent_in, *pytree.tree_leaves(passed)):
                    tensor.fill_(float("nan"))
            uncond, cond = eps.chunk(2)
            latents = sched.step(uncond + 3.0 * (cond - uncond), t, latents).prev_sample
    return latents


def denoise_async(unet, steps, seed=0, prune=True, executor="reference", generations=1, **settings):
    """`denoise` through an AsyncDenoiser, as parallelize sets it up for a pipeline.
    Returns (latents of the last generation, the executor's stats, the plan)."""
    sched = scheduler()
    plan = make_plan(unet, unet_inputs(unet), prune=prune, **settings)
    runner = make_executor(executor, unet, plan)
    try:
        wrapper = AsyncDenoiser(unet, plan, runner, lambda: sched)
        for _ in range(generations):
            latents = denoise(wrapper, sched, steps, seed)
        return latents, runner.stats.as_dict(), plan
    finally:
        runner.close()
