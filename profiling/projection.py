"""Projection: the program the executors run, simulated event by event on D devices from
measured forward times and a link model, for setups no machine here has (4x A5000 on
NVLink bridges). Its figures are *projected*, never measured.

Every instruction of the program becomes an interval on a resource: a device's compute
(its forwards, in program order), a device's copy engine (the sends of what it
committed, each `latency + bytes / bandwidth` on the link to the receiver), and the
host (its time per step: the scheduler step and launching). A forward starts when its
device is free, every send into it for that step has arrived and, if its units read the
latent, when the host has made x_k; a send starts when its data was committed and the
receiver's forward that last read the slot it overwrites has finished (two slots, as the
local executor). With `serial=True` every interval runs on one processor in the order the
host issues them: the CPU executor (`cpu*N`), where the projection is checked against
measurement.
"""
from dataclasses import dataclass

from asyncdiff_rt.schedule import Emit, Forward, Send, SendLatent

SLOTS = 2


@dataclass(frozen=True)
class Link:
    """One direction of a link between two devices."""

    gbytes_per_s: float
    latency_us: float

    def seconds(self, nbytes):
        return self.latency_us * 1e-6 + nbytes / (self.gbytes_per_s * 1e9)


# Per-direction figures: vendor peak bandwidth scaled by what copies reach in practice.
LINKS = {
    "nvlink-a5000": Link(45.0, 8.0),  # NVLink bridge pair: 56.25 GB/s per direction peak
    "pcie4-x16": Link(22.0, 10.0),  # 32 GB/s per direction peak
    "nvlink-h100": Link(350.0, 5.0),  # NVLink 4: 450 GB/s per direction peak
}


def a5000_bridged(bridge="nvlink-a5000", rest="pcie4-x16"):
    """Links of a 4x A5000 rig with NVLink bridges on the pairs (0, 1) and (2, 3)."""
    return lambda a, b: LINKS[bridge] if a // 2 == b // 2 else LINKS[rest]


@dataclass
class Projection:
    latency_s: float
    busy_s: list  # per device, compute
    copy_s: list  # per device, its copy engine
    host_s: float
    waits_s: float  # time forwards waited on sends after their device was free (exposed communication)


def project(plan, program, forward_s, warmup_s, host_s, link, serial=False):
    """Simulate `program` (schedule.Program, from `plan.program(K)`) of `plan`.

    `forward_s[d]`: seconds of an asynchronous forward on device d; `warmup_s`: a warm-up
    forward (the whole denoiser, as a chain); `host_s`: host time per step;
    `link(src, dst)` -> Link (None for `serial`)."""
    graph, owner, components = plan.graph, plan.transfers.owner, plan.partition.components
    d_count = program.n_devices
    compute, copy = [0.0] * d_count, [0.0] * d_count
    busy, copies = [0.0] * d_count, [0.0] * d_count
    slot_read = [[0.0] * SLOTS for _ in range(d_count)]  # end of the forward that last read a slot
    rounds = [0] * d_count
    committed = {}  # unit -> (time, device)
    processor, host_total, waits = 0.0, 0.0, 0.0
    latent = 0.0  # when x_k exists
    for step in program.steps:
        arrive = [latent] * d_count
        start_host = max(latent, processor) if serial else latent
        end_host = start_host + host_s
        host_total += host_s
        processor = end_host if serial else processor
        latent_at = end_host
        eps = latent_at
        for ins in step.instructions:
            if isinstance(ins, (Send, SendLatent)):
                if isinstance(ins, Send):
                    ready, src = committed[ins.unit]
                    nbytes = graph.unit(ins.unit).nbytes
                else:
                    ready, src, nbytes = latent_at, program.host, graph.latent_nbytes
                dst_slot = slot_read[ins.dst][rounds[ins.dst] % SLOTS]
                seconds = 0.0 if serial else link(src, ins.dst).seconds(nbytes)
                start = max(ready, dst_slot, processor if serial else copy[src])
                end = start + seconds
                if serial:
                    processor = end
                else:
                    copy[src] = end
                copies[src] += seconds
                arrive[ins.dst] = max(arrive[ins.dst], end)
            elif isinstance(ins, Forward):
                d = program.host if ins.device is None else ins.device
                seconds = warmup_s if ins.device is None else forward_s[d]
                free = processor if serial else compute[d]
                start = max(free, arrive[d], latent_at)
                waits += max(0.0, arrive[d] - max(free, latent_at))
                end = start + seconds
                if serial:
                    processor = end
                else:
                    compute[d] = end
                if ins.device is None and not serial:  # the chain occupies every lane
                    compute = [max(c, end) for c in compute]
                busy[d] += seconds
                slot_read[d][rounds[d] % SLOTS] = end
                rounds[d] += 1
                if ins.commit:  # a warm-up commit leaves each unit's output with its owner (the chain)
                    units = graph.paths if ins.device is None else components[program.component_of(d)]
                    for u in units:
                        committed[u] = (end, d if ins.device is not None else owner[u])
                if ins.device is None or d == program.host:
                    eps = end
            elif isinstance(ins, Emit) and ins.source == "cache":
                eps = max(eps, arrive[program.host])
        latent = eps
    return Projection(max(latent, processor), busy, copies, host_total, waits)
