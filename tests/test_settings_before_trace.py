"""Settings that partition.py or an executor used to refuse only after the trace (seconds
for a large model; for a denoiser planned at the pipeline's first call, only at that call)
are refused by `parallelize` itself, before the trace and any device work."""
import warnings

import pytest
import torch

import asyncdiff_rt
import asyncdiff_rt.integrations.diffusers as integration
from asyncdiff_rt.models.tiny_pipelines import tiny_transformer_pipeline
from test_settings import Traced, planned, sd15  # noqa: F401 (fixtures): the same trace probe and pipeline

warnings.filterwarnings("ignore")


UNSEEN_GPU = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(partition="upstream", n_components=5), r'partition="upstream" has no table for a sd15 denoiser '
                                                 r'with n_components=5; .*Use partition="auto"'),
    (dict(executor="local", devices=f"{UNSEEN_GPU}*2"), r"this process sees \d+ GPU\(s\); list devices it has"),
    (dict(partition=[["conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"], []]),
     "component 1 of the partition is empty"),
    (dict(partition=[["conv_in", "down_blocks", "mid_block"], ["down_blocks[1]", "up_blocks", "conv_out"]]),
     r"'down_blocks\[1\]' \(component 1\) overlaps 'down_blocks' \(component 0\)"),
    (dict(partition=[["conv_in", "down_blocks.0", "down_blocks[0]"], ["up_blocks", "conv_out"]]),
     r"'down_blocks\[0\]' \(component 0\) overlaps 'down_blocks.0' \(component 0\)"),
])
def test_refused_before_the_trace(sd15, planned, kwargs, message):
    with pytest.raises(ValueError, match=message):
        asyncdiff_rt.parallelize(sd15, **kwargs)


def test_upstream_on_a_transformer_is_refused_before_the_trace(planned):
    pipe = tiny_transformer_pipeline("pixart")
    with pytest.raises(ValueError, match='partition="upstream" has no table for an architecture with no published'):
        asyncdiff_rt.parallelize(pipe, partition="upstream")
    assert not isinstance(pipe.transformer, integration.AsyncDenoiser)
