"""The distributed executor inside this test process: how it finds its process group,
and a one-rank group (N = 1: the sequential denoiser exactly). The multi-process runs
are in test_executor_distributed.py."""
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import asyncdiff_rt
from asyncdiff_rt.engine.process_group import TORCHRUN_VARIABLES, own_cores
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

from ranks import free_port, rank_env


def generate(pipe, steps=4):
    return pipe("a red cube", num_inference_steps=steps, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.fixture
def pipe():
    return tiny_sd_pipeline("sd15")


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_without_torchrun_or_a_group_it_says_how_to_launch(pipe, monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"launch with torchrun \(torchrun --nproc-per-node 2 .*RANK"):
        asyncdiff_rt.parallelize(pipe, executor="distributed")
    assert not dist.is_initialized()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


AT_EXIT_SCRIPT = """
import atexit, sys, torch.distributed as dist
import asyncdiff_rt
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
# registered first, so it runs after the runtime's own exit handlers (atexit is last in, first out)
atexit.register(lambda: print("initialised at exit:", dist.is_initialized(), flush=True))
pipe = tiny_sd_pipeline("sd15")
asyncdiff_rt.parallelize(pipe, n_components=1, executor="distributed", transport=sys.argv[1])
pipe("a red cube", num_inference_steps=2, height=16, width=16, output_type="latent")
print("made by the runtime:", dist.is_initialized(), flush=True)
"""  # and no handle.remove(), as scripts end


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_a_script_that_just_ends_leaves_nothing_behind(transport):
    """Gloo's threads alive at interpreter finalisation abort the process now and then
    ("terminate called without an active exception"): torchrun would report a failed rank.
    Shared memory still mapped there prints a BufferError, and unlinked by nobody, a leak."""
    done = subprocess.run([sys.executable, "-c", AT_EXIT_SCRIPT, transport], env=rank_env(0, 1, free_port()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "made by the runtime: True" in done.stdout and "initialised at exit: False" in done.stdout, done.stdout
    assert "Exception ignored" not in done.stderr and "leaked" not in done.stderr, done.stderr[-2000:]


def test_a_world_of_the_wrong_size_is_refused(pipe, world_of_one):
    with pytest.raises(ValueError, match=r"default process group .* has 1 ranks, but the plan runs on .* 2 devices"):
        asyncdiff_rt.parallelize(pipe, n_components=2, executor="distributed")
    group = dist.new_group([0])
    with pytest.raises(ValueError, match=r"process_group= has 1 ranks, .* 3 devices"):
        asyncdiff_rt.parallelize(pipe, n_components=2, stride=2, executor="distributed", process_group=group)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


@pytest.mark.parametrize("transport", [None, "shm"])
def test_one_rank_is_the_sequential_denoiser(pipe, world_of_one, transport):
    expected = generate(pipe)
    handle = asyncdiff_rt.parallelize(pipe, n_components=1, warmup=1, executor="distributed", transport=transport)
    assert torch.equal(generate(pipe), expected)
    assert torch.equal(generate(pipe), expected)  # a second generation reuses this layout's buffers
    stats = handle.stats()
    assert stats["executor"] == "distributed" and stats["transport"] == (transport or "gloo") and stats["rank"] == 0
    assert stats["transport_reason"]
    assert stats["generations"] == 2 and stats["forwards_per_device"] == [6]
    handle.remove()
    assert torch.equal(generate(pipe), expected)


def test_transports_are_checked_before_any_work(pipe, world_of_one):
    with pytest.raises(ValueError, match=r"transport= is for executor='distributed'"):
        asyncdiff_rt.parallelize(pipe, transport="shm")
    with pytest.raises(ValueError, match=r"transport='tcp': choose one of auto, nccl, ipc, gloo, shm"):
        asyncdiff_rt.parallelize(pipe, n_components=1, executor="distributed", transport="tcp")
    with pytest.raises(ValueError, match=r"transport='ipc' does not run on cpu devices; use one of gloo, shm"):
        asyncdiff_rt.parallelize(pipe, n_components=1, executor="distributed", transport="ipc")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_measured_partition_follows_measured_times(pipe):
    """partition="measured" balances what the units take where the denoiser runs, not
    their FLOPs: a slow output unit (0.5 s here) ends up alone in the last component.
    The other units took 137-246 ms in all at load 16 on the shared 2-core machine
    (2026-12-03; 50 ms lost to them there)."""
    hook = pipe.unet.conv_out.register_forward_pre_hook(lambda *_: time.sleep(0.5))
    try:
        handle = asyncdiff_rt.parallelize(pipe, n_components=2, partition="measured")
        measured = handle.plan.partition
        handle.remove()
        handle = asyncdiff_rt.parallelize(pipe, n_components=2, partition="auto")
        by_flops = handle.plan.partition
        handle.remove()
    finally:
        hook.remove()
    assert measured.strategy == "measured" and measured.components[1] == ("conv_out",)
    assert by_flops.components[1] != ("conv_out",)


def test_bench_distributed_outside_torchrun_says_how_to_start_it(monkeypatch):
    from asyncdiff_rt.cli import Refusal, main

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(Refusal, match="torchrun --nproc-per-node 2 --no-python asyncdiff-rt bench --distributed"):
        main(["bench", "--distributed"])


class _FakePeers:
    """Peers of a group whose other ranks report `theirs` (host, boot id, pid)."""

    def __init__(self, backend, theirs):
        self.rank, self.size, self.backend, self._theirs = 0, 2, backend, theirs

    def exchange_objects(self, objects, what, device):
        return {1: {**objects[1], **self._theirs}}


def test_transport_choices_name_what_cannot_run():
    from asyncdiff_rt.engine.transports import choose_transport

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    here = _FakePeers("gloo", {})
    assert choose_transport(here, cpu, None).name == "gloo" and choose_transport(here, cpu, "shm").name == "shm"
    elsewhere = _FakePeers("gloo", {"host": "another-machine"})
    with pytest.raises(ValueError, match=r"transport='shm' cannot run: the ranks run on 2 machines; use "
                                         r"transport='gloo'"):
        choose_transport(elsewhere, cpu, "shm")
    with pytest.raises(ValueError, match=r"the CPU but the process group uses nccl; use gloo"):
        choose_transport(_FakePeers("nccl", {}), cpu, None)
    with pytest.raises(ValueError, match=r"GPUs but the process group uses gloo: use NCCL \(or transport='ipc'"):
        choose_transport(here, gpu, None)
    assert choose_transport(_FakePeers("nccl", {}), gpu, None).name == "nccl"  # no GPU touched for nccl
    with pytest.raises(ValueError, match=r"transport='ipc' cannot run: the ranks run on 2 machines"):
        choose_transport(_FakePeers("nccl", {"host": "another-machine"}), gpu, "ipc")


def test_each_local_rank_gets_cores_of_its_own_or_none():
    assert own_cores([0, 1, 2, 3], local_rank=1, local_world=2) == [2, 3]
    assert own_cores([4, 6], local_rank=1, local_world=2) == [6]  # the cores this process may use
    assert own_cores([0, 1, 2], local_rank=1, local_world=2) == [1]  # equal blocks, the rest unused
    assert own_cores([0, 1], local_rank=2, local_world=3) is None  # they do not go round
    assert own_cores([0, 1], local_rank=0, local_world=0) is None  # no LOCAL_WORLD_SIZE
