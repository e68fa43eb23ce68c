"""Every UNet pipeline of the paper and the reference code, and the diffusion
transformers (SD3, FLUX, PixArt, DiT, Wan 2.1), small and random, built offline: W = K equals the sequential pipeline exactly, W = 1 runs and differs a little,
N = 3 with S = 2 runs, the local executor on `cpu*N` equals the reference executor bit
for bit, and `remove()` restores the pipeline."""
import warnings

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.models import tiny_pipelines as tiny

warnings.filterwarnings("ignore")
STEPS = 4
IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
MASK = torch.zeros(1, 1, 16, 16)
MASK[..., 4:12, 4:12] = 1


def _image_call(**kwargs):
    return lambda pipe, seed: pipe("a red cube", num_inference_steps=STEPS, height=16, width=16,
                                   output_type="latent", generator=torch.Generator().manual_seed(seed),
                                   **kwargs).images


def _video_call(num_frames=4, **kwargs):
    return lambda pipe, seed: pipe(num_frames=num_frames, height=16, width=16, num_inference_steps=STEPS,
                                   output_type="latent", generator=torch.Generator().manual_seed(seed), **kwargs).frames


EMBEDS, POOLED = tiny.tiny_prompt_embeddings()


def _transformer_call(family):
    def call(pipe, seed):
        g = torch.Generator().manual_seed(seed)
        common = dict(num_inference_steps=STEPS, generator=g)
        if family == "dit":
            return torch.as_tensor(pipe(class_labels=[1], output_type="np", **common).images)
        if family == "wan":  # guidance: two calls per step, two roles
            return pipe(prompt_embeds=EMBEDS, negative_prompt_embeds=-EMBEDS, height=16, width=16, num_frames=5,
                        guidance_scale=5.0, output_type="latent", **common).frames
        if family == "pixart":
            mask = torch.ones(1, EMBEDS.shape[1])
            return pipe(prompt_embeds=EMBEDS, prompt_attention_mask=mask, negative_prompt=None,
                        negative_prompt_embeds=-EMBEDS, negative_prompt_attention_mask=mask, height=16, width=16,
                        use_resolution_binning=False, output_type="latent", **common).images
        negative = dict(negative_prompt_embeds=-EMBEDS, negative_pooled_prompt_embeds=-POOLED) if family == "sd3" else {}
        return pipe(prompt_embeds=EMBEDS, pooled_prompt_embeds=POOLED, height=16, width=16, output_type="latent",
                    **negative, **common).images

    return lambda: tiny.tiny_transformer_pipeline(family), call


