"""How a component's forward is built (engine/stages.py): the settings' checks, the
fallbacks, and the Triton kernels in the executors (run by Triton's interpreter here).
The compile stage's numbers are in test_component_compile.py."""
import logging
import warnings

import pytest
import torch

import asyncdiff_rt
import asyncdiff_rt.kernels as K
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.engine.stages import EAGER, Stages, apply_stages
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs
from loop import denoise, scheduler
from small_unet import small_unet

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 2
KERNELS = Stages(kernels=True)
# conv_norm_out (a unit, fused with the shared conv_act after it) on another device than
# conv_out: from the first asynchronous step conv_out reads a cached copy of its output
SPLIT_AT_THE_HEAD = [["conv_in", "down_blocks", "conv_norm_out"], ["mid_block", "up_blocks", "conv_out"]]


@pytest.fixture(scope="module")
def unet():
    return small_unet()


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels on CPU tensors (slowly)


def run(unet, plan, executor, stages, **options):
    sched = scheduler()
    runner = make_executor(executor, unet, plan, stages=stages, **options)
    try:
        return denoise(AsyncDenoiser(unet, plan, runner, lambda: sched), sched, STEPS)
    finally:
        runner.close()


def _instance_forwards(module):
    return [name for name, m in module.named_modules() if "forward" in m.__dict__]


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("settings, message", [
    (dict(kernels="yes"), "kernels='yes'"),
    (dict(kernels=1), "kernels=1"),
    (dict(compile="fast"), "compile='fast'"),
    (dict(compile=1), "compile=1"),
    (dict(compile="reduce-overhead"), "CUDA graphs of its own"),
    (dict(kernels=True, compile=True), "choose one"),
])
def test_a_bad_stage_setting_is_refused_before_any_work(monkeypatch, settings, message):
    pipe = tiny_sd_pipeline("sd15")
    unet = pipe.unet

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before the settings were checked")

    monkeypatch.setattr("asyncdiff_rt.integrations.diffusers.make_plan", no_trace)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        asyncdiff_rt.parallelize(pipe, n_components=2, **settings)
    assert pipe.unet is unet and _instance_forwards(unet) == []


def test_a_denoiser_routed_by_kernels_apply_is_refused(monkeypatch, interpreter):
    pipe = tiny_sd_pipeline("sd15")
    K.apply(pipe.unet.mid_block)
    try:
        with pytest.raises(ValueError, match="mid_block is routed through asyncdiff_rt.kernels"):
            asyncdiff_rt.parallelize(pipe, n_components=2)
    finally:
        K.remove(pipe.unet.mid_block)


# ---------------------------------------------------------------- fallbacks
def _no_triton(monkeypatch):
    monkeypatch.setattr("asyncdiff_rt.kernels._runtime._IMPORT_ERROR", "triton is not installed (faked)")


def _no_compiler(monkeypatch):
    from torch._inductor import cpp_builder, exc

    def missing():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)


def _no_dynamo(monkeypatch):
    monkeypatch.setattr("torch._dynamo.is_dynamo_supported", lambda: False)


@pytest.fixture(scope="module")
def eager_images():
    """The tiny pipeline at N = 2 with no stages (the reference executor)."""
    pipe = tiny_sd_pipeline("sd15")
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, kernels=False)
    try:
        return pipe("a cat", num_inference_steps=2, output_type="np").images
    finally:
        handle.remove()


@pytest.mark.parametrize("fake, settings, reason", [
    (_no_triton, dict(kernels=True), "triton is not installed (faked)"),
    (_no_compiler, dict(compile=True), "no C++ compiler"),
    (_no_dynamo, dict(compile="max-autotune-no-cudagraphs"), "not supported on this Python"),
])
def test_a_stage_that_cannot_run_falls_back_with_one_logged_reason(monkeypatch, caplog, interpreter, eager_images,
                                                                   fake, settings, reason):
    fake(monkeypatch)
    pipe = tiny_sd_pipeline("sd15")
    with caplog.at_level(logging.INFO, logger="asyncdiff_rt"):
        handle = asyncdiff_rt.parallelize(pipe, n_components=2, executor="local", devices="cpu*2", **settings)
        try:
            for replica in handle.denoiser.executor.replicas:
                assert replica.stages.summary() == {"kernel_sites": 0, "compiled_units": 0}
            got = pipe("a cat", num_inference_steps=2, output_type="np").images
        finally:
            handle.remove()
    stage_logs = [r for r in caplog.records if r.name == "asyncdiff_rt.engine.stages"]
    assert len(stage_logs) == 1 and reason in stage_logs[0].getMessage(), [r.getMessage() for r in stage_logs]
    assert stage_logs[0].levelno == logging.WARNING
    assert (got == eager_images).all()  # the eager program, bit for bit


def test_kernels_auto_route_nothing_on_the_cpu():
    from asyncdiff_rt.engine.stages import resolve_stages

    for executor in ("reference", "local", "distributed"):
        assert resolve_stages("auto", False, executor, "cpu", True) == EAGER
    assert resolve_stages("auto", True, "local", "cpu", True) == Stages(False, "default")


# ---------------------------------------------------------------- kernels in the executors
def test_kernels_local_equals_reference_bit_for_bit_and_the_eager_program_to_rounding(unet, interpreter):
    plan = make_plan(unet, unet_inputs(unet), n_components=2, warmup=1, partition=SPLIT_AT_THE_HEAD)
    eager = run(unet, plan, "reference", EAGER)
    reference = run(unet, plan, "reference", KERNELS)
    local = run(unet, plan, "local", KERNELS, devices="cpu*2")
    assert torch.equal(local, reference)
    # Measured (this test printing `worst`): 3.3e-6, the kernels' rounding; 1.2e-3 when the
    # SiLU fused into conv_norm_out ran again on its cached copy (routing without units).
    worst = (reference - eager).abs().max().item()
    assert worst < 1e-4, worst
    assert _instance_forwards(unet) == []  # the reference executor took its stages off


def test_kernels_at_w_equals_k_match_the_plain_denoiser_with_the_same_stages(unet, interpreter):
    plan = make_plan(unet, unet_inputs(unet), n_components=2, warmup=STEPS, partition=SPLIT_AT_THE_HEAD)
    local = run(unet, plan, "local", KERNELS, devices="cpu*2")
    applied = apply_stages(unet, plan.graph.paths, plan.graph.paths, KERNELS)
    try:
        sched = scheduler()
        plain = denoise(unet, sched, STEPS)
    finally:
        applied.remove()
    assert torch.equal(local, plain)


def test_runtime_routing_fuses_no_silu_into_a_norm_that_is_a_unit(unet, interpreter):
    units = make_plan(unet, unet_inputs(unet), n_components=2).graph.paths
    assert "conv_norm_out" in units
    routing = K.apply(unet, units=units)
    try:
        routed = list(routing.routed)
    finally:
        routing.remove()
    assert "conv_norm_out (GroupNorm)" in routed and not any(r.startswith("conv_act") for r in routed)
    assert "down_blocks.0.resnets.0.norm1 (GroupNorm+SiLU)" in routed  # within one unit: fused
