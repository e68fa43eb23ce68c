"""Which transport carries the distributed executor's per-step cache messages, decided
once at setup from every rank's facts, so that every rank decides the same:

  nccl  GPUs, any nodes: point-to-point sends in one batch per step;
  ipc   GPUs on one node whose processes can map each other's memory: mailbox.py over
        CUDA IPC, copy-engine copies and stream-ordered signals (no host in the loop);
  gloo  CPUs, any nodes;
  shm   CPUs on one node: mailbox.py over POSIX shared memory.

Everything else (settings, warm-up outputs, the prediction) travels on the process
group. `auto` takes nccl on GPUs (ipc has not yet run on two GPUs: ask for it by name)
and gloo on the CPU.
"""
import os
import socket

import torch

from .links import CudaIpcLinks, SharedMemoryLinks

TRANSPORTS = ("auto", "nccl", "ipc", "gloo", "shm")
FOR_DEVICE = {"cuda": ("nccl", "ipc"), "cpu": ("gloo", "shm")}


class Transport:
    """The decision: its name, why, and (for ipc and shm) how to make the links."""

    def __init__(self, name, reason, links=None):
        self.name, self.reason, self._links = name, reason, links

    @property
    def mailbox(self):
        return self._links is not None

    def links(self):
        return self._links()

    def describe(self):
        return {"transport": self.name, "transport_reason": self.reason}


def check_transport(requested, kind):
    """`requested` (None or a name) for ranks on `kind` devices ("cuda" or "cpu"): its
    name, or ValueError naming the choices. Needs no process group."""
    requested = requested or "auto"
    if requested not in TRANSPORTS:
        raise ValueError(f"transport={requested!r}: choose one of {', '.join(TRANSPORTS)}")
    if requested != "auto" and requested not in FOR_DEVICE[kind]:
        raise ValueError(f"transport={requested!r} does not run on {kind} devices; use one of "
                         f"{', '.join(FOR_DEVICE[kind])} (or 'auto')")
    return requested


def choose_transport(peers, device, requested):
    """The Transport of this group on `device` (the same on every rank), or ValueError
    naming why the requested one cannot run and what to pass instead."""
    backend, kind = peers.backend, device.type
    requested = check_transport(requested, kind)
    if kind == "cpu" and backend != "gloo":
        raise ValueError(f"the ranks run on the CPU but the process group uses {backend}; use gloo")
    if kind == "cuda" and backend != "nccl" and requested != "ipc":
        raise ValueError(f"the ranks run on GPUs but the process group uses {backend}: use NCCL (or "
                         "transport='ipc' on one machine, where only settings and predictions use the group)")
    wire = "cpu" if backend == "gloo" else device
    facts = _facts(device, probe=requested == "ipc")
    everyone = {peers.rank: facts, **peers.exchange_objects(
        {p: facts for p in range(peers.size) if p != peers.rank}, "comparing the ranks' machines", wire)}
    hosts = {(f["host"], f["boot"]) for f in everyone.values()}
    pids = {rank: f["pid"] for rank, f in everyone.items()}
    off_node = None if len(hosts) == 1 else f"the ranks run on {len(hosts)} machines"

    if kind == "cpu":
        if requested != "shm":
            return Transport("gloo", "the CPU default" if requested == "auto" else "asked for")
        why = off_node or SharedMemoryLinks.unusable()
        if why:
            raise ValueError(f"transport='shm' cannot run: {why}; use transport='gloo'")
        return Transport("shm", "asked for; the ranks share one machine", lambda: SharedMemoryLinks(peers, pids))

    if requested != "ipc":
        return Transport("nccl", "the GPU default (transport='ipc' is opt-in)" if requested == "auto"
                         else "asked for")
    why = off_node or _ipc_unusable(peers, device, everyone, wire)
    if why:
        raise ValueError(f"transport='ipc' cannot run: {why}; use transport='nccl'")
    return Transport("ipc", "asked for; every rank maps its peers' GPU memory", lambda: CudaIpcLinks(device, pids))


def _facts(device, probe):
    """This rank's machine and process; with `probe`, its GPU and a buffer for the peers
    to try mapping."""
    facts = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "probe": None, "ipc": None}
    if probe:
        try:
            from .. import _C

            probe = torch.zeros(64, dtype=torch.uint8, device=device)
            facts["probe"] = _C.ipc_export(probe.data_ptr(), device.index)
            _PROBES.append(probe)  # alive until every peer tried to map it
        except Exception as e:  # no extension, or IPC refused
            facts["ipc"] = f"rank's CUDA IPC export failed ({e})"
    return facts


_PROBES = []


def _ipc_unusable(peers, device, everyone, wire):
    """Each rank maps every peer's probe buffer; the first failure anywhere, or None."""
    mine = next((f["ipc"] for f in everyone.values() if f["ipc"]), None)
    if mine is None:
        from .. import _C

        for rank, f in sorted(everyone.items()):
            if rank == peers.rank:
                continue
            try:
                handle, offset = f["probe"]
                _C.ipc_open(handle, offset, device.index)
                _C.ipc_close(handle, device.index)
            except Exception as e:
                mine = (f"rank {peers.rank} cannot map rank {rank}'s GPU memory ({e}; is that GPU hidden from it by "
                        "CUDA_VISIBLE_DEVICES, or are peer accesses off?)")
                break
    try:
        verdicts = {peers.rank: mine, **peers.exchange_objects(
            {p: mine for p in range(peers.size) if p != peers.rank}, "comparing what CUDA IPC can map", wire)}
    finally:
        _PROBES.clear()
    return next((v for _, v in sorted(verdicts.items()) if v), None)


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None
