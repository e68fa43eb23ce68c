"""`run_eval` and `generate` for each shipped model: the transformer's table runs with
its defaults, and how images are made is decided by the model named, not guessed from
the pipeline's attributes."""
import types

import pytest
import torch

from asyncdiff_rt import evaluation as ev


class RecordingPipeline:
    """Answers like a pipeline and records how it was called; it has a `transformer`."""

    def __init__(self):
        self.transformer, self.calls = torch.nn.Identity(), []

    def __call__(self, prompts, **kwargs):
        self.calls.append(kwargs)
        return types.SimpleNamespace(images=torch.zeros(len(prompts), 3, 32, 32))


def test_generate_decides_by_the_model_named():
    specs = ev.eval_specs(2)
    pipe = RecordingPipeline()
    ev.generate(pipe, specs, seed=0, steps=2, guidance=4.0)  # the UNet's way by default, transformer or not
    assert pipe.calls[-1]["output_type"] == "pt"
    images = ev.generate(pipe, specs, seed=0, steps=2, guidance=4.0, model="dit")
    assert pipe.calls[-1]["output_type"] == "latent" and torch.equal(images, torch.full((2, 3, 32, 32), 0.5))
    with pytest.raises(ValueError, match="model='DiT': use unet .* or dit"):
        ev.generate(pipe, specs, seed=0, steps=2, guidance=4.0, model="DiT")


def test_run_eval_of_the_transformer_runs_with_its_defaults():
    """No partition given: the transformer's table compares `auto` only (the reference
    code publishes no split for it); the UNet's both."""
    from asyncdiff_rt.models.tiny_dit import load_tiny_dit

    result = ev.run_eval(model="dit", pipe=load_tiny_dit(), configs="1,2x1", warmups=(1,), samples=2, steps=2,
                         batch=2, progress=False)
    assert [r["config"] for r in result["rows"]] == ["sequential", "2x1 W=1 auto"]
    assert ev.default_partitions("unet") == ("auto", "upstream")
