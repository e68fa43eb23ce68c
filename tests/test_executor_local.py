"""The local executor on the CPU ("cpu*D": streams and events are no-ops, every line of
orchestration runs): bit for bit equal to the reference executor."""
import json
import warnings

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor, resolve_executor
from asyncdiff_rt.engine.devices import count_devices, lists_gpus, open_devices, parse_devices
from asyncdiff_rt.engine.graphs import GraphCache
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs
from loop import denoise, scheduler

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unets():
    return {f: build_unet(f"tiny-{f}", device="cpu", dtype=torch.float32).eval() for f in ("sd15", "sd21", "sdxl")}


def run(unet, plan, executor, generations=1, **options):
    sched = scheduler()
    runner = make_executor(executor, unet, plan, **options)
    try:
        wrapper = AsyncDenoiser(unet, plan, runner, lambda: sched)
        outs = [denoise(wrapper, sched, STEPS) for _ in range(generations)]
        return outs, runner.stats.as_dict()
    finally:
        runner.close()


# The plans of the foundation tests (test_executor_reference.py): N, S, W, reuse, shift,
# partition, pruning, on the three block layouts; (settings, generations).
PLANS = [
    ("sd15", dict(n_components=1, warmup=1), 1),
    ("sd15", dict(n_components=2, warmup=1), 2),
    ("sd15", dict(n_components=3, warmup=2, time_shift=True, partition="upstream"), 1),
    ("sd15", dict(n_components=2, stride=2, warmup=2, stride_reuse="previous", partition="upstream"), 1),
    ("sd15", dict(n_components=3, stride=2, warmup=1, time_shift=True, partition="upstream", prune=False), 2),
    ("sd15", dict(n_components=3, stride=2, warmup=STEPS), 1),
    ("sd15", dict(n_components=2, stride=2, warmup=1), 1),
    ("sd21", dict(n_components=3, warmup=1, partition="upstream"), 1),
    ("sd21", dict(n_components=2, stride=2, warmup=2, time_shift=True), 1),
    ("sdxl", dict(n_components=2, warmup=1, partition="upstream", prune=False), 1),
    ("sdxl", dict(n_components=3, stride=2, warmup=1, partition="upstream"), 1),
]


@pytest.mark.parametrize("family, settings, generations", PLANS, ids=[f"{f}-{i}" for i, (f, *_) in enumerate(PLANS)])
def test_local_equals_reference_bit_for_bit(unets, family, settings, generations):
    unet = unets[family]
    plan = make_plan(unet, unet_inputs(unet), **settings)
    (ref,), ref_stats = run(unet, plan, "reference")
    outs, stats = run(unet, plan, "local", generations=generations, devices=f"cpu*{plan.n_devices}")
    assert all(torch.equal(out, ref) for out in outs)
    g = generations
    assert stats["transfers"] == g * ref_stats["transfers"]
    assert stats["steps"] == {p: g * c for p, c in ref_stats["steps"].items()}
    assert stats["forwards_per_device"] == [g * f for f in ref_stats["forwards_per_device"]]
    assert stats["argument_bytes_per_device"] == [g * b for b in ref_stats["argument_bytes_per_device"]]


def test_reuse_step_takes_the_cached_output_as_the_glue_forward_would(unets, monkeypatch):
    """A UNet returns conv_out's output unchanged: emitting the cached tensor equals the
    glue-only forward on the host's cache that runs for other denoisers."""
    from asyncdiff_rt.engine.local import LocalExecutor

    unet = unets["sd15"]
    plan = make_plan(unet, unet_inputs(unet), n_components=2, stride=2, warmup=1)
    fast, _ = run(unet, plan, "local")
    taken = []
    original = LocalExecutor._note_output

    def no_shortcut(self, out, record):
        original(self, out, record)
        taken.append(self._emit_spec is not None)
        self._emit_spec = None

    monkeypatch.setattr(LocalExecutor, "_note_output", no_shortcut)
    glue, stats = run(unet, plan, "local")
    assert taken and all(taken) and torch.equal(fast[0], glue[0])
    assert stats["steps"]["reuse"] == 1


