"""The process group of the distributed executor: the one a host framework hands in, the
default group when one exists, or a new default group from torchrun's environment.
Checked before any trace or device work: its size must be the plan's device count."""
import atexit
import os
from datetime import timedelta

import torch

from .devices import parse_devices

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank_device(devices, denoiser, rank):
    """Device of group rank `rank`: `devices[rank]` from a list with one entry per rank,
    else the denoiser's device (put each rank's pipeline on its own GPU first)."""
    if devices is None:
        return next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    listed = [e.device for e in parse_devices(devices) for _ in range(e.count)]
    return listed[rank]


def group_rank(group):
    import torch.distributed as dist

    return dist.get_rank(group)


def device_type(devices, denoiser):
    """"cuda" or "cpu": what the ranks run on (it picks NCCL or gloo)."""
    return rank_device(devices, denoiser, 0).type


def join_group(process_group, n_devices, device_type, timeout_s):
    """(group, created): the group whose ranks run the program's devices, one each; a
    new one uses NCCL for "cuda" devices and gloo for the CPU."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("executor='distributed' needs torch.distributed, which this torch build lacks; "
                           "use executor='local' (one process driving every device)")
    if process_group is not None:
        size = dist.get_world_size(process_group)
        if size < 0:
            raise ValueError("this process is not a member of the process_group given to parallelize: call "
                             "parallelize only on the ranks of that group (the others leave it alone)")
        _check_size(size, n_devices, "process_group=")
        return process_group, False
    if dist.is_initialized():
        _check_size(dist.get_world_size(), n_devices,
                    "the default process group (pass process_group= to run on some of its ranks)")
        return dist.group.WORLD, False
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(
            f"executor='distributed' runs one process per device: launch with torchrun "
            f"(torchrun --nproc-per-node {n_devices} script.py), or pass process_group= "
            f"({', '.join(missing)} not set)")
    _check_size(int(os.environ["WORLD_SIZE"]), n_devices, "torchrun's world (WORLD_SIZE)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(destroy_default_group)
    return dist.group.WORLD, True


def destroy_default_group():
    """At exit, for the default group this runtime made: gloo's worker threads that
    outlive the interpreter abort the process at finalisation ("terminate called without
    an active exception", exit code -6), and NCCL asks to be destroyed before exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _check_size(size, n_devices, what):
    if size != n_devices:
        raise ValueError(
            f"{what} has {size} ranks, but the plan runs on n_components + stride - 1 = {n_devices} devices, one "
            f"per rank; launch {n_devices} processes (torchrun --nproc-per-node {n_devices}) or give a group of "
            f"{n_devices} ranks")


def averaged_over(group, device):
    """`agree` for make_plan: measured unit times averaged over the group's ranks, so that
    every rank makes the same split from the same numbers."""
    import torch.distributed as dist

    def agree(times):
        t = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        return (t / dist.get_world_size(group)).tolist()

    return agree
