"""Executors: they run a program and differ only in how they move tensors and launch work
(the step loop they share: step_loop.py)."""
from .devices import lists_gpus
from .local import LocalExecutor
from .reference import ReferenceExecutor
from .stages import EAGER


def _reference(denoiser, plan, devices=None, stages=EAGER):
    return ReferenceExecutor(denoiser, plan, stages=stages)  # on the denoiser's device, whatever the plan's devices


def _distributed(denoiser, plan, devices=None, **options):
    from .distributed import DistributedExecutor  # imported when used

    return DistributedExecutor(denoiser, plan, devices=devices, **options)


EXECUTORS = {"reference": _reference, "local": LocalExecutor, "distributed": _distributed}


def resolve_executor(name, devices=None):
    """The executor `name` stands for: "auto" is `local` when the listed devices are GPUs
    (or virtual devices on one), else `reference`."""
    if name == "auto":
        return "local" if lists_gpus(devices) else "reference"
    if not isinstance(name, str) or name not in EXECUTORS:  # isinstance first: a list is unhashable
        raise ValueError(f"executor={name!r} is not available; choose 'auto' or one of {sorted(EXECUTORS)}")
    return name


def make_executor(name, denoiser, plan, devices=None, **options):
    """`name` is "auto" or a key of EXECUTORS. `devices`: the plan's devices (None: the
    denoiser's own); the reference executor runs on the denoiser's device whatever they
    are. `options` go to the executor (local: graphs=True, backend=None; distributed:
    group, timeout_s=30.0, graphs=True, transport=None; each: stages, stages.py)."""
    return EXECUTORS[resolve_executor(name, devices)](denoiser, plan, devices=devices, **options)
