"""profiling/bench_host.py measures the runtime around forwards whose units are stubbed:
the stubs must leave the denoiser computing what it computed for the input they were
recorded from (same structure, same glue), and the clock must see every replica's
forward. No timing is asserted."""
import torch

from asyncdiff_rt.profiling import bench_host


def test_stubbed_units_replay_the_recorded_forward():
    bench, undo = bench_host.make_bench(steps=2, repeats=1)
    call = dict(sample=torch.cat([bench.latent0] * 2), timestep=torch.tensor(999),
                encoder_hidden_states=bench.cond)
    with torch.no_grad():
        stubbed = bench.unet(**call).sample
        undo()
        real = bench.unet(**call).sample
    assert torch.equal(stubbed, real)


def test_rows_split_steps_into_forwards_and_runtime():
    bench, _ = bench_host.make_bench(steps=3, repeats=1)
    clock = bench_host.ForwardClock(type(bench.unet))
    try:
        plain = bench_host.measure(bench, bench.unet, clock, repeats=1, devices=1)
        calls = clock.calls
        with bench_host.runtime(bench, "local", 2, devices="cpu*2") as (wrapper, _, _):
            row = bench_host.measure(bench, wrapper, clock, repeats=1, devices=2)
    finally:
        clock.remove()
    assert calls == 2 * 3  # the plain loop: one forward a step, a warm-up and a timed generation
    # N = 2: after the warm-up step, a step runs a forward per device (on replicas: counted
    # too), the last one only the forward whose output is read: 1 + 2 + 1 a generation
    assert clock.calls - calls == 2 * (1 + 2 + 1)
    for r in (plain, row):
        assert 0 < r["in_forwards_cpu_us"] <= r["step_cpu_us"]
    assert type(bench.unet).forward is clock.original  # removed: the class is as it was
