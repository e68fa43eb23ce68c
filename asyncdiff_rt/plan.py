"""A Plan ties one denoiser's units, partition and dataflow to the AsyncDiff settings,
and builds the program for a given number of steps."""
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from .dataflow import broadcast_bytes_per_step, bytes_per_step, transfer_plan
from .partition import resolve_partition
from .schedule import build_program, critical_path_steps, ideal_speedup, validate_settings
from .structure import structure
from .units import find_units

_PROGRAMS_KEPT = 8  # step counts a plan keeps programs for
_TRACES = OrderedDict()  # (structure, inputs) -> UnitGraph, least recently used first
_TRACES_KEPT = 16  # pairs of denoiser structure and input layout


@dataclass(frozen=True)
class Plan:
    graph: object  # UnitGraph
    partition: object  # Partition
    stride: int
    warmup: int
    time_shift: bool
    stride_reuse: str
    transfers: object  # TransferPlan
    _programs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_components(self):
        return self.partition.n_components

    @property
    def n_devices(self):
        return self.n_components + self.stride - 1

    def program(self, num_steps, warmup=None, skip=()):
        """The program for `num_steps` steps (warm-up: the plan's unless given; `skip`: the
        step cache's skipped steps); the few most recent are kept."""
        key = (num_steps, warmup or self.warmup, tuple(skip))
        if key not in self._programs:
            if len(self._programs) >= _PROGRAMS_KEPT:
                del self._programs[next(iter(self._programs))]
            self._programs[key] = build_program(
                num_steps, key[1], self.stride, self.n_components, self.transfers,
                time_shift=self.time_shift, stride_reuse=self.stride_reuse, skip=key[2],
            )
        return self._programs[key]

    def summary(self, num_steps=50):
        """The plan's figures as plain data (what `asyncdiff-rt plan --json` prints)."""
        g, loads, n = self.graph, self.partition.loads(self.graph), self.n_components
        total = sum(loads) + g.shared_flops
        ours = bytes_per_step(self.program(max(num_steps, self.warmup)), g, self.transfers)
        return {
            "n_components": self.n_components, "stride": self.stride, "warmup": self.warmup,
            "devices": self.n_devices, "partition": self.partition.strategy,
            "components": [
                {"units": list(paths), "modules": self.partition.compact(c, g.paths), "gflops": load / 1e9,
                 "share": load / total if total else 0.0}
                for c, (paths, load) in enumerate(zip(self.partition.components, loads))
            ],
            "shared_gflops": g.shared_flops / 1e9,
            "imbalance": max(loads) * len(loads) / sum(loads) if sum(loads) else 1.0,
            "num_steps": num_steps,
            "critical_path_steps": critical_path_steps(num_steps, self.warmup, self.stride),
            "ideal_speedup": ideal_speedup(num_steps, self.warmup, self.stride, loads, g.shared_flops),
            "ideal_speedup_formula": "K*(L+s) / (W*(L+s) + F*(max_c+s)); L = sum of component FLOPs, "
            "s = shared FLOPs every device repeats, F = asynchronous steps that run a forward",
            "weight_bytes_per_device": [g.device_weight_bytes(set(self.partition.components[min(d, n - 1)]))
                                        for d in range(self.n_devices)],
            "weight_bytes_whole": g.weight_bytes,
            "bytes_per_step": ours,
            "arguments_per_device": [list(a) for a in self.transfers.reads_arguments or ()],
            "broadcast_bytes_per_step": broadcast_bytes_per_step(g, self.partition, self.stride),
        }

    def __str__(self):
        return self.describe()

    def describe(self, num_steps=50):
        s = self.summary(num_steps)
        lines = [
            f"AsyncDiff plan: N={s['n_components']} S={s['stride']} W={s['warmup']} devices={s['devices']} "
            f"partition={s['partition']}"
        ]
        for c, comp in enumerate(s["components"]):
            lines.append(f"  component {c}: {comp['share']:6.1%} of FLOPs, {len(comp['units'])} units: "
                         + ", ".join(comp["modules"]))
        lines.append(f"  shared (every device): {s['shared_gflops']:.2f} GFLOP; imbalance {s['imbalance']:.3f}")
        lines.append(f"  ideal speedup at K={s['num_steps']}: {s['ideal_speedup']:.2f}x  [{s['ideal_speedup_formula']}]")
        for d, (ours, ref) in enumerate(zip(s["bytes_per_step"], s["broadcast_bytes_per_step"])):
            lines.append(f"  device {d} receives {ours / 2**20:8.2f} MiB/step (reference broadcast: {ref / 2**20:8.2f})")
        weights = " / ".join(f"{w / 2**30:.2f}" for w in s["weight_bytes_per_device"])
        lines.append(f"  weights per device: {weights} GiB (whole denoiser {s['weight_bytes_whole'] / 2**30:.2f} GiB)")
        residuals = [a for a in self.graph.arguments if "residual" in a]
        if residuals:  # a ControlNet's: it runs in the pipeline, on its device (the host)
            got = ", ".join(f"device {d}: {sum(a in residuals for a in reads)}"
                            for d, reads in enumerate(s["arguments_per_device"]))
            lines.append(f"  ControlNet residuals ({len(residuals)}): computed by the pipeline on its device each "
                         f"step; each device receives those its units read ({got})")
        return "\n".join(lines)


def make_plan(denoiser, make_inputs, n_components=2, stride=1, warmup=1, time_shift=False,
              partition="auto", stride_reuse="component", prune=True, agree=None):
    """Validate the settings, find the units and build the plan; no device work, except
    that partition="measured" times the units (`agree(times)`: the times every process
    of a distributed run uses, so that all make the same split)."""
    validate_settings(None, warmup, stride, n_components, stride_reuse, time_shift)
    graph = traced_units(denoiser, make_inputs)
    costs = None
    if partition == "measured":
        from .unit_times import measure_unit_times

        costs = measure_unit_times(denoiser, make_inputs, graph.paths)
        costs = agree(costs) if agree is not None else costs
    parts = resolve_partition(graph, n_components, partition, denoiser, costs)
    transfers = transfer_plan(graph, parts, stride, prune=prune)
    return Plan(graph, parts, stride, warmup, time_shift, stride_reuse, transfers)


def traced_units(denoiser, make_inputs):
    """`find_units`, once per (denoiser structure, input layout): a second plan of the same
    model at the same inputs (another N, another partition, another pipeline of it, its
    weights loaded again) costs no trace (structure.py)."""
    key = (structure(denoiser), _describe(make_inputs))
    if key in _TRACES:
        _TRACES.move_to_end(key)
    else:
        if len(_TRACES) >= _TRACES_KEPT:
            _TRACES.popitem(last=False)
        _TRACES[key] = find_units(denoiser, make_inputs)
    return _TRACES[key]


def _describe(make_inputs):
    """Shapes, dtypes and devices of the example inputs (and their other values)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        leaves = pytree.tree_leaves(make_inputs())
    return tuple((tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else repr(t)
                 for t in leaves)
