"""The program: a static, per-step, per-device instruction stream (no torch here).

Every executor interprets the same program, so what is computed is fixed here, as
SEMANTICS.md defines it. Device d < N runs component d; with stride 2, device N (the
stride device) runs a second copy of component N-1. The last device is the *host*:
it holds the latent the pipeline steps and receives every prediction (eps).
"""
import numbers
from dataclasses import dataclass

STRIDE_REUSE = ("component", "previous")


@dataclass(frozen=True)
class Send:
    """Copy the owner's last committed output of `unit` into device `dst`'s cache.
    Placed before the Forward on `dst` that reads it, after the commit that made it."""

    unit: str
    src: int
    dst: int

    def __repr__(self):
        return f"Send({self.unit}: {self.src}->{self.dst})"


@dataclass(frozen=True)
class SendLatent:
    """Copy this step's latent x_k from the host to `dst`, whose units read it."""

    dst: int

    def __repr__(self):
        return f"SendLatent(->{self.dst})"


@dataclass(frozen=True)
class Forward:
    """Run the denoiser on `device` at timestep T[tau_index]: the units of the device's
    component are computed, every other unit returns the device's cached output.
    `device=None` is a warm-up forward: the whole denoiser, every unit computed.
    `commit`: each computed unit's output becomes its owner's cache entry."""

    device: object
    tau_index: int
    commit: bool

    def __repr__(self):
        where = "whole" if self.device is None else f"dev{self.device}"
        return f"Forward({where}, T[{self.tau_index}]{', commit' if self.commit else ''})"


@dataclass(frozen=True)
class Emit:
    """Hand this step's prediction to the pipeline. `source`:
    "forward": the output of this step's Forward on `device` (None: the warm-up forward);
    "cache": the denoiser's output assembled from the host's cache (a reuse step);
    "previous": the prediction of the step before (stride_reuse="previous")."""

    source: str
    device: object = None

    def __repr__(self):
        if self.source == "forward":
            return f"Emit({'whole' if self.device is None else f'dev{self.device}'})"
        return f"Emit({self.source})"


@dataclass(frozen=True)
class Step:
    index: int
    phase: str  # "warmup" | "async" (stride 1) | "compute" | "reuse" (stride 2) | "skip" (step cache)
    instructions: tuple

    def forwards(self):
        return [i for i in self.instructions if isinstance(i, Forward)]

    def emit(self):
        return next(i for i in self.instructions if isinstance(i, Emit))

    def run(self, handlers, executor):
        """Call `handlers[type(ins)](ins)` for each instruction in order: an executor's
        dispatch table. An instruction without a handler is an error, never skipped."""
        for ins in self.instructions:
            try:
                handler = handlers[type(ins)]
            except KeyError:
                raise TypeError(f"the {executor} executor cannot run {ins!r}") from None
            handler(ins)


@dataclass(frozen=True)
class TransferPlan:
    """What each device receives before each of its forwards (from dataflow.py)."""

    owner: dict  # unit -> component (= the device that commits it)
    receives: tuple  # per device: units whose cache it needs from their owners
    reads_latent: tuple  # per device: whether its units read the latent
    emit_reads: tuple  # units the denoiser's output is assembled from (reuse steps)
    reads_arguments: tuple = None  # per device: labels of the call arguments it needs (None: all)
    known_arguments: frozenset = frozenset()  # labels the trace saw (others always go everywhere)

    def skipped_arguments(self, device):
        """Labels of call arguments `device` does not need in its asynchronous forwards."""
        if self.reads_arguments is None:
            return frozenset()
        return self.known_arguments - set(self.reads_arguments[device])


@dataclass(frozen=True)
class Program:
    num_steps: int
    warmup: int
    stride: int
    n_components: int
    time_shift: bool
    stride_reuse: str
    steps: tuple
    skip: tuple = ()  # steps the step cache skips (step_cache.py)

    @property
    def n_devices(self):
        return self.n_components + self.stride - 1

    @property
    def host(self):
        return self.n_devices - 1

    def component_of(self, device):
        return min(device, self.n_components - 1)

    def __str__(self):
        head = (
            f"Program: K={self.num_steps} W={self.warmup} N={self.n_components} S={self.stride} "
            f"devices={self.n_devices} host=dev{self.host} time_shift={self.time_shift} "
            f"stride_reuse={self.stride_reuse}" + (f" skip={list(self.skip)}" if self.skip else "")
        )
        lines = [head]
        for step in self.steps:
            sends = [i for i in step.instructions if isinstance(i, (Send, SendLatent))]
            work = [repr(i) for i in step.instructions if isinstance(i, (Forward, Emit))]
            recv = f" | {len(sends)} sends" if sends else ""
            lines.append(f"  step {step.index:3d} {step.phase:7s} {' '.join(work)}{recv}")
        return "\n".join(lines)


