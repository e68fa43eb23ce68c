"""The step loop every executor shares (engine/step_loop.py): its bookkeeping on a fake
executor that only records (no model), and its failure rule on the real executors."""
from collections import Counter

import pytest
import torch

from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.engine.call import DenoiserCall
from asyncdiff_rt.engine.stats import ExecutorStats
from asyncdiff_rt.engine.step_loop import StepLoop
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.profiling.nvtx import RANGES
from asyncdiff_rt.schedule import TransferPlan, build_program
from asyncdiff_rt.trace import unet_inputs
from loop import scheduler, unet_call_kwargs

STEPS = 7


class Recording(StepLoop):
    """Launches nothing: each Forward's output names its step and device."""

    name = "recording"
    shared_by_roles = ("stats", "fail_at")

    def __init__(self, n_devices, fail_at=None):
        self.stats, self.fail_at, self._shares = ExecutorStats(n_devices), fail_at, None
        self._init_role()

    def _init_role(self):
        super()._init_role()
        self.abandoned = []

    def _abandon(self, error):
        super()._abandon(error)
        self.abandoned.append(error)

    def _send(self, ins):
        pass

    _send_latent = _send

    def _forward(self, ins):
        if self._k == self.fail_at:
            raise RuntimeError(f"injected failure at step {self._k}")
        self._outputs[ins.device] = ("forward", self._k, ins.device)

    def _emit_forward(self, device):
        return self._outputs[device]

    def _emit_cache(self):
        return ("cache", self._k)


class Pushed(list):
    """Stands in for the nvtx package: the names of the ranges pushed."""

    def push(self, name):
        self.append(name)

    def pop(self):
        pass


def program(stride, reuse="component", skip=()):
    n_devices = 2 + stride - 1
    transfers = TransferPlan(owner={"a": 0}, receives=(("a",),) * n_devices, reads_latent=(True,) * n_devices,
                             emit_reads=("a",))
    return build_program(STEPS, 1, stride, 2, transfers, stride_reuse=reuse, skip=skip)


def run(executor, prog):
    executor.start(prog, list(range(STEPS)))
    return [executor.step(k, call=None) for k in range(STEPS)]


@pytest.mark.parametrize("stride,reuse,skip", [(1, "component", (3, 4)), (2, "component", ()),
                                               (2, "previous", (5, 6))])
def test_each_step_emits_what_its_program_says_and_is_counted_by_phase(stride, reuse, skip):
    prog = program(stride, reuse, skip)
    executor = Recording(prog.n_devices)
    emitted = run(executor, prog)
    for k, step in enumerate(prog.steps):
        emit = step.emit()
        expected = {"forward": ("forward", k, emit.device), "cache": ("cache", k),
                    "previous": emitted[k - 1] if k else None}[emit.source]
        assert emitted[k] == expected, (k, step)
    assert executor.stats.steps == Counter(step.phase for step in prog.steps)
    sibling = executor.sibling()  # another role: its own generation, the same counters
    run(sibling, prog)
    assert sibling.stats is executor.stats and executor.stats.steps["warmup"] == 2


def test_a_failed_step_ends_the_generation_until_the_next_start(monkeypatch):
    pushed = Pushed()
    monkeypatch.setattr(RANGES, "backend", pushed)
    monkeypatch.setattr(RANGES, "enabled", True)
    prog = program(1)
    executor = Recording(prog.n_devices, fail_at=2)
    with pytest.raises(RuntimeError, match="no generation is running"):
        executor.step(0, None)  # nothing started
    executor.start(prog, list(range(STEPS)))
    executor.step(0, None)
    executor.step(1, None)
    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        executor.step(2, None)
    assert [str(e) for e in executor.abandoned] == ["injected failure at step 2"]
    with pytest.raises(RuntimeError, match="no generation is running"):
        executor.step(3, None)
    assert executor.stats.steps == {"warmup": 1, "async": 1}  # the failed step is not counted
    assert pushed == ["step 0/warmup", "step 1/async", "step 2/async"]
    executor.fail_at = None
    assert run(executor, prog)[-1] == ("forward", STEPS - 1, prog.host)


# ---------------------------------------------------------------- the real executors
@pytest.fixture(scope="module")
def unet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast, and immune to a busy machine
    yield build_unet("tiny-sd15", device="cpu", dtype=torch.float32).eval()
    torch.set_num_threads(threads)


def calls(unet, timesteps, channels=None):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, channels or unet.config.in_channels, 8, 8, generator=g)
    kwargs = unet_call_kwargs(unet)
    return [DenoiserCall(unet, (latent + k, t), dict(kwargs, return_dict=False)) for k, t in enumerate(timesteps)]


@pytest.mark.parametrize("name", ["reference", "local"])
def test_every_executor_refuses_steps_after_a_failed_one_until_it_starts_again(unet, name):
    plan = make_plan(unet, unet_inputs(unet), n_components=2, warmup=1)
    sched = scheduler()
    sched.set_timesteps(4)
    timesteps, prog = sched.timesteps, plan.program(4)
    good = calls(unet, timesteps)
    broken = calls(unet, timesteps, channels=unet.config.in_channels + 1)  # no forward takes it
    options = {"devices": f"cpu*{plan.n_devices}"} if name == "local" else {}

    def generation(executor):
        executor.start(prog, timesteps)
        return [executor.step(k, call)[0] for k, call in enumerate(good)]

    with torch.no_grad():
        executor = make_executor(name, unet, plan, **options)
        try:
            expected = generation(executor)
        finally:
            executor.close()
        executor = make_executor(name, unet, plan, **options)
        try:
            executor.start(prog, timesteps)
            executor.step(0, good[0])
            with pytest.raises(Exception) as failed:
                executor.step(1, broken[1])
            assert "no generation is running" not in str(failed.value)  # it failed in the step
            with pytest.raises(RuntimeError, match="no generation is running"):
                executor.step(2, good[2])
            got = generation(executor)
        finally:
            executor.close()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert executor.stats.steps == {"warmup": 2, "async": 3}  # the failed step is not counted
