"""The process group of the distributed executor: the one a host framework hands in, the
default group when one exists, or a new default group from torchrun's environment.
Checked before any trace or device work: its size must be the plan's device count.

CPU ranks on one machine also get cores of their own here (`pin_local_rank`), unless
the user chose an affinity or turned it off (ASYNCDIFF_RT_PIN=0)."""
import atexit
import logging
import os
from datetime import timedelta

import torch

from .devices import parse_devices

log = logging.getLogger(__name__)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PIN_VARIABLE = "ASYNCDIFF_RT_PIN"  # "0" (or off, false, no): leave every rank's CPU affinity alone
_PINNING = {"done": None}  # what pin_local_rank did in this process (it decides once)
# A forked child is another process: it decides again (its parent's decision, made for
# another rank or before torchrun's variables were set, is not its own).
os.register_at_fork(after_in_child=lambda: _PINNING.update(done=None))


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

    if device_type == "cpu":  # before gloo's threads start, when this call makes the group: they inherit it
        pin_local_rank()
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


def pin_local_rank():
    """Give this CPU rank cores of its own on its machine: local rank r of L gets the r-th
    of L equal blocks of the cores, for every thread of the process (the main one, gloo's,
    the intra-op pool's), and no more intra-op threads than its cores. Unpinned, the two
    ranks' threads (a main thread computing, a gloo thread receiving) share every core
    with each other, and a message's receipt waits for a core: on a 2-core machine 1-3
    ms a step (profiling/results/README.md). Only where the process may run on every
    core (an affinity the user set is theirs), torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE say how many ranks share the machine, and they fit its cores (a
    container's cpuset counts as the machine);
    ASYNCDIFF_RT_PIN=0 turns it off. Decided once per process; what was done, in words
    (handle.stats()["cpu_affinity"] and the log)."""
    if _PINNING["done"] is None:
        _PINNING["done"] = _pin()
        log.info("asyncdiff_rt: CPU affinity of this rank: %s", _PINNING["done"])
    return _PINNING["done"]


def pinning():
    """What pin_local_rank did in this process, or None before it ran."""
    return _PINNING["done"]


def _pin():
    if os.environ.get(PIN_VARIABLE, "").strip().lower() in ("0", "off", "false", "no"):
        return f"not pinned ({PIN_VARIABLE}={os.environ[PIN_VARIABLE]})"
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (this system sets no CPU affinity)"
    local_rank, local_world = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if local_rank is None or local_world is None:
        return "not pinned (no LOCAL_RANK and LOCAL_WORLD_SIZE: not launched by torchrun)"
    local_rank, local_world = int(local_rank), int(local_world)
    available, machine = sorted(os.sched_getaffinity(0)), _machine_cores()
    if len(available) < len(machine):
        return f"not pinned (left as set: {len(available)} of {len(machine)} cores)"
    if local_world < 2:
        return "not pinned (the only rank on this machine)"
    cores = own_cores(available, local_rank, local_world)
    if cores is None:
        return f"not pinned ({local_world} local ranks, {len(available)} cores)"
    share = len(cores)
    for thread in _threads():
        try:
            os.sched_setaffinity(thread, cores)
        except OSError:  # a thread that ended meanwhile
            pass
    text = f"each local rank on {share} core(s) of its own (local rank {local_rank}: {_ranges(cores)})"
    if torch.get_num_threads() > share:
        text += f"; intra-op threads {torch.get_num_threads()} -> {share}"
        torch.set_num_threads(share)
    return text + f"; {PIN_VARIABLE}=0 turns it off"


def own_cores(available, local_rank, local_world):
    """Local rank r's cores: the r-th of `local_world` equal blocks of `available` (in
    order; the remainder unused), or None when the ranks outnumber the cores."""
    share = len(available) // local_world if local_world > 0 else 0
    if share < 1 or not 0 <= local_rank < local_world:
        return None
    return list(available[local_rank * share:(local_rank + 1) * share])


def _machine_cores():
    """The cores this process could be given: its container's cpuset (cgroup v2) where
    there is one, else every online core."""
    try:
        with open("/sys/fs/cgroup/cpuset.cpus.effective") as f:
            text = f.read().strip()
        cores = set()
        for part in text.split(","):
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
        if cores:
            return cores
    except (OSError, ValueError):
        pass
    return set(range(os.cpu_count() or 0))


def _threads():
    """Every thread of this process (Linux), or this one alone."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _ranges(cores):
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            runs.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(runs)


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
