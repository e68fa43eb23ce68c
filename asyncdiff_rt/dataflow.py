"""Dataflow: which cached unit outputs each device needs, and their bytes.

A device computes the units of its component; every other unit returns its cache.
So before a forward it needs exactly the cached outputs that reach its own units'
inputs, directly or through glue (the trace relabels at every unit output, so
`graph.reads` already stops at the nearest units).
"""
from .schedule import Forward, Send, SendLatent, TransferPlan
from .trace import LATENT


def transfer_plan(graph, partition, stride, prune=True):
    """The TransferPlan of a partition: pruned by the dataflow, or (`prune=False`) every
    unit a device does not compute itself, as a check that pruning changes nothing."""
    n = partition.n_components
    owner = partition.owner
    units = set(graph.paths)
    receives, reads_latent, arguments = [], [], []
    host = n + stride - 2
    for device in range(n + stride - 1):
        own = set(partition.components[min(device, n - 1)])
        if prune:
            needed = set().union(*(graph.reads[u] for u in own))
            if device == host:  # its output also takes what the glue after the last unit reads
                needed |= graph.output_reads
            reads_latent.append(LATENT in needed)
            arguments.append(tuple(sorted(label for label in needed if label in graph.arguments)))
            needed = (needed & units) - own
        else:
            reads_latent.append(True)
            arguments.append(tuple(sorted(graph.arguments)))
            needed = units - own
        receives.append(tuple(p for p in graph.paths if p in needed))
    emit_reads = tuple(p for p in graph.paths if p in graph.output_reads)
    return TransferPlan(owner=owner, receives=tuple(receives), reads_latent=tuple(reads_latent), emit_reads=emit_reads,
                        reads_arguments=tuple(arguments), known_arguments=frozenset(graph.arguments))


def bytes_per_step(program, graph, transfers):
    """Steady-state bytes each device receives per denoising step (steps >= W): caches,
    the latent, and the call arguments (conditioning, ControlNet residuals) its forwards read."""
    received = [0] * program.n_devices
    for step in program.steps[program.warmup :]:
        for ins in step.instructions:
            if isinstance(ins, Send):
                received[ins.dst] += graph.unit(ins.unit).nbytes
            elif isinstance(ins, SendLatent):
                received[ins.dst] += graph.latent_nbytes
            elif isinstance(ins, Forward):
                skipped = transfers.skipped_arguments(ins.device)
                received[ins.device] += sum(s.nbytes for a, s in graph.arguments.items() if a not in skipped)
    steps = max(program.num_steps - program.warmup, 1)
    return [r / steps for r in received]


def broadcast_bytes_per_step(graph, partition, stride):
    """What the reference code moves: every cache from its owner to every other device,
    and the prediction from the device that made it to all others (each runs its own
    scheduler). Stride 1 does it every step, stride 2 every other step."""
    n = partition.n_components
    eps = graph.unit(graph.output_unit).nbytes
    out = []
    for device in range(n + stride - 1):
        own = set(partition.components[device]) if device < n else set()
        caches = sum(u.nbytes for u in graph.units if u.path not in own)
        predictor = n - 1 if stride == 1 else n
        out.append((caches + (eps if device != predictor else 0)) / stride)
    return out
