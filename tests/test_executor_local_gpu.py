"""The local executor on a GPU: virtual devices on one card (streams, SM partitions),
CUDA graphs, no host synchronisation in steady state, flat memory. Tiny models only."""
import gc
import os
import warnings
from itertools import chain

import pytest
import torch

from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.engine.call import DenoiserCall
from asyncdiff_rt.engine.local import MAX_LAYOUTS
from asyncdiff_rt.engine.replica import weight_bytes
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs
import loop
from loop import scheduler, unet_call_kwargs

pytestmark = pytest.mark.gpu
warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 6
DEV = "cuda:0"
DELAY_CYCLES = 2_000_000  # GPU spin before each queued forward, load and copy: ~1 ms at ~2 GHz


@pytest.fixture(scope="module", autouse=True)
def torch_transfers_under_the_sanitizer():
    """Under TORCH_CUDA_SANITIZER (profiling/gpu_check.sh runs this module once more so)
    transfers take the torch backend: the sanitizer follows torch's own events, copies
    and kernels only, so the extension's raw events would look like missing ordering
    (false reports) and its copies like no access at all (missed races)."""
    if "TORCH_CUDA_SANITIZER" not in os.environ:
        yield
        return
    import asyncdiff_rt.engine.transfer as transfer

    choose = transfer.choose_backend
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transfer, "choose_backend", lambda requested=None: choose(requested or "torch"))
        yield


@pytest.fixture(scope="module", params=[torch.float32, torch.float16], ids=["fp32", "fp16"])
def unet(request):
    return build_unet("tiny-sd15", device=DEV, dtype=request.param).eval()


@pytest.fixture(scope="module")
def unet32():
    """fp32 only: for tests whose subject (ordering, layouts, bytes) does not depend on the dtype."""
    return build_unet("tiny-sd15", device=DEV, dtype=torch.float32).eval()


def denoise(unet, sched, steps=STEPS, seed=0, size=16):
    return loop.denoise(unet, sched, steps, seed, size=size)


def run(unet, plan, executor, generations=1, sizes=None, delay_cycles=0, caller=denoise, **options):
    """Generations through an AsyncDenoiser on a new executor, closed after: one per entry
    of `sizes` (latent sizes; default `generations` times 16), made by `caller` (a loop
    like `denoise`). `delay_cycles`: the local executor's GPU spin before every queued
    forward, argument load and copy (slow streams), set before the first generation."""
    runner = make_executor(executor, unet, plan, **options)
    try:
        if delay_cycles:
            assert hasattr(runner, "delay_cycles"), "the executor lost its delay_cycles: this test would test nothing"
            runner.delay_cycles = delay_cycles
        outs, _ = drive(runner, unet, plan, sizes or [16] * generations, caller)
        return outs, runner
    finally:
        runner.close()


def drive(runner, unet, plan, sizes, caller=denoise):
    """One generation per latent size on `runner` (left open), as a pipeline drives the
    denoiser; returns the latents and runner.graphs.captures after each generation."""
    sched = scheduler()
    wrapper = AsyncDenoiser(unet, plan, runner, lambda: sched)
    outs, captures = [], []
    for size in sizes:
        outs.append(caller(wrapper, sched, size=size))
        captures.append(runner.graphs.captures if hasattr(runner, "graphs") else None)
    return outs, captures


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


# ------------------------------------------------------------ slow streams
# Every lane stream, copy stream and the input stream spin ~1 ms before each forward,
# argument load and copy they are given: an ordering that held only because the GPU was
# fast (a missing event, a wait on the wrong slot, a copy of the caller's tensor that the
# caller's stream does not wait for) then computes with stale or overwritten data.
SLOW = [(2, 1), (3, 2)]


def denoise_overwriting(unet, sched, steps=STEPS, seed=0, size=16):
    return loop.denoise(unet, sched, steps, seed, size=size, overwrite=True)


@pytest.mark.parametrize("n, stride", SLOW)
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_slow_streams_match_the_reference(unet, n, stride, graphs):
    dtype = next(unet.parameters()).dtype
    plan = make_plan(unet, unet_inputs(unet, height=16, width=16), n_components=n, stride=stride, warmup=1)
    (ref,), _ = run(unet, plan, "reference")
    outs, runner = run(unet, plan, "local", generations=2, delay_cycles=DELAY_CYCLES,
                       devices=f"{DEV}*{plan.n_devices}", graphs=graphs)
    for out in outs:
        close(out, ref, dtype)
    assert (runner.graphs.captures > 0) == graphs


