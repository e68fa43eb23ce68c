"""The devices `tune` may use and the links between them: measured, or described (fake
rigs for tests and for planning a machine one does not have).

A link is P2P (a peer copy on the copy engine) or a *host bounce* (no P2P: the copy goes
to pinned host memory and on to the receiver: two PCIe transfers one after the other, so
twice the latency and half the bandwidth of one hop). On `cpu*N` every device is the one
processor (`serial`): the projection runs every interval in issue order, as the local
executor does there.
"""
from dataclasses import dataclass

import torch

from .engine.devices import parse_devices
from .profiling.projection import LINKS, Link


@dataclass(frozen=True)
class Topology:
    names: tuple  # one per device, e.g. ("cuda:0", "cuda:1") or ("cpu", "cpu")
    free_bytes: tuple  # memory each device has free
    p2p: tuple  # p2p[a][b]: a can copy into b directly
    hop: Link  # one direct transfer (P2P, or one PCIe hop of a bounce)
    serial: bool = False  # one processor runs every device (cpu*N)
    spec: object = None  # what parallelize's devices= takes for these devices

    @property
    def count(self):
        return len(self.names)

    def link(self, a, b):
        """The Link a copy from device a to device b takes."""
        return self.hop if self.p2p[a][b] else Link(self.hop.gbytes_per_s / 2, 2 * self.hop.latency_us)

    @property
    def all_p2p(self):
        return all(self.p2p[a][b] for a in range(self.count) for b in range(self.count) if a != b)

    def describe(self):
        kind = ("one processor" if self.serial else "P2P between all" if self.all_p2p else
                "no P2P (host bounce)" if not any(self.p2p[a][b] for a in range(self.count)
                                                  for b in range(self.count) if a != b) else "P2P on some pairs")
        free = " / ".join(f"{b / 2**30:.1f}" for b in self.free_bytes)
        return f"{self.count} x {self.names[0]}: {kind}; free GiB {free}"


def pcie(n, free_gib=24.0, p2p=False):
    """A consumer rig: n GPUs on PCIe 4.0, without P2P unless `p2p`."""
    return _gpus(n, free_gib, lambda a, b: p2p, LINKS["pcie4-x16"])


def nvlink_pairs(n, free_gib=24.0):
    """n GPUs with NVLink bridges on the pairs (0, 1), (2, 3): P2P within a pair, host
    bounce between pairs (bridged workstation cards usually have no P2P over PCIe)."""
    return _gpus(n, free_gib, lambda a, b: a // 2 == b // 2, LINKS["nvlink-a5000"])


def single(free_gib=24.0):
    return _gpus(1, free_gib, lambda a, b: True, LINKS["pcie4-x16"])


def _gpus(n, free_gib, p2p, hop):
    return Topology(tuple(f"cuda:{d}" for d in range(n)), (int(free_gib * 2**30),) * n,
                    tuple(tuple(a == b or p2p(a, b) for b in range(n)) for a in range(n)), hop,
                    spec=[f"cuda:{d}" for d in range(n)])


def check_devices(devices):
    """The device entries, or ValueError naming one this process cannot use (before any work)."""
    entries = parse_devices(devices)  # refuses malformed entries
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for e in entries:
        if e.device.type == "cuda" and e.virtual:
            raise ValueError(f"devices={devices!r}: tune plans for separate GPUs (['cuda:0', 'cuda:1']) or "
                             f"'cpu*N'; virtual devices on one GPU ({e}) share its compute, which it does not model")
        if e.device.type == "cuda" and (e.device.index or 0) >= visible:
            raise ValueError(f"devices={devices!r} names {e.device}, but this process sees {visible} GPU(s) "
                             f"(CUDA_VISIBLE_DEVICES, drivers); list GPUs from cuda:0 to cuda:{visible - 1}"
                             if visible else
                             f"devices={devices!r} names {e.device}, but this process sees no GPU; "
                             f"use devices='cpu*N' or run where the GPUs are")
    if len({e.device.type for e in entries}) > 1:
        raise ValueError(f"devices={devices!r} mixes CPU and GPU entries; list GPUs only or use 'cpu*N'")
    return entries


def measure(devices):
    """The Topology of `devices` (checked): free memory, P2P, and one link measured."""
    entries = check_devices(devices)
    if entries[0].device.type == "cpu":
        n = sum(e.count for e in entries)
        return Topology(("cpu",) * n, (_host_free_bytes(),) * n, ((True,) * n,) * n, Link(1e9, 0.0), serial=True,
                        spec=f"cpu*{n}")
    gpus = [e.device for e in entries]
    free = tuple(torch.cuda.mem_get_info(g)[0] for g in gpus)
    p2p = tuple(tuple(a == b or torch.cuda.can_device_access_peer(a, b) for b in gpus) for a in gpus)
    hop = _time_link(gpus[0], gpus[1]) if len(gpus) > 1 else LINKS["pcie4-x16"]
    if len(gpus) > 1 and not p2p[0][1]:  # that copy bounced through the host: two hops
        hop = Link(hop.gbytes_per_s * 2, hop.latency_us / 2)
    return Topology(tuple(str(g) for g in gpus), free, p2p, hop, spec=[str(g) for g in gpus])


def _time_link(a, b, nbytes=64 << 20):
    """Bandwidth from one large copy, latency from small ones (the median of a few)."""
    import time

    def seconds(n):
        src, dst = torch.empty(n, dtype=torch.uint8, device=a), torch.empty(n, dtype=torch.uint8, device=b)
        dst.copy_(src)
        torch.cuda.synchronize(a), torch.cuda.synchronize(b)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(a), torch.cuda.synchronize(b)
            runs.append(time.perf_counter() - t0)
        return sorted(runs)[len(runs) // 2]

    latency = seconds(4)
    return Link(nbytes / max(seconds(nbytes) - latency, 1e-9) / 1e9, latency * 1e6)


def _host_free_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2**40  # unknown: no limit
