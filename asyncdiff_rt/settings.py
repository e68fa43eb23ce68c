"""The checks of `parallelize`'s settings, run before the trace (seconds) and any device
work, so that a mistake costs nothing and its message names the fix."""
import difflib
from typing import NamedTuple

import torch

from .engine import resolve_executor
from .engine.devices import check_visible, count_devices, parse_devices
from .partition import CHOICES, STRATEGIES, _normalise, upstream_table
from .schedule import validate_settings


class Settings(NamedTuple):
    """Checked settings in `parallelize`'s order, counts as Python ints and `executor`
    resolved ("auto" is gone), so they unpack straight back into its arguments."""

    n_components: int
    stride: int
    warmup: int
    time_shift: bool
    partition: object
    stride_reuse: str
    devices: object
    executor: str
    graphs: bool


def check_settings(denoiser, n_components, stride, warmup, time_shift, partition, stride_reuse,
                   devices, executor, graphs):
    """Settings, checked against `denoiser` without tracing it; ValueError or TypeError
    naming the problem and the fix. Checks that need the trace (a module that is no unit,
    more components than units, where the output unit is) stay in partition.py."""
    validate_settings(None, warmup, stride, n_components, stride_reuse, time_shift)
    # numpy ints pass the check; downstream code (and its isinstance checks) wants Python ints
    n_components, stride, warmup = int(n_components), int(stride), int(warmup)
    if not isinstance(graphs, bool):
        raise TypeError(f"graphs={graphs!r}: use True (replay CUDA graphs) or False (run every forward eagerly)")
    _check_partition(denoiser, partition, n_components)
    n_devices = n_components + stride - 1
    listed = count_devices(devices) if devices is not None else None  # refuses malformed entries
    if listed is not None and listed != n_devices:
        raise ValueError(
            f"devices {devices!r} names {listed} devices, but n_components={n_components} with stride={stride} "
            f"uses n_components + stride - 1 = {n_devices}; list {n_devices} devices (e.g. "
            f"'cuda:0*{n_devices}' for virtual devices on one GPU) or pass devices=None"
        )
    resolved = resolve_executor(executor, devices)  # refuses unknown names
    if resolved == "reference" and devices is not None:
        _check_reference_devices(denoiser, devices, executor)
    if resolved == "local" and devices is not None:
        check_visible(devices)  # (a distributed rank opens only its own entry)
    return Settings(n_components, stride, warmup, time_shift, partition, stride_reuse, devices, resolved, graphs)


def _check_reference_devices(denoiser, devices, requested):
    # The reference executor runs every device of the plan on the denoiser's own device:
    # a list naming others would be ignored without a word.
    own = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    foreign = [str(e) for e in parse_devices(devices) if e.device != own]
    if foreign:
        why = ("" if requested == "reference" else
               f"executor={requested!r} picks 'reference' for a device list that is not all GPUs, and ")
        raise ValueError(
            f"{why}the reference executor runs everything on the denoiser's device ({own}), so it would ignore "
            f"{', '.join(foreign)} in devices={devices!r}; drop devices= (or list only {own.type} devices) "
            f"or use executor='local' to run on them"
        )