def validate_settings(num_steps, warmup, stride, n_components, stride_reuse="component", time_shift=False):
    """Raise ValueError naming the fix for settings no program exists for. Counts may be
    any integer type (numpy's too) but not bools or floats: 2.0 == 2, yet it breaks later."""
    def integer(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not integer(n_components) or n_components < 1:
        raise ValueError(f"n_components={n_components!r}: use an integer >= 1")
    if not integer(stride) or stride not in (1, 2):
        raise ValueError(f"stride={stride!r}: use the integer 1 or 2 (AsyncDiff defines no other stride)")
    if not integer(warmup) or warmup < 1:
        raise ValueError(f"warmup={warmup!r}: use an integer >= 1 (the warm-up fills the cache)")
    if num_steps is not None and warmup > num_steps:
        raise ValueError(
            f"warmup={warmup} is more than the {num_steps} denoising steps of this call; "
            f"use warmup <= {num_steps} or more inference steps"
        )
    if stride_reuse not in STRIDE_REUSE:
        raise ValueError(f"stride_reuse={stride_reuse!r}: use one of {STRIDE_REUSE}")
    if not isinstance(time_shift, bool):
        raise ValueError(f"time_shift={time_shift!r}: use True or False")


def validate_skip(skip, num_steps, warmup, stride):
    """Raise ValueError naming the fix for a step-cache skip list no program has: a step
    out of range, in the warm-up, or (S = 2) a compute step without its reuse step."""
    for k in skip:
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise ValueError(f"step_cache skips {k!r}: list step indices as integers")
        if not 0 <= k < num_steps:
            raise ValueError(f"step_cache skips step {k}, but this call has {num_steps} steps (0..{num_steps - 1}); "
                             "list steps of the call, or calibrate the cache for this step count")
        if k < warmup:
            raise ValueError(f"step_cache skips step {k}, inside the warm-up (steps 0..{warmup - 1}): warm-up steps "
                             f"fill the caches and are never skipped; skip steps >= {warmup} or lower warmup")
    if stride == 2:
        # A skip replaces a whole compute+reuse pair: a reuse step reads what its compute step made.
        for k in skip:
            pair = k - (k - warmup) % 2
            if pair + 1 < num_steps and {pair, pair + 1} - set(skip):
                raise ValueError(f"step_cache skips step {k} but not both of the stride-2 pair {pair}, {pair + 1} "
                                 "(compute, reuse): with stride=2 skip whole pairs, or the last step alone")


def build_program(num_steps, warmup, stride, n_components, transfers, time_shift=False, stride_reuse="component",
                  skip=()):
    """`skip`: steps the step cache skips (SEMANTICS.md, step caches): nothing runs on any
    device, nothing is committed, and the step emits the prediction of the step before."""
    validate_settings(num_steps, warmup, stride, n_components, stride_reuse, time_shift)
    skip = tuple(sorted(set(skip)))
    validate_skip(skip, num_steps, warmup, stride)
    n_devices = n_components + stride - 1
    if len(transfers.receives) != n_devices:
        raise ValueError(f"the transfer plan covers {len(transfers.receives)} devices, the program {n_devices}")
    shift, host = int(time_shift), n_devices - 1

    def sends():
        out = []
        for dst, units in enumerate(transfers.receives):
            out += [Send(u, transfers.owner[u], dst) for u in units]
        out += [SendLatent(d) for d in range(n_devices) if transfers.reads_latent[d] and d != host]
        return out

    def last(phase, k):
        # Only the host's forward reaches the last prediction: nothing reads a commit after it.
        inputs = [i for i in sends() if i.dst == host]
        return Step(k, phase, (*inputs, Forward(host, k - shift, commit=False), Emit("forward", host)))

    steps = []
    for k in range(num_steps):
        if k in skip:
            steps.append(Step(k, "skip", (Emit("previous"),)))
        elif k < warmup:
            steps.append(Step(k, "warmup", (Forward(None, k, commit=k == warmup - 1), Emit("forward", None))))
        elif stride == 1:
            if k == num_steps - 1:
                steps.append(last("async", k))
                continue
            forwards = [Forward(d, k - shift, commit=True) for d in range(n_devices)]
            steps.append(Step(k, "async", (*sends(), *forwards, Emit("forward", host))))
        elif (k - warmup) % 2 == 0:
            if k == num_steps - 1:
                steps.append(last("compute", k))
                continue
            forwards = [Forward(d, k + 1 - shift, commit=True) for d in range(n_components)]
            forwards.append(Forward(host, k - shift, commit=False))
            steps.append(Step(k, "compute", (*sends(), *forwards, Emit("forward", host))))
        elif stride_reuse == "component":
            fetch = [Send(u, transfers.owner[u], host) for u in transfers.emit_reads]
            steps.append(Step(k, "reuse", (*fetch, Emit("cache", host))))
        else:
            steps.append(Step(k, "reuse", (Emit("previous"),)))
    return Program(num_steps, warmup, stride, n_components, time_shift, stride_reuse, tuple(steps), skip)


def critical_path_steps(num_steps, warmup, stride):
    """Steps that run a forward (warm-up or asynchronous): the critical path, in steps."""
    validate_settings(num_steps, warmup, stride, 1)
    rest = num_steps - warmup
    return warmup + (rest if stride == 1 else (rest + 1) // 2)



def ideal_speedup(num_steps, warmup, stride, loads, shared=0):
    """Sequential cost over asynchronous cost with a perfect overlap of transfers:
    K*(sum(loads)+shared) / (W*(sum(loads)+shared) + F*(max(loads)+shared)), F the
    asynchronous steps that run a forward."""
    whole = sum(loads) + shared
    forwards = critical_path_steps(num_steps, warmup, stride) - warmup
    return num_steps * whole / (warmup * whole + forwards * (max(loads) + shared))