@pytest.mark.parametrize("n, stride", SLOW)
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_slow_streams_with_a_caller_overwriting_its_tensors_match_the_reference(unet32, n, stride, graphs):
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=n, stride=stride, warmup=1)
    (ref,), _ = run(unet32, plan, "reference")  # undisturbed
    outs, _ = run(unet32, plan, "local", generations=2, delay_cycles=DELAY_CYCLES, caller=denoise_overwriting,
                  devices=f"{DEV}*{plan.n_devices}", graphs=graphs)
    for out in outs:
        assert torch.isfinite(out).all(), "a lane read the caller's tensors after the caller overwrote them"
        close(out, ref, torch.float32)


def _slower_copies(runner, cycles):
    """Every copy batch the executor queues (sends, latents) spins `cycles` more first, on
    top of delay_cycles: the copies of a forward's outputs then still run when that lane's
    next forward does, so a forward that overwrites what is being copied shows (e.g. a
    graph whose replay writes where another graph of the lane keeps its outputs)."""
    copy = runner._copy

    def slower(pairs, stream):
        if stream is not None:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(cycles)
        copy(pairs, stream)

    runner._copy = slower


@pytest.mark.parametrize("n, stride", SLOW)
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_copies_slower_than_forwards_match_the_reference(unet32, n, stride, graphs):
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=n, stride=stride, warmup=1)
    (ref,), _ = run(unet32, plan, "reference")
    runner = make_executor("local", unet32, plan, devices=f"{DEV}*{plan.n_devices}", graphs=graphs)
    try:
        runner.delay_cycles = DELAY_CYCLES
        _slower_copies(runner, 4 * DELAY_CYCLES)
        outs, _ = drive(runner, unet32, plan, [16, 16])
    finally:
        runner.close()
    for out in outs:
        close(out, ref, torch.float32)


# ------------------------------------------------------------ input layouts
def test_layout_round_trip_keeps_each_layouts_graphs_inputs_and_buffers(unet32):
    """A -> B -> A: B gets graphs, static inputs and buffers of its own; A's are still
    there and intact when it comes back (nothing captured again, the same bits)."""
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=2, warmup=1)
    sizes = (16, 16, 8, 16)  # A, A again (replays only), B, A
    refs, _ = run(unet32, plan, "reference", sizes=(16, 8))
    ref = dict(zip((16, 8), refs))
    runner = make_executor("local", unet32, plan, devices=f"{DEV}*2", graphs=True)
    try:
        outs, captures = drive(runner, unet32, plan, sizes)
    finally:
        runner.close()
    for size, out in zip(sizes, outs):
        assert out.shape[-1] == size
        close(out, ref[size], torch.float32)
    assert captures[0] > 0, "no graph was captured: this test would test eager forwards only"
    assert captures[1] == captures[0]  # the second generation of A replays what the first captured
    assert captures[2] > captures[1]  # B: graphs of its own
    assert captures[3] == captures[2]  # back to A: its graphs were kept, nothing captured again
    # Replays of A before and after B, bit for bit (the first generation of A ran each
    # graph's first forward eagerly, so it is compared within tolerance only).
    assert torch.equal(outs[3], outs[1])


def test_more_layouts_than_kept_evict_without_breaking_later_generations(unet32):
    """A, B, C, D, A with MAX_LAYOUTS = 3 kept: D evicts A (its graphs, static inputs and
    buffers, once the streams are idle), A evicts B; every generation still matches the
    reference, on slow streams."""
    distinct = [16, 8, 24, 32, 40, 48][: MAX_LAYOUTS + 1]
    assert len(distinct) == MAX_LAYOUTS + 1, "MAX_LAYOUTS grew: add latent sizes"
    sizes = [*distinct, distinct[0]]
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=2, warmup=1)
    refs, _ = run(unet32, plan, "reference", sizes=distinct)
    ref = dict(zip(distinct, refs))
    runner = make_executor("local", unet32, plan, devices=f"{DEV}*2", graphs=True)
    try:
        runner.delay_cycles = DELAY_CYCLES
        outs, captures = drive(runner, unet32, plan, sizes)
    finally:
        runner.close()
    for size, out in zip(sizes, outs):
        close(out, ref[size], torch.float32)
    assert all(b > a for a, b in zip(captures, captures[1:]))  # each layout new: A's graphs were evicted