def test_replicas_hold_own_units_and_shared_modules_only(unets):
    unet = unets["sd15"]
    plan = make_plan(unet, unet_inputs(unet), n_components=3, stride=2, partition="upstream")
    runner = make_executor("local", unet, plan, devices="cpu*4")
    try:
        total = sum(p.numel() * p.element_size() for p in unet.parameters())
        weights = runner.weights_per_device()
        assert len(weights) == 4 and all(w < total for w in weights) and weights[2] == weights[3]
        own = set(plan.partition.components[0])
        replica = runner.replicas[0].module
        for name, p in replica.named_parameters():
            unit = next((u for u in plan.graph.paths if name.startswith(u + ".")), None)
            if unit is None or unit in own:  # shared or own: the original's tensor, not a copy
                assert p is unet.get_parameter(name)
            else:
                assert p.device.type == "meta"
    finally:
        runner.close()
    assert "forward" not in unet.conv_in.__dict__ and getattr(unet, "_asyncdiff_switch", None) is None


@pytest.mark.parametrize("settings", [dict(n_components=2, warmup=2), dict(n_components=3, stride=2, warmup=1),
                                      dict(n_components=2, warmup=STEPS)], ids=["2x1", "3x2", "WK"])
def test_warmup_runs_as_a_chain_through_the_replicas(unets, settings):
    """No device needs the whole denoiser: after the executor is built, the original
    UNet is never run (warm-up forwards run each unit on its owner's replica)."""
    unet = unets["sd15"]
    plan = make_plan(unet, unet_inputs(unet), **settings)
    (expected,), _ = run(unet, plan, "reference")
    runner = make_executor("local", unet, plan, devices=f"cpu*{plan.n_devices}")

    def refuse(module, args):
        raise AssertionError("the original UNet ran")

    hooks = [unet.get_submodule(p).register_forward_pre_hook(refuse) for p in plan.graph.paths]
    hooks.append(unet.register_forward_pre_hook(refuse))
    try:
        sched = scheduler()
        out = denoise(AsyncDenoiser(unet, plan, runner, lambda: sched), sched, STEPS)
    finally:
        runner.close()
        for hook in hooks:
            hook.remove()
    assert torch.equal(out, expected)


def generate(pipe, size=16, steps=4, seed=0):
    return pipe("a red cube", num_inference_steps=steps, height=size, width=size, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def _parallel(pipe, executor, settings, sizes):
    handle = asyncdiff_rt.parallelize(pipe, executor=executor, **settings)
    try:
        return [generate(pipe, size) for size in sizes], handle.stats()
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd_pipeline("sd15")


@pytest.mark.parametrize("family, settings, sizes", [
    ("sd15", dict(n_components=2, warmup=1, devices="cpu*2"), (16, 32, 16)),
    ("sd21", dict(n_components=3, stride=2, warmup=1, devices=["cpu*2", "cpu", "cpu"]), (16, 32)),
    ("sdxl", dict(n_components=2, stride=2, warmup=2, time_shift=True, devices="cpu*3"), (16, 32)),
])
def test_parallelize_local_equals_reference_and_changes_resolution(sd15, family, settings, sizes):
    pipe = sd15 if family == "sd15" else tiny_sd_pipeline(family)
    ref, _ = _parallel(pipe, "reference", settings, sizes)
    local, stats = _parallel(pipe, "local", settings, sizes)
    assert stats["executor"] == "local" and stats["generations"] == len(sizes)
    for a, b in zip(ref, local):
        assert torch.equal(a, b)
    assert local[1].shape[-1] == 2 * local[0].shape[-1]


def test_error_inside_a_device_forward_leaves_the_pipeline_usable(sd15):
    pipe = sd15
    handle = asyncdiff_rt.parallelize(pipe, executor="local", n_components=2, warmup=1, devices="cpu*2")
    try:
        expected = generate(pipe)
        runner = handle.denoiser.executor
        unit = runner.replicas[1].module.get_submodule(plan_last_unit(handle.plan))
        calls = []

        def boom(module, args):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")

        hook = unit.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="injected failure"):
            generate(pipe)
        hook.remove()
        assert torch.equal(generate(pipe), expected)
    finally:
        handle.remove()


def plan_last_unit(plan):
    return plan.partition.components[-1][-1]