def _check_partition(denoiser, partition, n_components):
    if isinstance(partition, str):
        if partition not in STRATEGIES:
            raise ValueError(f"partition={partition!r} is unknown; use {CHOICES}")
        if partition == "upstream":
            upstream_table(denoiser, n_components)  # the table is found by block structure, without a trace
        return
    if not isinstance(partition, (list, tuple)):
        raise TypeError(f"partition={partition!r}: use {CHOICES}")
    if len(partition) != n_components:
        raise ValueError(
            f"the explicit partition has {len(partition)} lists but n_components={n_components}; "
            "give one list of module paths per component"
        )
    modules = None  # every module path, for close matches; listed only on a miss
    for c, entries in enumerate(partition):
        if not isinstance(entries, (list, tuple)):
            raise TypeError(f"component {c} of the partition is {entries!r}; give a list of module paths, "
                            "e.g. ['conv_in', 'down_blocks.0']")
        for entry in entries:
            if not isinstance(entry, str):
                raise TypeError(f"partition entry {entry!r} (component {c}): give module paths as strings, "
                                "e.g. 'down_blocks.1' or 'up_blocks[1].attentions[2]'")
            if _has_module(denoiser, _normalise(entry)):
                continue
            if modules is None:
                modules = [name for name, _ in denoiser.named_modules() if name]
            near = difflib.get_close_matches(_normalise(entry), modules, n=3)
            hint = (f"did you mean {' or '.join(map(repr, near))}?" if near else
                    f"its top-level modules are {', '.join(n for n, _ in denoiser.named_children())}")
            raise ValueError(
                f"partition entry {entry!r} (component {c}) names no unit of this denoiser: it has no such "
                f"module; {hint} (`asyncdiff-rt plan` lists the units)"
            )
    _check_each_module_once(partition)


def _check_each_module_once(partition):
    """No empty component, no module listed twice (itself, or inside another listed one)."""
    seen = {}  # normalised path -> its component
    for c, entries in enumerate(partition):
        if not entries:
            raise ValueError(f"component {c} of the partition is empty; give every component at least one module")
        for entry in entries:
            path = _normalise(entry)
            for other, where in seen.items():
                if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                    raise ValueError(f"partition entry {entry!r} (component {c}) overlaps {other!r} (component "
                                     f"{where}); give each module to one component")
            seen[path] = c


def _has_module(denoiser, path):
    if not path:  # get_submodule("") is the denoiser itself, which is no unit
        return False
    try:
        denoiser.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_stages(denoiser, kernels, compile):
    """The forward's stages (engine/stages.py): `kernels` "auto", True or False; `compile`
    False, True or a torch.compile mode without CUDA graphs of its own. The denoiser must
    not be routed through the kernels already (their SiLU fusion ignores unit boundaries)."""
    from .engine.stages import COMPILE_MODES

    if kernels not in ("auto", True, False) or not isinstance(kernels, (str, bool)):
        raise ValueError(f"kernels={kernels!r}: use 'auto' (the Triton kernels where forwards replay CUDA graphs on "
                         "GPUs), True (wherever Triton runs) or False (torch's GroupNorm)")
    if not isinstance(compile, bool) and compile not in COMPILE_MODES:
        hint = (" captures CUDA graphs of its own, inside the executor's graph of each forward;"
                if compile in ("reduce-overhead", "max-autotune") else ":")
        raise ValueError(f"compile={compile!r}{hint} use False (eager units), True (torch.compile's default mode) "
                         f"or one of {COMPILE_MODES}")
    if kernels is True and compile is not False:
        raise ValueError(f"kernels=True with compile={compile!r}: the stages are not combined (the compiler makes "
                         "its own fused GroupNorm+SiLU); choose one, or leave kernels='auto', which steps aside for "
                         "compile")
    from .kernels import routed_module

    routed = routed_module(denoiser)
    if routed is not None:
        raise ValueError(f"{routed or 'the denoiser'} is routed through asyncdiff_rt.kernels (kernels.apply), whose "
                         "SiLU fusion does not know which outputs the runtime caches; call "
                         "asyncdiff_rt.kernels.remove() on it and pass kernels=True to parallelize instead")


def check_distributed(executor, process_group, timeout, transport=None):
    """The distributed executor's own settings: a process group and a transport only for
    it, and a positive timeout in seconds (how long a rank waits for a peer before raising)."""
    for name, value in (("process_group", process_group), ("transport", transport)):
        if value is not None and executor != "distributed":
            raise ValueError(f"{name}= is for executor='distributed' (got executor={executor!r}); "
                             f"pass executor='distributed' or drop {name}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout={timeout!r}: give the seconds a rank waits for a peer before raising, "
                         "a number > 0 (default 30)")
    if process_group is not None:
        import torch.distributed as dist

        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group={process_group!r}: give a torch.distributed ProcessGroup "
                            "(e.g. from dist.new_group(ranks)) or None")
