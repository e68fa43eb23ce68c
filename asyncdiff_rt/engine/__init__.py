"""Executors: they run a program and differ only in how they move tensors and launch work."""
from .reference import ReferenceExecutor

EXECUTORS = {"reference": ReferenceExecutor}


def make_executor(name, denoiser, plan, devices=None):
    """`name` is "auto" or a key of EXECUTORS; "auto" is the reference executor until the
    multi-device executors land. `devices`: the plan's devices (None: the denoiser's own);
    the reference executor runs on the denoiser's device whatever they are."""
    if name == "auto":
        name = "reference"
    if name not in EXECUTORS:
        raise ValueError(f"executor={name!r} is not available; choose 'auto' or one of {sorted(EXECUTORS)}")
    return EXECUTORS[name](denoiser, plan)