def test_device_lists_parse_count_and_pick_the_executor():
    assert [str(e) for e in parse_devices(["cuda:0*4", "cuda:1", "cpu*3", "cuda*2@sm", "cuda:0*1@sm/4"])] == [
        "cuda:0*4", "cuda:1", "cpu*3", "cuda:0*2@sm", "cuda:0*1@sm/4"]
    assert count_devices("cuda:0*3") == 3 and count_devices(["cpu", "cpu*2"]) == 3
    assert lists_gpus("cuda:0*2") and lists_gpus(["cuda:0", "cuda:1"]) and not lists_gpus(["cuda:0", "cpu"])
    assert resolve_executor("auto", None) == "reference"
    assert resolve_executor("auto", "cpu*2") == "reference"
    assert resolve_executor("auto", ["cuda:0", "cuda:1"]) == "local"
    for bad in ("gpu:0", "cuda:0*0", "cpu*2@sm", "cuda:0*3@sm/2"):
        with pytest.raises(ValueError, match="device"):
            parse_devices(bad)


def test_bad_device_lists_are_refused_with_the_fix(sd15):
    pipe = sd15
    with pytest.raises(ValueError, match=r"n_components \+ stride - 1 = 3; list 3 devices"):
        asyncdiff_rt.parallelize(pipe, n_components=2, stride=2, devices="cpu*2")
    with pytest.raises(ValueError, match="sees 0 GPU" if not torch.cuda.is_available() else "GPU"):
        asyncdiff_rt.parallelize(pipe, n_components=2, devices="cuda:7*2")
    assert not isinstance(pipe.unet, AsyncDenoiser) and "forward" not in pipe.unet.conv_in.__dict__


def test_opening_an_unseen_gpu_names_the_fix():
    """The executor's own check (devices a caller hands it directly, past parallelize's)."""
    unseen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"sees \d+ GPU\(s\); list devices it has"):
        open_devices(f"cuda:{unseen}*2")


def test_graph_cache_runs_eagerly_off_the_gpu():
    cache = GraphCache(enabled=True)
    assert cache.run(("k",), 0, None, lambda: torch.ones(2)).sum() == 2
    assert len(cache) == 0 and cache.captures == 0


def test_bench_quick_runs_and_writes_its_tables(tmp_path, capsys):
    from asyncdiff_rt.cli import main

    assert main(["bench", "--quick", "--device", "cpu", "--steps", "3", "--repeats", "1", "--out", str(tmp_path),
                 "--no-compile", "--no-transformer"]) == 0  # those rows: tests/test_bench_baselines.py
    printed = capsys.readouterr().out
    assert "device: cpu" in printed and "vs eager" in printed
    (md,) = tmp_path.glob("bench_local_cpu*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert all("error" not in r for r in rows.values()) and rows["diffusers eager"]["latency_ms"] > 0
    two = rows["local cpu*2"]
    assert two["mib_moved_per_step"] > 0 and len(two["weights_mib_per_device"]) == 2
    assert sum(two["weights_mib_per_device"]) < 2 * rows["diffusers eager"]["weights_mib_per_device"][0]


def test_parallelize_passes_graphs_to_the_local_executor(sd15):
    for graphs in (True, False):
        handle = asyncdiff_rt.parallelize(sd15, executor="local", n_components=2, devices="cpu*2", graphs=graphs)
        try:
            assert handle.denoiser.executor.graphs.enabled is graphs
        finally:
            handle.remove()


def test_received_bytes_follow_the_real_sizes(sd15):
    """Bytes are counted from the tensors moved: 4x at twice the resolution, equal in both
    executors."""
    per_generation = {}
    for executor in ("reference", "local"):
        for size in (16, 32):
            handle = asyncdiff_rt.parallelize(sd15, executor=executor, n_components=2, devices="cpu*2")
            try:
                generate(sd15, size)
                per_generation[executor, size] = handle.stats()["received_bytes_per_device"]
            finally:
                handle.remove()
    assert per_generation["local", 16] == per_generation["reference", 16]
    assert per_generation["local", 32] == per_generation["reference", 32]
    assert [4 * b for b in per_generation["local", 16]] == per_generation["local", 32]


def test_more_layouts_than_kept_evict_the_oldest(sd15):
    from asyncdiff_rt.engine.local import MAX_LAYOUTS

    sizes = (16, 32, 48, 64, 16)
    ref, _ = _parallel(sd15, "reference", dict(n_components=2, devices="cpu*2"), sizes)
    handle = asyncdiff_rt.parallelize(sd15, executor="local", n_components=2, devices="cpu*2")
    try:
        for size, expected in zip(sizes, ref):
            assert torch.equal(generate(sd15, size), expected)
            assert len(handle.denoiser.executor._layouts) <= MAX_LAYOUTS
    finally:
        handle.remove()
