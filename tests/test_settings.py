"""`parallelize` refuses bad settings before the trace and any device work, naming the fix."""
import warnings

import numpy as np
import pytest
import torch

import asyncdiff_rt
import asyncdiff_rt.integrations.diffusers as integration
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
from asyncdiff_rt.settings import check_settings

warnings.filterwarnings("ignore", category=FutureWarning)


class Traced(Exception):
    pass


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd_pipeline("sd15")


@pytest.fixture
def planned(monkeypatch):
    """Replace the trace (make_plan) by a probe: an error raised before it comes from the
    checks; reaching it raises Traced, and `planned` holds the arguments it got."""
    calls = []

    def probe(*args, **kwargs):
        calls.append(args)
        raise Traced

    monkeypatch.setattr(integration, "make_plan", probe)
    return calls


def assert_untouched(pipe):
    assert not isinstance(pipe.unet, AsyncDenoiser) and "forward" not in pipe.unet.conv_in.__dict__


GOOD = [["conv_in", "down_blocks", "mid_block"], ["up_blocks", "conv_norm_out", "conv_out"]]


@pytest.mark.parametrize("kwargs, error, message", [
    # 2.0 == 2, so a float stride passed `stride not in (1, 2)` and failed seconds later
    (dict(stride=2.0), ValueError, r"stride=2\.0: use the integer 1 or 2"),
    (dict(n_components=2.0), ValueError, r"n_components=2\.0: use an integer"),
    (dict(warmup=1.0), ValueError, r"warmup=1\.0: use an integer"),
    (dict(stride=True), ValueError, "stride=True: use the integer 1 or 2"),
    (dict(n_components=np.int64(0)), ValueError, "n_components=.*use an integer >= 1"),
    (dict(devices=123), TypeError, "devices=123: give None, a string like 'cuda:0\\*2'"),
    (dict(devices=[0, 1]), TypeError, r"devices=\[0, 1\]: give None"),
    (dict(devices={"cpu", "cuda:0"}), TypeError, "a list or tuple"),
    (dict(graphs="no"), TypeError, "graphs='no': use True .* or False"),
    (dict(graphs=0), TypeError, "graphs=0"),
    (dict(time_shift="yes"), ValueError, "time_shift='yes': use True or False"),
    (dict(stride_reuse="cache"), ValueError, "stride_reuse='cache': use one of"),
    (dict(executor=["local"]), ValueError, r"executor=\['local'\] is not available"),
    # the reference executor runs on the denoiser's device (here the CPU), whatever is listed
    (dict(executor="reference", devices="cuda:0*2"), ValueError,
     r"ignore cuda:0\*2 .*drop devices= .*or use executor='local'"),
    (dict(executor="auto", devices=["cuda:0", "cpu"]), ValueError,
     "executor='auto' picks 'reference' .* ignore cuda:0 .*use executor='local'"),
    (dict(partition="balanced"), ValueError, "partition='balanced' is unknown"),
    (dict(partition=None), TypeError, 'partition=None: use "auto", "measured", "upstream", "quality" or a list'),
    (dict(process_group=object()), ValueError, "process_group= is for executor='distributed'"),
    (dict(executor="distributed", process_group="world"), TypeError, "process_group='world': give a "),
    (dict(executor="distributed", timeout=0), ValueError, "timeout=0: give the seconds"),
    (dict(executor="distributed", timeout="30"), ValueError, "timeout='30'"),
    (dict(partition=GOOD[:1]), ValueError, "has 1 lists but n_components=2"),
    (dict(partition=[GOOD[0], "up_blocks"]), TypeError, "component 1 of the partition is 'up_blocks'"),
    (dict(partition=[GOOD[0], [1]]), TypeError, "partition entry 1 .*as strings"),
    (dict(partition=[GOOD[0], ["up_block", "conv_norm_out", "conv_out"]]), ValueError,
     r"'up_block' \(component 1\) names no unit .*did you mean 'up_blocks'"),
    (dict(partition=[GOOD[0], ["up_blocks[1].attentions[3]", "up_blocks", "conv_norm_out", "conv_out"]]),
     ValueError, r"'up_blocks\[1\]\.attentions\[3\]' \(component 1\) names no unit .*'up_blocks\.1\.attentions\.2'"),
    (dict(partition=[["conv_in", "down_blocks", "nonexistent"], GOOD[1]]), ValueError,
     "'nonexistent' .*names no unit .*top-level modules are conv_in, time_proj"),
    (dict(partition=[["", "conv_in", "down_blocks", "mid_block"], GOOD[1]]), ValueError, "'' .*names no unit"),
])
def test_bad_settings_are_refused_before_the_trace(sd15, planned, kwargs, error, message):
    with pytest.raises(error, match=message):
        asyncdiff_rt.parallelize(sd15, **kwargs)
    assert planned == []
    assert_untouched(sd15)


def test_existing_messages_are_kept(sd15, planned):
    with pytest.raises(ValueError, match=r"n_components \+ stride - 1 = 3; list 3 devices"):
        asyncdiff_rt.parallelize(sd15, n_components=2, stride=2, devices="cpu*2")
    with pytest.raises(ValueError, match="device 'gpu:0': write 'cuda:0'"):
        asyncdiff_rt.parallelize(sd15, devices=["gpu:0", "cpu"])
    assert planned == []
    assert_untouched(sd15)


DEFAULTS = dict(n_components=2, stride=1, warmup=1, time_shift=False, partition="auto", stride_reuse="component",
                devices=None, executor="auto", graphs=True)


@pytest.mark.parametrize("kwargs, executor", [
    (dict(n_components=np.int64(3), stride=np.int32(2), warmup=np.uint8(2)), "reference"),
    (dict(executor="reference", devices="cpu*2"), "reference"),  # the denoiser's own device type
    (dict(devices=("cpu", torch.device("cpu"))), "reference"),  # "auto" off the GPU: reference
    pytest.param(dict(executor="local", devices="cuda:0*2"), "local", marks=pytest.mark.gpu),  # a GPU it sees
    (dict(partition=[["conv_in", "down_blocks[0]", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block"],
                     ["up_blocks[0]", "up_blocks.1", "up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"]]),
     "reference"),
])
def test_good_settings_reach_the_trace_as_python_ints(sd15, planned, kwargs, executor):
    with pytest.raises(Traced):
        asyncdiff_rt.parallelize(sd15, **kwargs)
    counts = planned[0][2:5]  # make_plan(unet, inputs, n_components, stride, warmup, ...)
    assert [type(v) for v in counts] == [int] * 3
    assert counts == tuple(int(kwargs.get(k, DEFAULTS[k])) for k in ("n_components", "stride", "warmup"))
    assert check_settings(sd15.unet, **{**DEFAULTS, **kwargs}).executor == executor


def test_numpy_integers_parallelize_for_real(sd15):
    handle = asyncdiff_rt.parallelize(sd15, n_components=np.int64(2), stride=np.int64(2), warmup=np.int64(1))
    try:
        assert handle.plan.n_components == 2 and handle.plan.n_devices == 3
    finally:
        handle.remove()
    assert_untouched(sd15)
