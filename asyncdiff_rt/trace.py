"""One hooked forward of a denoiser on fake tensors: which modules run, in what order,
what each one reads (provenance through the glue between them), its outputs and FLOPs.

Nothing is computed: real weights are wrapped as fake tensors (meta weights are used as
they are), so tracing SDXL at 1024 px costs seconds and no memory. `units.py` and
`dataflow.py` read the result.
"""
import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .adapters import adapter_for
from .arguments import labelled_leaves, other_arguments
from .stacking import hooks_bypassed

LATENT, TIMESTEP, COND = "<latent>", "<timestep>", "<cond>"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self):
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ModuleCall:
    """A candidate module as it ran: `reads` holds the sources its inputs derive from."""

    path: str
    order: int
    reads: frozenset
    outputs: tuple
    flops: int
    is_unit: bool
    ops: int = 0  # aten operators it ran (the CPU time estimate counts them: partition.py)
    elements: int = 0  # tensor elements those operators read and wrote


@dataclass(frozen=True)
class Trace:
    calls: tuple  # ModuleCall in execution order (first call)
    output_reads: frozenset  # sources of the denoiser's output
    latent: TensorSpec
    arguments: dict  # label (arguments.py) -> TensorSpec of each tensor argument but latent and timestep
    total_flops: int
    read_outside: tuple = ()  # parts of candidates that code outside them calls: their weights stay everywhere


def candidate_modules(denoiser):
    """Placeable modules by structure: the root's own children, except that blocks held
    in the root's module lists are split into the layers of their own module lists
    (resnets, attentions, samplers) when those lists are all they hold."""
    found = {}
    for name, child in denoiser.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            for index, block in child.named_children():
                found.update(_split_block(f"{name}.{index}", block))
        elif any(True for _ in child.parameters()):
            found[name] = child
    return found


def _split_block(path, block):
    lists = [(n, c) for n, c in block.named_children() if isinstance(c, torch.nn.ModuleList)]
    others = [c for n, c in block.named_children() if not isinstance(c, torch.nn.ModuleList)]
    if not lists or any(any(True for _ in c.parameters()) for c in others):
        return {path: block}
    return {f"{path}.{n}.{i}": layer for n, lst in lists for i, layer in lst.named_children()}


class _Provenance(TorchFunctionMode):
    """Labels every tensor with the sources it was computed from."""

    def __init__(self):
        super().__init__()
        self.labels = {}
        self._alive = []  # keeps labelled tensors alive so their ids stay unique

    def sources(self, obj):
        out = frozenset()
        for leaf in pytree.tree_leaves(obj):
            if isinstance(leaf, torch.Tensor):
                out |= self.labels.get(id(leaf), frozenset())
        return out

    def mark(self, obj, sources):
        for leaf in pytree.tree_leaves(obj):
            if isinstance(leaf, torch.Tensor):
                self.labels[id(leaf)] = sources
                self._alive.append(leaf)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        sources = self.sources((args, kwargs))
        if sources:
            self.mark(out, sources)
        return out


def _specs(obj):
    return tuple(
        TensorSpec(tuple(t.shape), t.dtype) for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)
    )


class TraceError(RuntimeError):
    """The denoiser's forward failed on the trace's inputs (e.g. example inputs that miss
    an argument this model class needs)."""


