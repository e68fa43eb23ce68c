"""The shipped tiny diffusion transformer: a stock PixArtAlphaPipeline, loaded offline,
that follows held-out prompts; and asynchronous denoising on it, exact where it must be."""
import pytest
import torch

from asyncdiff_rt import evaluation as ev
from asyncdiff_rt import parallelize
from asyncdiff_rt.models import tiny_dit as td
from asyncdiff_rt.models.judge import load_judge


@pytest.fixture(scope="module")
def pipe():
    return td.load_tiny_dit()


def test_loads_offline_as_a_stock_pipeline_and_generates(pipe):
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.vae is None
    out = td.images(pipe, ["a large red circle at the center"], num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_missing_weights_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny.py --model dit"):
        td.load_tiny_dit(str(tmp_path))


def test_follows_held_out_prompts(pipe):
    """The judge reads every attribute of most samples as their (never trained on)
    prompts say, with guidance, at a reduced step count."""
    specs = ev.eval_specs(16)
    images = ev.generate(pipe, specs, seed=0, steps=20, guidance=4.0, model="dit")
    _, pred = ev.judge_images(load_judge(), images)
    # measured 15 of 16 (0.9375) on 2026-12-03 (AVX-512 CPU, one thread): one more miss allowed
    assert ev.adherence(pred, torch.tensor([s.labels() for s in specs])) >= 14 / 16


def test_asynchronous_denoising_on_it(pipe):
    """W = K is the sequential pipeline exactly; the local executor equals the reference
    bit for bit at N = 3, S = 2; remove() restores the pipeline."""
    prompts = ["a small blue square at the top left", "a large white cross at the bottom right"]

    def run():
        return td.images(pipe, prompts, num_inference_steps=6, generator=torch.Generator().manual_seed(0))

    sequential = run()
    handle = parallelize(pipe, n_components=2, warmup=6)
    assert torch.equal(run(), sequential)
    handle.remove()
    outputs = {}
    for executor, devices in (("reference", None), ("local", "cpu*4")):
        handle = parallelize(pipe, n_components=3, stride=2, warmup=1, executor=executor, devices=devices)
        outputs[executor] = run()
        handle.remove()
    assert torch.equal(outputs["local"], outputs["reference"])
    assert not torch.equal(outputs["local"], sequential)
    assert torch.equal(run(), sequential)