# ------------------------------------------------------------ weights per device
def _shared_bytes(unet, plan):
    """Bytes of the parameters and buffers outside every unit (every replica holds them)."""
    paths, seen, total = plan.graph.paths, set(), 0
    for name, t in chain(unet.named_parameters(), unet.named_buffers()):
        if id(t) not in seen and not any(name.startswith(p + ".") for p in paths):
            total += t.numel() * t.element_size()
        seen.add(id(t))
    return total


def _check_weights(weights, unet, plan):
    """Two replicas, each with less than the whole UNet, together holding every unit once
    and the shared modules twice."""
    total = weight_bytes(unet)
    assert len(weights) == 2, weights
    assert all(0 < w < total for w in weights), (weights, total)
    assert sum(weights) - _shared_bytes(unet, plan) == total, (weights, total)


def test_weights_per_device_hold_own_units_and_shared_modules_only(unet32):
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=2, warmup=1)
    runner = make_executor("local", unet32, plan, devices=f"{DEV}*2")
    try:
        _check_weights(runner.weights_per_device(), unet32, plan)
    finally:
        runner.close()


def test_parallelize_reports_the_weights_per_device():
    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd15").to(DEV)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, devices=f"{DEV}*2")
    try:
        stats = handle.stats()
        assert stats["executor"] == "local"
        _check_weights(stats["weight_bytes_per_device"], handle.original, handle.plan)
    finally:
        handle.remove()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_second_gpu_holds_less_than_the_whole_unet(unet32):
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=2, warmup=1)
    gc.collect()
    torch.cuda.synchronize(1)
    before = torch.cuda.memory_allocated(1)
    runner = make_executor("local", unet32, plan, devices=["cuda:0", "cuda:1"])
    try:
        held = torch.cuda.memory_allocated(1) - before
        _check_weights(runner.weights_per_device(), unet32, plan)
        assert 0 < held < weight_bytes(unet32), (held, weight_bytes(unet32))
    finally:
        runner.close()


# ------------------------------------------------------------ new executors
def test_a_new_executor_after_close_matches_the_reference(unet32):
    plan = make_plan(unet32, unet_inputs(unet32, height=16, width=16), n_components=2, warmup=1)
    (ref,), _ = run(unet32, plan, "reference")
    first = make_executor("local", unet32, plan, devices=f"{DEV}*2")
    try:
        (before,), _ = drive(first, unet32, plan, [16])
    finally:
        first.close()
    first.close()  # a second close does nothing
    assert getattr(unet32, "_asyncdiff_switch", None) is None and "forward" not in unet32.conv_in.__dict__
    second = make_executor("local", unet32, plan, devices=f"{DEV}*2")
    try:
        outs, captures = drive(second, unet32, plan, [16, 16])
    finally:
        second.close()
    for out in (before, *outs):
        close(out, ref, torch.float32)
    assert captures[0] > 0  # the new executor captured graphs of its own


def test_a_changed_denoiser_rebuilds_the_executor_and_matches_the_reference():
    """set_attn_processor after parallelize: the next generation plans and builds the
    executor again from the changed UNet, and computes what the reference executor does
    on it."""
    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_sd_pipeline("sd15").to(DEV)
    kwargs = dict(num_inference_steps=4, height=32, width=32, output_type="latent")

    def generate():
        return pipe("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images

    handle = asyncdiff_rt.parallelize(pipe, n_components=2, devices=f"{DEV}*2")
    try:
        generate()
        old = handle.denoiser.executor
        handle.original.set_attn_processor(AttnProcessor())
        out = generate()
        stats, new = handle.stats(), handle.denoiser.executor
        assert new is not old and new.name == "local"
        processors = [p for r in new.replicas for p in r.module.attn_processors.values()]
        assert processors and all(type(p) is AttnProcessor for p in processors)
    finally:
        handle.remove()
    assert stats["rebuilds"] == 1 and stats["generations"] == 2
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, executor="reference")
    try:
        ref = generate()
    finally:
        handle.remove()
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    close(out, ref, torch.float32)
