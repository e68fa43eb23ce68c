"""The local executor on a GPU: virtual devices on one card (streams, SM partitions),
CUDA graphs, no host synchronisation in steady state, flat memory. Tiny models only."""
import gc
import warnings

import pytest
import torch

from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.engine.call import DenoiserCall
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs
import loop
from loop import scheduler, unet_call_kwargs

pytestmark = pytest.mark.gpu
warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 6
DEV = "cuda:0"


@pytest.fixture(scope="module", params=[torch.float32, torch.float16], ids=["fp32", "fp16"])
def unet(request):
    return build_unet("tiny-sd15", device=DEV, dtype=request.param).eval()


def denoise(unet, sched, steps=STEPS, seed=0):
    return loop.denoise(unet, sched, steps, seed, size=16)


def run(unet, plan, executor, generations=1, **options):
    sched = scheduler()
    runner = make_executor(executor, unet, plan, **options)
    try:
        wrapper = AsyncDenoiser(unet, plan, runner, lambda: sched)
        return [denoise(wrapper, sched) for _ in range(generations)], runner
    finally:
        runner.close()


def close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("n, stride", [(1, 1), (2, 1), (3, 2)])
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_virtual_devices_on_streams_match_the_reference(unet, n, stride, graphs):
    dtype = next(unet.parameters()).dtype
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=n, stride=stride, warmup=1)
    (ref,), _ = run(unet, plan, "reference")
    outs, runner = run(unet, plan, "local", generations=3, devices=f"{DEV}*{plan.n_devices}", graphs=graphs)
    for out in outs:
        close(out, ref, dtype)
    assert torch.equal(outs[1], outs[2])  # replays repeat themselves exactly
    assert (runner.graphs.captures > 0) == graphs


def test_graphs_on_and_off_agree(unet):
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=2, stride=2, warmup=1)
    (eager,), _ = run(unet, plan, "local", devices=f"{DEV}*3", graphs=False)
    (_, graphed), _ = run(unet, plan, "local", generations=2, devices=f"{DEV}*3", graphs=True)
    close(graphed, eager, next(unet.parameters()).dtype)


def test_sm_partitions_match_the_reference(unet):
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=2, stride=2, warmup=1)
    (ref,), _ = run(unet, plan, "reference")
    try:
        outs, runner = run(unet, plan, "local", generations=2, devices=f"{DEV}*3@sm")
    except RuntimeError as e:
        if "SM partitions" in str(e):
            pytest.skip(str(e))
        raise
    for out in outs:
        close(out, ref, next(unet.parameters()).dtype)
    assert all(lane.sms > 0 for lane in runner.lanes[:3])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_match_the_reference(unet):
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=2, warmup=1)
    (ref,), _ = run(unet, plan, "reference")
    (out,), runner = run(unet, plan, "local", devices=["cuda:0", "cuda:1"])
    close(out, ref, next(unet.parameters()).dtype)


def _generation(runner, unet, plan, timesteps, kwargs, check_from=None):
    """One generation driven step by step; steps >= check_from run under sync errors."""
    runner.start(plan.program(len(timesteps)), timesteps)
    x = torch.ones(2, 4, 16, 16, device=DEV, dtype=next(unet.parameters()).dtype)
    for k, t in enumerate(timesteps):
        call = DenoiserCall(unet, (x, t), dict(kwargs, return_dict=False))
        if check_from is not None and k >= check_from:
            torch.cuda.set_sync_debug_mode("error")
        try:
            eps = runner.step(k, call)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        x = x - 0.01 * eps
    return x


@pytest.mark.parametrize("n, stride", [(2, 1), (2, 2)])
def test_steady_state_makes_no_host_sync_and_memory_stays_flat(unet, n, stride):
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=n, stride=stride, warmup=1)
    dtype = next(unet.parameters()).dtype
    kwargs = {k: v.to(DEV, dtype) for k, v in unet_call_kwargs(unet).items()}
    sched = scheduler()
    sched.set_timesteps(STEPS, device=DEV)
    runner = make_executor("local", unet, plan, devices=f"{DEV}*{plan.n_devices}")
    try:
        _generation(runner, unet, plan, sched.timesteps, kwargs)  # captures
        _generation(runner, unet, plan, sched.timesteps, kwargs, check_from=plan.warmup)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(20):
            _generation(runner, unet, plan, sched.timesteps, kwargs)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before <= 64 * 1024
    finally:
        runner.close()


def test_auto_picks_local_for_virtual_devices_through_parallelize():
    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd15").to(DEV)
    kwargs = dict(num_inference_steps=4, height=32, width=32, output_type="latent")
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, devices=None)
    try:
        ref = pipe("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, devices=f"{DEV}*2")
    try:
        assert handle.stats()["executor"] == "local"
        out = pipe("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    close(out, ref, torch.float32)


def test_arguments_outlive_an_sm_partition_executor(unet):
    """The caller frees its tensors after the executor closed its SM partitions (the
    partitions' streams are destroyed then): nothing may still refer to those streams."""
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=2, warmup=1)
    dtype = next(unet.parameters()).dtype
    kwargs = {k: v.to(DEV, dtype) for k, v in unet_call_kwargs(unet, seed=3).items()}
    sched = scheduler()
    sched.set_timesteps(STEPS, device=DEV)
    try:
        runner = make_executor("local", unet, plan, devices=f"{DEV}*2@sm")
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        out = _generation(runner, unet, plan, sched.timesteps, kwargs)
    finally:
        runner.close()
    del kwargs, runner
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.isfinite(out).all()


def test_parallelize_graphs_off_runs_eagerly_and_agrees():
    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd15").to(DEV)
    kwargs = dict(num_inference_steps=4, height=32, width=32, output_type="latent")
    outs = {}
    for graphs in (True, False):
        handle = asyncdiff_rt.parallelize(pipe, n_components=2, devices=f"{DEV}*2", graphs=graphs)
        try:
            outs[graphs] = pipe("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
            assert (handle.denoiser.executor.graphs.captures > 0) == graphs
        finally:
            handle.remove()
    close(outs[False], outs[True], torch.float32)
