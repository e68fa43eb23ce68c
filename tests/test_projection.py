"""The projection simulates the program the executors run. On the CPU (`cpu*N`, one
processor) it must reproduce the local executor's measured latency, from the forward
and host times measured in the same run, within 10%."""
import statistics
import warnings

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.profiling.projection import LINKS, Link, a5000_bridged, project
from asyncdiff_rt.trace import unet_inputs

warnings.filterwarnings("ignore")
STEPS = 8


def generate(pipe):
    return pipe("a red cube", num_inference_steps=STEPS, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("n, stride", [(2, 1), (3, 2)])
def test_projection_reproduces_the_cpu_executor_within_ten_percent(n, stride):
    pipe = tiny_sd_pipeline("sd15")
    devices = n + stride - 1
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices=f"cpu*{devices}", n_components=n,
                                      stride=stride, warmup=1)
    try:
        generate(pipe)  # planned and warm
        with handle.profile() as timeline:
            generate(pipe)
        plan = handle.plan
    finally:
        handle.remove()
    spans = timeline.spans
    host = sorted((s for s in spans if s.track == "host"), key=lambda s: s.start)
    measured = (host[-1].end - host[0].start) / 1e6

    def seconds(selected):
        return statistics.median((s.end - s.start) / 1e6 for s in selected)

    lanes = [s for s in spans if s.track.startswith("dev") and "copy" not in s.track]
    forward = [seconds(s for s in lanes if s.track == f"dev {d}" and not s.name.startswith("warm-up"))
               for d in range(devices)]
    warmup = seconds(s for s in lanes if s.name.startswith("warm-up T["))
    inside = [(h.end - h.start) / 1e6 - sum((s.end - s.start) / 1e6 for s in lanes if s.step == h.step
                                           and not (s.name.startswith("warm-up") and "T[" not in s.name))
              for h in host]
    gaps = [(b.start - a.end) / 1e6 for a, b in zip(host, host[1:])]
    host_s = statistics.median(inside) + statistics.median(gaps)
    projected = project(plan, plan.program(STEPS), forward, warmup, host_s, None, serial=True)
    print(f"projected {projected.latency_s * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms")
    assert abs(projected.latency_s - measured) / measured < 0.10, (projected.latency_s, measured)


def test_parallel_devices_overlap_and_sends_cost_their_link():
    unet = build_unet("tiny-sd15")
    plan = make_plan(unet, unet_inputs(unet), n_components=2, stride=1, warmup=1)
    program = plan.program(5)
    slow = Link(gbytes_per_s=1e-3, latency_us=0.0)  # 1 MB/s: the sends dominate
    fast = project(plan, program, [0.010, 0.010], 0.020, 0.0, lambda a, b: LINKS["nvlink-h100"])
    crawl = project(plan, program, [0.010, 0.010], 0.020, 0.0, lambda a, b: slow)
    serial = project(plan, program, [0.010, 0.010], 0.020, 0.0, None, serial=True)
    # warm-up 20 ms, then 4 steps: both devices in parallel (10 ms) but the last runs only the host
    assert fast.latency_s == pytest.approx(0.020 + 4 * 0.010, rel=0.02)
    assert serial.latency_s == pytest.approx(0.020 + 3 * 0.020 + 0.010, rel=1e-9)
    assert crawl.latency_s > 1.5 * fast.latency_s and crawl.waits_s > 0.05  # the forwards wait for the sends
    assert a5000_bridged()(0, 1) == LINKS["nvlink-a5000"] and a5000_bridged()(1, 2) == LINKS["pcie4-x16"]


def test_project_command_prints_projected_figures(tmp_path, capsys):
    from asyncdiff_rt.cli import main

    times = tmp_path / "times.json"
    times.write_text('{"forward_ms_per_device": [20.0, 20.0], "warmup_ms": 40.0, "host_ms_per_step": {"median": 1.0}}')
    argv = ["project", "--model", "sd15", "--height", "64", "--width", "64", "--steps", "10", "--times", str(times)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PROJECTED (not measured)" in out and "speedup 1.78x" in out  # 10 x 41 ms against 41 + 9 x ~21 ms
    times.write_text("{}")
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and "not a timeline summary" in capsys.readouterr().err
