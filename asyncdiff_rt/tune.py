"""`tune`: which N, S, W, split, executor and transport to run a pipeline with on the
devices at hand, and how much worse the images get.

1. Measure what the projection needs: each unit's time, a whole forward and a step in a
   sequential generation at the user's resolution (hooks around the units), and the
   devices (topology.py: free memory, P2P or host bounce, a link's bandwidth and latency).
2. Project every candidate with profiling/projection.py (the simulation behind
   `asyncdiff-rt project`): a device's forward is its units' times plus what every
   device repeats (shared modules, glue); sends take their link; a distributed run adds
   the prediction's message per step. Candidates that do not fit a device's memory
   budget (its weights and double-buffered caches) are dropped.
3. From the fastest, measure each candidate's quality cost (PSNR against sequential on
   the calibration prompts, sensitivity.py; executors compute the same numbers, so one
   reference run per split, N, S and W) until one is within the bound, then the runner-up.
   When nothing beats one device, one device is the answer.
`parallelize(pipe, config=result)` applies the result.
"""
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import topology as topo
from .dataflow import transfer_plan
from .partition import resolve_partition
from .plan import Plan
from .profiling.projection import project
from .sensitivity import Calibration, quality_partition

MIN_PSNR_DB = 30.0  # default bound: 4x1 W=1 of the shipped UNet's auto split is 28.0 dB (eval_h100_g4)
PARTITIONS = ("auto", "upstream", "quality")
WARMUPS = (1, 3)


@dataclass(frozen=True)
class Config:
    """One candidate: what parallelize takes, and its projection and measured quality."""
    n_components: int
    stride: int
    warmup: int
    partition: object  # a strategy name, or the explicit lists it resolved to
    split: str  # the strategy it came from ("auto", "upstream", "quality"; "-" for one device)
    executor: str
    transport: object
    devices: object
    latency_s: float
    speedup: float
    psnr_db: float = math.inf
    weight_bytes_per_device: tuple = ()

    def settings(self):
        """parallelize's keyword arguments for this configuration."""
        out = dict(n_components=self.n_components, stride=self.stride, warmup=self.warmup,
                   partition=self.partition, devices=self.devices, executor=self.executor)
        if self.executor == "distributed":
            out["transport"] = self.transport
        return out

    def describe(self):
        if self.n_components == 1:
            return f"one device: {self.latency_s * 1e3:.1f} ms"
        return (f"N={self.n_components} S={self.stride} W={self.warmup} split={self.split} executor={self.executor} "
                f"transport={self.transport}: projected {self.latency_s * 1e3:.1f} ms, {self.speedup:.2f}x; "
                f"PSNR vs sequential {self.psnr_db:.1f} dB (calibration)")


@dataclass
class TuneResult:
    best: Config
    runner_up: object  # Config or None
    sequential_s: float
    topology: object
    min_psnr_db: float
    candidates: list = field(default_factory=list)  # every projected Config, fastest first
    reason: str = ""
    measured: list = field(default_factory=list)  # the Configs whose quality was measured, with it
    times: object = None  # the Times measured (pass to tune(times=) to plan another rig on the same figures)

    @property
    def one_device(self):
        return self.best.n_components == 1

    def describe(self):
        lines = [f"devices: {self.topology.describe()}",
                 f"one device (sequential): {self.sequential_s * 1e3:.1f} ms per generation (measured)",
                 f"recommended: {self.best.describe()}"]
        if self.runner_up is not None:
            lines.append(f"runner-up:   {self.runner_up.describe()}")
        if self.reason:
            lines.append(self.reason)
        lines.append("latencies are PROJECTED from measured unit times (profiling/projection.py), not measured")
        return "\n".join(lines)


def check_bound(min_psnr_db):
    if isinstance(min_psnr_db, bool) or not isinstance(min_psnr_db, (int, float)) or not 0 < min_psnr_db < 100:
        raise ValueError(f"min_psnr_db={min_psnr_db!r}: give the lowest acceptable PSNR against the sequential "
                         "images in dB, a number between 0 and 100 (e.g. 30; higher is stricter)")