# family -> (pipeline factory, call(pipe, seed) -> latents)
FAMILIES = {
    **{family: _transformer_call(family) for family in ("sd3", "flux", "pixart", "dit", "wan")},
    "upscaler": (tiny.tiny_upscaler_pipeline,
                 lambda pipe, seed: pipe("a red cube", image=IMAGE[..., :8, :8], num_inference_steps=STEPS,
                                         output_type="latent", generator=torch.Generator().manual_seed(seed)).images),
    "svd": (tiny.tiny_svd_pipeline, _video_call(image=IMAGE, decode_chunk_size=2)),
    "animatediff": (lambda: tiny.tiny_animatediff_pipeline("sd15"), _video_call(prompt="a red cube")),
    "animatediff-sdxl": (lambda: tiny.tiny_animatediff_pipeline("sdxl"), _video_call(prompt="a red cube")),
    "controlnet-sd": (lambda: tiny.tiny_controlnet_pipeline("sd15"), _image_call(image=IMAGE)),
    "controlnet-sdxl": (lambda: tiny.tiny_controlnet_pipeline("sdxl"), _image_call(image=IMAGE)),
    "multi-controlnet": (lambda: tiny.tiny_controlnet_pipeline("sd15", controlnets=2),
                         _image_call(image=[IMAGE, IMAGE.flip(-1)])),
    "sdxl-inpaint": (lambda: tiny.tiny_sd_pipeline("sdxl", inpaint=True),
                     _image_call(image=IMAGE, mask_image=MASK, strength=1.0)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    make, call = FAMILIES[request.param]
    pipe = make()
    return request.param, pipe, call, call(pipe, 0)


def parallel(pipe, call, seed=0, **settings):
    handle = asyncdiff_rt.parallelize(pipe, **settings)
    try:
        return call(pipe, seed), handle.stats()
    finally:
        handle.remove()


def test_warmup_over_all_steps_is_sequential(family):
    name, pipe, call, sequential = family
    for executor in ("reference", "local"):
        out, stats = parallel(pipe, call, n_components=2, warmup=STEPS, executor=executor, devices="cpu*2")
        assert torch.equal(out, sequential), (name, executor)
        assert stats["steps"] == {"warmup": STEPS * (2 if name == "wan" else 1)}  # Wan: a role per guidance pass


@pytest.mark.parametrize("settings", [dict(n_components=2, warmup=1), dict(n_components=3, stride=2, warmup=1)],
                         ids=["2x1", "3x2"])
def test_local_equals_reference_and_differs_a_little_from_sequential(family, settings):
    name, pipe, call, sequential = family
    devices = f"cpu*{settings['n_components'] + settings.get('stride', 1) - 1}"
    ref, _ = parallel(pipe, call, executor="reference", devices=devices, **settings)
    local, stats = parallel(pipe, call, executor="local", devices=devices, **settings)
    assert torch.equal(local, ref), name
    assert not torch.equal(ref, sequential) and torch.isfinite(ref).all()
    assert (ref - sequential).norm() < 0.5 * sequential.norm(), name  # a little: same picture
    assert stats["steps"].get("warmup") == (2 if name == "wan" else 1) and stats["rebuilds"] == 0


def test_remove_restores_the_pipeline(family):
    name, pipe, call, sequential = family
    attribute = "unet" if hasattr(pipe, "unet") else "transformer"
    original = getattr(pipe, attribute)
    parallel(pipe, call, n_components=2, warmup=1)
    assert getattr(pipe, attribute) is original and not isinstance(original, AsyncDenoiser)
    assert torch.equal(call(pipe, 0), sequential), name


def test_controlnet_residuals_go_only_where_they_are_read():
    """The plan is made from the call that carries the residuals: each device is sent the
    residuals its units read (and counted), all of them reach some device, none all."""
    pipe = tiny.tiny_controlnet_pipeline("sd15")
    call = FAMILIES["controlnet-sd"][1]
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2, partition="upstream")
    try:
        call(pipe, 0)
        plan, stats = handle.plan, handle.stats()
    finally:
        handle.remove()
    residuals = {a for a in plan.graph.arguments if "residual" in a}
    per_device = [residuals & set(reads) for reads in plan.transfers.reads_arguments]
    assert len(residuals) == 13 and set().union(*per_device) == residuals  # 12 skips + the middle
    assert all(0 < len(got) < len(residuals) for got in per_device)
    assert "ControlNet residuals (13)" in plan.describe()
    sent = stats["argument_bytes_per_device"]
    assert sent[0] != sent[1] and min(sent) > 0


def test_bad_input_and_other_frame_counts_leave_the_next_call_exact():
    """A call the pipeline refuses (no control image) or cannot finish, and a generation
    at another frame count, leave the next call exactly what it would have been."""
    results = {}
    for executor in ("reference", "local"):
        cn_make, cn_call = FAMILIES["controlnet-sd"]
        video_make, _ = FAMILIES["animatediff"]
        pipes = {"cn": cn_make(), "video": video_make()}
        handles = [asyncdiff_rt.parallelize(p, executor=executor, devices="cpu*2", n_components=2)
                   for p in pipes.values()]
        try:
            with pytest.raises(Exception):
                pipes["cn"]("a red cube", num_inference_steps=STEPS, height=16, width=16, output_type="latent")
            with pytest.raises(Exception):  # a control image the ControlNet cannot take
                pipes["cn"]("a red cube", image=torch.rand(1, 5, 16, 16), num_inference_steps=STEPS, height=16,
                            width=16, output_type="latent")
            frames = [_video_call(prompt="a red cube", num_frames=n)(pipes["video"], 0).shape[2] for n in (4, 6)]
            results[executor] = (cn_call(pipes["cn"], 0), _video_call(prompt="a red cube")(pipes["video"], 0))
        finally:
            for handle in handles:
                handle.remove()
        assert frames == [4, 6]
    assert all(torch.equal(a, b) for a, b in zip(results["reference"], results["local"]))
