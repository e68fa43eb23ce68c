"""Changes made to the UNet after `parallelize` reach every device: the next generation
plans again from the changed UNet, so the local executor's replicas never compute with
what they copied before."""
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import asyncdiff_rt
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

warnings.filterwarnings("ignore", category=FutureWarning)


def generate(pipe, steps=4):
    return pipe("a red cube", num_inference_steps=steps, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


class ScaledProcessor(AttnProcessor):
    """A custom attention processor: plain attention with its output halved."""

    def __call__(self, *args, **kwargs):
        return 0.5 * super().__call__(*args, **kwargs)


def freeu(pipe):
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


def custom_processor(pipe):
    pipe.unet.set_attn_processor(ScaledProcessor())


def new_weights(pipe):
    state = {k: v * 1.01 for k, v in pipe.unet.state_dict().items()}
    pipe.unet.load_state_dict(state)


def fused_projections(pipe):
    pipe.unet.fuse_qkv_projections()


def forward_hook(pipe):
    pipe.unet.up_blocks[1].register_forward_hook(lambda module, args, out: (0.9 * out[0], *out[1:])
                                                 if isinstance(out, tuple) else 0.9 * out)


CHANGES = [freeu, custom_processor, new_weights, fused_projections, forward_hook]


# The reference executor runs the UNet itself: only module changes could escape it.
CASES = [(c, "local") for c in CHANGES] + [(fused_projections, "reference"), (forward_hook, "reference")]


@pytest.mark.parametrize("change, executor", CASES, ids=[f"{c.__name__}-{e}" for c, e in CASES])
def test_a_change_after_parallelize_reaches_every_device(change, executor):
    """W = K after the change equals the changed sequential pipeline; W = 1 equals the
    reference executor on the changed UNet."""
    pipe = tiny_sd_pipeline("sd15")
    handles = [asyncdiff_rt.parallelize(pipe, executor=executor, devices="cpu*2", n_components=2, warmup=4)]
    try:
        generate(pipe)  # a generation before the change: the executor is built and used
        change(pipe)
        after = generate(pipe)
        assert handles[0].stats()["rebuilds"] == 1
        handles[0].remove()
        assert torch.equal(after, generate(pipe))  # the changed sequential pipeline
        results = []
        for i, name in enumerate((executor, "reference")):
            handles.append(asyncdiff_rt.parallelize(pipe, executor=name, devices="cpu*2", n_components=2, warmup=1))
            if i == 0:
                generate(pipe)  # built, used, then changed once more
                change(pipe)
            results.append(generate(pipe))
            handles[-1].remove()
        assert torch.equal(results[0], results[1])
    finally:
        for handle in handles:
            handle.remove()


def test_no_change_no_rebuild():
    pipe = tiny_sd_pipeline("sd15")
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2)
    try:
        first = generate(pipe)
        assert torch.equal(generate(pipe), first)
        stats = handle.stats()
        assert stats["rebuilds"] == 0 and stats["generations"] == 2
    finally:
        handle.remove()