class _OpCounts(TorchDispatchMode):
    """How many aten operators each running candidate (and the candidates around it) ran,
    and how many tensor elements they read and wrote: on a CPU an operator costs time
    whatever its FLOPs (dispatch, a pass over memory)."""

    def __init__(self, running):
        super().__init__()
        self.running, self.ops, self.elements = running, {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.running:
            n = sum(t.numel() for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            for path in set(self.running):
                self.ops[path] = self.ops.get(path, 0) + 1
                self.elements[path] = self.elements.get(path, 0) + n
        return out


@contextlib.contextmanager
def _quiet_fake_tensors():
    """Fake-tensor dispatch logs every op it cannot run before the error surfaces; the
    error itself says enough."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _all_meta(denoiser):
    return all(t.device.type == "meta" for t in (*denoiser.parameters(), *denoiser.buffers()))


def _on_meta(inputs):
    """The example inputs of meta weights on the meta device: one made elsewhere would
    otherwise compute for real."""
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, inputs)


def trace_denoiser(denoiser, make_inputs):
    """Run `denoiser(*args, **kwargs)` once on fake tensors with hooks.

    `make_inputs()` is called inside the fake mode and returns (latent, timestep, cond_args,
    cond_kwargs); the call passes the latent and timestep by the names adapters.py gives.
    A candidate whose inputs derive from the latent or from a unit is a unit; the rest
    (time and condition embeddings) are shared and keep their inputs' labels.
    """
    candidates = candidate_modules(denoiser)
    root = type(denoiser).__name__
    adapter = adapter_for(denoiser)
    prov, pending, calls, units = _Provenance(), {}, {}, set()
    running, outside = [], set()  # candidates whose forward is running; their parts run outside them

    def pre_hook(path):
        def hook(module, args, kwargs):
            pending[path] = prov.sources((args, kwargs))
            running.append(path)

        return hook

    def part_hook(owner, path):
        def hook(module, args):
            if owner not in running:  # e.g. DiT's forward calls transformer_blocks[0].norm1.emb itself
                outside.add(path)

        return hook

    def post_hook(path):
        def hook(module, args, kwargs, output):
            running.remove(path)
            reads = pending.pop(path)
            is_unit = LATENT in reads or bool(reads & units)
            if path not in calls:
                calls[path] = (len(calls), reads, _specs(output), is_unit)
            if is_unit:
                units.add(path)
                prov.mark(output, frozenset([path]))

        return hook

    handles = []
    for path, module in candidates.items():
        handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))
        for name, part in module.named_modules(prefix=path):
            if part is not module:
                handles.append(part.register_forward_pre_hook(part_hook(path, name)))
    try:
        # The user's step-cache hooks are bypassed: fake tensors must never reach their state.
        # Meta weights (a named model's plan) compute nothing already and dispatch 2-5x faster
        # without fake tensors; their operators are not counted either (only "auto" on a CPU
        # reads the counts: partition.estimated_costs).
        meta = _all_meta(denoiser)
        fake = contextlib.nullcontext() if meta else FakeTensorMode(allow_non_fake_inputs=True)
        op_counts = _OpCounts(running)
        counting = contextlib.nullcontext() if meta else op_counts
        with torch.no_grad(), hooks_bypassed(denoiser), fake, _quiet_fake_tensors():
            latent, timestep, cond_args, cond_kwargs = _on_meta(make_inputs()) if meta else make_inputs()
            with FlopCounterMode(display=False) as counter, prov, counting:
                prov.mark(latent, frozenset([LATENT]))
                prov.mark(timestep, frozenset([TIMESTEP]))
                arguments = _label_arguments(prov, denoiser, latent, timestep, cond_args, cond_kwargs)
                named = {adapter.latent: latent, adapter.timestep: timestep}
                try:
                    output = denoiser(*cond_args, **named, **cond_kwargs)
                except Exception as e:
                    raise TraceError(f"{root} did not run on these inputs ({type(e).__name__}: {e})") from e
            output_reads = prov.sources(output)
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts()
    flops = {p: sum(counts.get(f"{root}.{p}", {}).values()) for p in calls}
    ordered = sorted(calls.items(), key=lambda kv: kv[1][0])
    return Trace(
        calls=tuple(
            ModuleCall(p, order, reads, outs, flops[p], is_unit, op_counts.ops.get(p, 0),
                       op_counts.elements.get(p, 0))
            for p, (order, reads, outs, is_unit) in ordered
        ),
        output_reads=output_reads,
        latent=TensorSpec(tuple(latent.shape), latent.dtype),
        arguments=arguments,
        read_outside=tuple(sorted(outside)),
        total_flops=sum(counts.get("Global", {}).values()),
    )


def _label_arguments(prov, denoiser, latent, timestep, cond_args, cond_kwargs):
    """Mark each tensor argument with its own label (and COND); {label: TensorSpec}."""
    adapter = adapter_for(denoiser)
    bound = inspect.signature(denoiser.forward).bind(
        *cond_args, **{adapter.latent: latent, adapter.timestep: timestep}, **cond_kwargs)
    out = {}
    for label, leaf in labelled_leaves(other_arguments(bound.arguments, adapter.latent, adapter.timestep)):
        if isinstance(leaf, torch.Tensor):
            prov.mark(leaf, frozenset([COND, label]))
            out[label] = TensorSpec(tuple(leaf.shape), leaf.dtype)
    return out


def unet_inputs(denoiser, batch=2, height=None, width=None, text_len=77):
    """A `make_inputs` for a diffusers `UNet2DConditionModel`-like denoiser, from its config.

    `height`/`width` are in latent pixels (default: the config's `sample_size`). The
    builders live in example_inputs.py: a known diffusers class (also the video UNets, at
    their default frame counts) gets its own, anything else the UNet2DConditionModel-style
    one, which needs `in_channels`, `sample_size` and `cross_attention_dim` in its config.
    """
    from .example_inputs import _known_class, example_inputs, unet2d_inputs

    if _known_class(denoiser) is not None:
        return example_inputs(denoiser, batch=batch, height=height, width=width, text_len=text_len)
    return unet2d_inputs(denoiser, batch=batch, height=height, width=width, text_len=text_len)
