"""Measured unit times, for `partition="measured"`: FLOPs predict a unit's time badly
where per-operator overhead dominates (small models, the CPU, small batches), and a
component of many small units then runs longer than its FLOP share says.

The denoiser runs on random inputs shaped like the plan's example, where it is, and
each unit's forward is timed (on a GPU the device is synchronised around each unit,
so the times are its kernels' own). The median of a few runs after one warm-up run.
"""
import statistics
import time

import torch
import torch.utils._pytree as pytree


def measure_unit_times(denoiser, make_inputs, paths, repeats=3):
    """Seconds per call of each unit in `paths` (a list in that order)."""
    device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    if device.type == "meta":
        raise ValueError('partition="measured" times the units, but this denoiser has no weights (meta '
                         'tensors); load its weights first or use partition="auto"')
    latent, timestep, args, kwargs = pytree.tree_map(lambda v: _random_like(v, device), make_inputs())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    samples, started, handles = {p: [] for p in paths}, {}, []

    def before(path):
        def hook(*_):
            sync()
            started[path] = time.perf_counter()
        return hook

    def after(path):
        def hook(*_):
            sync()
            samples[path].append(time.perf_counter() - started.pop(path))
        return hook

    for path in paths:
        module = denoiser.get_submodule(path)
        # outermost: the time includes any hooks the unit already has
        handles += [module.register_forward_pre_hook(before(path), prepend=True),
                    module.register_forward_hook(after(path))]
    try:
        with torch.no_grad():
            for run in range(repeats + 1):
                if run == 1:  # the first run pays one-off costs (allocations, kernel selection)
                    for times in samples.values():
                        times.clear()
                denoiser(latent, timestep, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [statistics.median(samples[p]) if samples[p] else 0.0 for p in paths]


def _random_like(value, device):
    """A real tensor for an example input (the example may be fake or uninitialised):
    normal noise for floating point, zeros for integers (token ids, labels)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype.is_floating_point:
        return torch.randn(value.shape, generator=torch.Generator().manual_seed(0)).to(device, value.dtype)
    return torch.zeros(value.shape, dtype=value.dtype, device=device)