def tune(pipe, devices=None, min_psnr_db=MIN_PSNR_DB, memory_budget=None, steps=50, warmups=WARMUPS,
         partitions=PARTITIONS, calibration_prompts=None, calibration_steps=None, topology=None, times=None,
         log=print):
    """The fastest configuration of `pipe` on `devices` whose calibration PSNR against
    sequential is at least `min_psnr_db` (module docstring). `memory_budget`: bytes per
    device (default: what each has free); `topology`: a Topology to plan for instead of
    measuring `devices` (topology.pcie, nvlink_pairs, single); `times`: a previous
    result's `times` instead of measuring them again."""
    check_bound(min_psnr_db)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps={steps!r}: the generation's denoising steps, an integer >= 2")
    if topology is None:
        if devices is None:
            raise ValueError("tune needs the devices to plan for: devices=['cuda:0', 'cuda:1'] or 'cpu*4'")
        topo.check_devices(devices)  # before any work
    unknown = [p for p in partitions if p not in PARTITIONS]
    if unknown or not partitions:
        raise ValueError(f"partitions={partitions!r}: choose from {', '.join(PARTITIONS)}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget={memory_budget!r}: bytes each device may hold, a number > 0 (or None: "
                         "what each device has free)")
    kwargs = {} if calibration_steps is None else {"steps": calibration_steps}
    calibration = Calibration(pipe, calibration_prompts, **kwargs)
    topology = topology or topo.measure(devices)
    budget = [memory_budget or free for free in topology.free_bytes]
    if topology.count < 2:  # nothing to measure
        single = Config(1, 1, 1, "auto", "-", "none", None, None, math.nan, 1.0)
        return TuneResult(single, None, math.nan, topology, min_psnr_db,
                          reason="one device: nothing to split; run the pipeline on it as it is")

    calibration.sequential()
    graph = calibration.graph
    times = times or measure_times(calibration, graph)
    log(f"tune: unit times measured: forward {times.forward_s * 1e3:.1f} ms, step {times.step_s * 1e3:.1f} ms")
    sequential_s = steps * times.step_s
    denoiser = _denoiser(pipe)
    single = Config(1, 1, 1, "auto", "-", "none", None, None, sequential_s, 1.0,
                    weight_bytes_per_device=(graph.weight_bytes,))
    candidates = []
    for n, stride, warmup, split, plan in _plans(pipe, graph, denoiser, topology.count, warmups, partitions,
                                                  calibration):
        summary = plan.summary(steps)
        weights = summary["weight_bytes_per_device"]
        held = [w + 2 * r for w, r in zip(weights, summary["bytes_per_step"])]  # caches: two slots each
        if any(h > b for h, b in zip(held, budget)) or (topology.serial and sum(held) > budget[0]):
            continue  # (cpu*N: every device holds its part in the one host memory)
        for executor, transport, link, extra in _executors(topology, plan.n_devices):
            forward = [times.overhead_s + sum(times.unit_s[u] for u in plan.partition.components[min(d, n - 1)])
                       for d in range(plan.n_devices)]
            p = project(plan, plan.program(steps), forward, times.forward_s, times.host_s + extra, link,
                        serial=topology.serial)
            spec = f"cpu*{plan.n_devices}" if topology.serial else list(topology.spec)[:plan.n_devices]
            explicit = [list(c) for c in plan.partition.components]
            candidates.append(Config(n, stride, warmup, explicit, split, executor, transport, spec, p.latency_s,
                                     sequential_s / p.latency_s, weight_bytes_per_device=tuple(weights)))
    candidates.sort(key=lambda c: c.latency_s)
    chosen, measured = [], []
    for c in candidates:
        if c.latency_s >= sequential_s or len(chosen) == 2:
            break
        if any(_same_run(c, o) for o in chosen):
            continue
        psnr = _psnr(calibration, c)
        measured.append(_with(c, psnr_db=psnr))
        log(f"tune: {c.n_components}x{c.stride} W={c.warmup} {c.split} {c.executor}/{c.transport}: projected "
            f"{c.speedup:.2f}x, calibration PSNR {psnr:.1f} dB")
        if psnr >= min_psnr_db:
            chosen.append(_with(c, psnr_db=psnr))
    if not chosen:
        fits = graph.weight_bytes <= budget[0]
        reason = ("no configuration is projected faster than one device within the quality bound; run on one "
                  "device" if fits else "nothing fits: the whole denoiser does not fit one device's budget either")
        return TuneResult(single, None, sequential_s, topology, min_psnr_db, candidates, reason, measured, times)
    return TuneResult(chosen[0], chosen[1] if len(chosen) > 1 else single, sequential_s, topology, min_psnr_db,
                      candidates, "", measured, times)


