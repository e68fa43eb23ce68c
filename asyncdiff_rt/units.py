"""Units: the placeable blocks of a denoiser, in execution order, with outputs and costs."""
from dataclasses import dataclass, field
from itertools import chain

from .trace import trace_denoiser


@dataclass(frozen=True)
class Unit:
    path: str  # dotted module path inside the denoiser, e.g. "up_blocks.1.attentions.2"
    index: int  # position in execution order
    outputs: tuple  # TensorSpec per output tensor
    flops: int
    weight_bytes: int = 0  # its parameters and buffers
    ops: int = 0  # aten operators one forward runs (partition.py's CPU time estimate)
    elements: int = 0  # tensor elements those operators read and write

    @property
    def nbytes(self):
        return sum(spec.nbytes for spec in self.outputs)


@dataclass(frozen=True)
class UnitGraph:
    """The units of one denoiser and what each reads; the input of partition and dataflow."""

    units: tuple  # Unit, in execution order
    reads: dict  # unit path -> frozenset of unit paths and trace sources its inputs derive from
    output_reads: frozenset  # what the denoiser's output derives from
    latent_nbytes: int
    total_flops: int
    arguments: dict = field(default_factory=dict)  # argument label -> TensorSpec (arguments.py)
    read_outside: tuple = ()  # module paths inside units that code outside the unit calls
    weight_bytes: int = 0  # the whole denoiser's parameters and buffers
    outside_weight_bytes: dict = field(default_factory=dict)  # unit -> bytes of its `read_outside` parts

    @property
    def paths(self):
        return tuple(u.path for u in self.units)

    def unit(self, path):
        return self.units[self.paths.index(path)]

    @property
    def output_unit(self):
        """The last unit whose output reaches the denoiser's output (`conv_out` for a UNet)."""
        reaching = [u for u in self.units if u.path in self.output_reads]
        if not reaching:
            raise ValueError("the denoiser's output derives from no unit: nothing to split")
        return reaching[-1].path

    def device_weight_bytes(self, own):
        """Weights a device that computes the units `own` holds: the shared modules, its
        units, and the parts of other units that code outside them reads."""
        shared = self.weight_bytes - sum(u.weight_bytes for u in self.units)
        return shared + sum(u.weight_bytes if u.path in own else self.outside_weight_bytes.get(u.path, 0)
                            for u in self.units)

    @property
    def shared_flops(self):
        """Work every device repeats: shared modules (time, condition embeddings) and glue."""
        return max(self.total_flops - sum(u.flops for u in self.units), 0)


def find_units(denoiser, make_inputs):
    """List the units of `denoiser` from one hooked forward on fake tensors (see trace.py)."""
    trace = trace_denoiser(denoiser, make_inputs)
    calls = [c for c in trace.calls if c.is_unit]
    units = tuple(Unit(c.path, i, c.outputs, c.flops, _bytes(denoiser.get_submodule(c.path)), c.ops,
                       c.elements)
                  for i, c in enumerate(calls))

    return UnitGraph(
        units=units,
        reads={c.path: c.reads for c in calls},
        output_reads=trace.output_reads,
        latent_nbytes=trace.latent.nbytes,
        total_flops=trace.total_flops,
        arguments=trace.arguments,
        read_outside=trace.read_outside,
        weight_bytes=_bytes(denoiser),
        outside_weight_bytes={u.path: _bytes(*(denoiser.get_submodule(p) for p in trace.read_outside
                                                if p.startswith(u.path + "."))) for u in units},
    )


def _bytes(*modules):
    """Bytes of the distinct parameters and buffers of `modules` (on meta too: sizes only)."""
    seen = {}
    for module in modules:
        for t in chain(module.parameters(), module.buffers()):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