@dataclass(frozen=True)
class Times:
    unit_s: dict  # unit path -> seconds per call
    forward_s: float  # a whole forward
    overhead_s: float  # what every device repeats in a forward: shared modules and glue
    step_s: float  # a sequential step (forward and scheduler)

    @property
    def host_s(self):
        return self.step_s - self.forward_s


def measure_times(calibration, graph, prompts=1):
    """Unit, forward and step times (medians) of one sequential generation of the first
    calibration prompt, timed by hooks."""
    denoiser = _denoiser(calibration.pipe)
    cuda = next(denoiser.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spans, started, handles = {}, {}, []

    def hooks(name, module):
        def before(*_):
            sync()
            started[name] = time.perf_counter()

        def after(*_):
            sync()
            spans.setdefault(name, []).append(time.perf_counter() - started[name])

        handles.extend([module.register_forward_pre_hook(before), module.register_forward_hook(after)])

    for path in graph.paths:
        hooks(path, denoiser.get_submodule(path))
    hooks("", denoiser)
    one = Calibration(calibration.pipe, calibration.prompts[:prompts], steps=calibration.steps,
                      guidance=calibration.guidance)
    try:
        t0 = time.perf_counter()
        one.render()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    unit = {p: statistics.median(spans[p]) for p in graph.paths}
    forward = statistics.median(spans[""])
    return Times(unit, forward, max(forward - sum(unit.values()), 0.0), max(total / calibration.steps, forward))


def _plans(pipe, graph, denoiser, count, warmups, partitions, calibration):
    for n in range(2, count + 1):
        for stride in (1, 2):
            if n + stride - 1 > count:
                continue
            for split in partitions:
                try:
                    if split == "quality":
                        parts = resolve_partition(graph, n, quality_partition(pipe, n, calibration), denoiser)
                    else:
                        parts = resolve_partition(graph, n, split, denoiser)
                except ValueError:  # no published split for this family or N
                    continue
                for warmup in warmups:
                    yield n, stride, warmup, split, Plan(graph, parts, stride, warmup, False, "component",
                                                         transfer_plan(graph, parts, stride))


def _executors(topology, n_devices):
    """(executor, transport, link(a, b), host seconds added per step) for these devices."""
    if topology.serial:
        yield "local", None, None, 0.0
        return
    direct = all(topology.p2p[a][b] for a in range(n_devices) for b in range(n_devices))
    yield "local", "peer copies" if direct else "host bounce", topology.link, 0.0
    # A rank per device: the host's prediction crosses one link per step.
    yield "distributed", "nccl", topology.link, topology.link(0, 1).seconds(0) if n_devices > 1 else 0.0
    if direct:
        yield "distributed", "ipc", topology.link, topology.link(0, 1).seconds(0)


def _same_run(a, b):
    """Same numbers: the executors compute what the reference does."""
    return (a.n_components, a.stride, a.warmup, a.partition) == (b.n_components, b.stride, b.warmup, b.partition)


def _psnr(calibration, config):
    mse = calibration.error(config.partition, stride=config.stride, warmup=config.warmup)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _with(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def config_settings(pipe, config, devices=None):
    """parallelize's (n_components, stride, warmup, partition, devices, executor, transport)
    from a TuneResult, a Config, or "auto" (tune now on `devices`, default every visible GPU)."""
    if isinstance(config, str) and config == "auto":
        if devices is None:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count < 2:
                raise ValueError('config="auto" tunes for the devices at hand, but this process sees '
                                 f"{count} GPU(s); pass devices= (e.g. 'cpu*4') or run on one device plainly")
            devices = [f"cuda:{d}" for d in range(count)]
        config = tune(pipe, devices)
    if isinstance(config, TuneResult):
        config = config.best
    if not isinstance(config, Config):
        raise TypeError(f"config={config!r}: give what asyncdiff_rt.tune(...) returned, or \"auto\"")
    if config.n_components == 1:
        raise ValueError("the tune result recommends one device (nothing was projected faster within its quality "
                         "bound): run the pipeline without parallelize")
    s = config.settings()
    return (s["n_components"], s["stride"], s["warmup"], s["partition"], s["devices"], s["executor"],
            s.get("transport"))
