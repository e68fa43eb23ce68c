"""AsyncDenoiser: a drop-in module with the denoiser's call signature that runs the
AsyncDiff program.

It follows the step index through the scheduler's timesteps: a new generation starts
when the scheduler's `timesteps` tensor is a new object (every pipeline call runs
`set_timesteps`) or a call comes for a step before the current one; the first timestep
of a call locates its start in the list, so img2img and inpainting with strength < 1
work. Schedulers that count their steps (`step_index`) say which step a call belongs to;
for the others the timestep does.

Several calls within one step (Wan's or FLUX true CFG's separate guidance passes) are
*roles* (SEMANTICS.md): the r-th call of a step is role r, an asynchronous stream of its
own with its own executor state and caches (the executors of roles r > 0 share the
weights, streams and replicas of role 0's). A role first seen late, or called again
after it skipped steps, starts over with its warm-up.

What it guards, so that no call silently computes something else:
- a change to the denoiser after the executor was built (FreeU, processors, LoRA,
  weights, dtype) is found at the start of the next generation, and the plan and
  executor are built again from the changed denoiser (`rebuild`);
- a generation belongs to the thread that started it: another thread's call while it
  runs is refused (one generation at a time per parallelized denoiser);
- inputs that change shape within a generation (a callback that drops the
  unconditional half) restart that role's warm-up for the rest of it at the new shapes.
"""
import logging
import threading
from dataclasses import dataclass

import torch

from .engine.call import DenoiserCall, as_model_timestep
from .fingerprint import fingerprint, first_change
from .profiling.nvtx import RANGES

log = logging.getLogger(__name__)


@dataclass
class _Role:
    """One role's asynchronous stream: its executor, and the steps it has run."""

    executor: object
    offset: int = 0  # the step its program starts at
    last: int = None  # the step of its last call (None: not started in this generation)
    shapes: tuple = None


class AsyncDenoiser(torch.nn.Module):
    def __init__(self, denoiser, plan, executor, scheduler_source, rebuild=None):
        """`scheduler_source()`: the scheduler in use now; `rebuild(call)`: a new (plan,
        executor) for the denoiser as it is now, traced from `call` (None: a change is an
        error). `plan` and `executor` None: they are made from the first call."""
        super().__init__()
        self.denoiser = denoiser
        self.plan = plan
        self.executor = executor
        self._scheduler_source = scheduler_source
        self._rebuild = rebuild
        self._fingerprint = fingerprint(denoiser)
        self._lock = threading.RLock()
        self._owner = None  # the thread whose generation is running
        self._timesteps_seen = self._steps = None
        self._roles = [_Role(executor)] if executor is not None else []
        self.rebuilds = 0
        self.removed = False
        self._planned_from_call = False  # else from example inputs built for the model class
        self._generation_range = None  # the NVTX range of the running generation
        self.timeline = None  # profiling: what new executors record into
        self.step_cache = None  # a StepCache (step_cache.py): its skips are part of each program

    def __getattr__(self, name):
        # Pipelines read the denoiser's config, dtype, device, add_embedding, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("denoiser")  # absent while copying/unpickling
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args, **kwargs):
        if self.removed:  # held by a pipeline made from the parallelized one: plain denoiser
            return self.denoiser(*args, **kwargs)
        with self._lock:
            self._claim()
            try:
                return self._step(DenoiserCall(self.denoiser, args, kwargs))
            except BaseException:
                self._owner = None  # the generation ended with the error
                raise

    def reset(self):
        """Abandon the running generation (e.g. one a caller interrupted), whichever
        thread started it; the next call starts a new one."""
        with self._lock:
            self._owner, self._timesteps_seen, self._steps = None, None, None

    def set_step_cache(self, step_cache):
        """Use `step_cache` from the next generation on; refused while one runs (its
        program is fixed when it starts, the same on every device)."""
        with self._lock:
            if self._owner is not None and self._owner.is_alive():
                raise RuntimeError(f"a generation is running (step {self._k} of {self._num_steps}); set the step "
                                   "cache between generations (or call handle.reset() after an interrupted one)")
            self.step_cache = step_cache

    def record(self, timeline):
        """Every role's executor records into `timeline` (None: stop); later ones too."""
        self.timeline = timeline
        for role in self._roles:
            role.executor.timeline = timeline

    def close(self):
        """Close every role's executor (role 0's last: the others share its resources)."""
        for role in reversed(self._roles):
            role.executor.close()
        self._roles = []

    def _claim(self):
        me, owner = threading.current_thread(), self._owner
        if owner is not None and owner is not me and owner.is_alive():
            raise RuntimeError(
                f"this parallelized denoiser is running a generation for thread {owner.name!r} (step {self._k} of "
                f"{self._num_steps}); it runs one generation at a time. Serialise the pipeline calls (a lock "
                "around pipe(...)) or parallelize one pipeline per thread; if that generation was abandoned, "
                "call handle.reset() first")
        self._owner = me

    def _step(self, call):
        scheduler = self._scheduler_source()
        if self._steps is None or (scheduler.timesteps is not self._timesteps_seen
                                   and not self._continues(scheduler, call)):
            self._begin(scheduler, call)
        k = self._locate(scheduler, call)
        if k is None:  # a step before the current one, or past the end: a new generation on the same list
            self._begin(scheduler, call)
            k = self._locate(scheduler, call)
        index = self._role + 1 if k == self._k else 0
        role = self._role_at(index, k, call)
        out = role.executor.step(k - role.offset, call)
        role.last, self._k, self._role = k, k, index
        if k == self._num_steps - 1:
            self._owner = None  # the last step: the next call may start a generation of another thread
            if index == len(self._roles) - 1:  # the last role of the last step
                RANGES.end(self._generation_range)
                self._generation_range = None
        return out

    def _locate(self, scheduler, call):
        """The step this call belongs to (the current one: another role; the next one), or
        None when it cannot continue this generation."""
        if hasattr(type(scheduler), "step_index"):
            index = scheduler.step_index
            k = 0 if index is None else index - self._begin_at
        else:
            k = self._k if self._k >= 0 and self._is_timestep_at(call, self._k) else self._k + 1
        if not self._k <= k < self._num_steps:
            return None
        if k > self._k + 1 or not self._is_timestep_at(call, k):
            raise RuntimeError(
                f"the denoiser was called with timestep {call.scheduler_value()} for step {k} of this generation, "
                f"where the scheduler's list has {self._values[k]}; AsyncDiff follows the scheduler step by step, "
                "from the pipeline it was parallelized on (a pipeline made from it with from_pipe or "
                "**pipe.components and its own scheduler must not share its denoiser: give it handle.original)")
        return k

    def _is_timestep_at(self, call, k):
        # Most pipelines pass the scheduler's own element (or a view of it): comparing
        # storage reads nothing. A GPU value that is no such view is taken by call order:
        # reading it would block the host every step.
        timestep, expected = call.timestep, self._steps[k]
        if isinstance(timestep, torch.Tensor):
            if timestep.data_ptr() == expected.data_ptr():
                return True
            if timestep.device.type != "cpu":
                return k != self._k  # by order: a new step, unless its counter says otherwise
        return _is_model_timestep(call, self._values[k])

    def _role_at(self, index, k, call):
        """Role `index`'s stream, (re)started when it is new in this generation, skipped a
        step, or its inputs changed shape."""
        while len(self._roles) <= index:
            self._roles.append(_Role(self.executor.sibling()))
        role = self._roles[index]
        if role.last is None or role.last != k - 1 or call.shapes() != role.shapes:
            if role.last is not None or k > 0:
                log.info("role %d starts (or restarts its warm-up) at step %d", index, k)
            left = self._num_steps - k
            # A stream restarted part-way has a new warm-up (and stride pairs): it runs without skips.
            skip = self.step_cache.skip if self.step_cache is not None and k == 0 else ()
            program = self.plan.program(left, warmup=min(self.plan.warmup, left) if k else None, skip=skip)
            role.executor.start(program, self._steps[k:])
            role.offset, role.shapes = k, call.shapes()
        return role

    def _continues(self, scheduler, call):
        """Whether a call whose scheduler has a new timesteps list still continues the
        running generation: another caller set the same list again (e.g. a refused
        thread), and this is the step expected next. A new generation starts at its
        first timestep (or at the scheduler's begin index)."""
        begin = getattr(scheduler, "begin_index", None)
        if self._k <= 0 or begin not in (None, self._begin_index):
            return False
        if self._list_values(scheduler) != self._all_values:
            return False
        if not any(_is_model_timestep(call, self._values[k]) for k in (self._k, self._k + 1) if k < self._num_steps):
            return False
        self._timesteps_seen = scheduler.timesteps
        return True

    def _list_values(self, scheduler):
        return [float(v) for v in scheduler.timesteps.tolist()]  # a host read: once per new list

    def _begin(self, scheduler, call):
        self._follow_changes(call)
        timesteps = scheduler.timesteps
        values = self._list_values(scheduler)
        start = self._begin_index = getattr(scheduler, "begin_index", None)
        if start is None:
            first = call.scheduler_value()
            start = min(range(len(values)), key=lambda i: abs(values[i] - first))
            if not _is_model_timestep(call, values[start]):
                raise RuntimeError(
                    f"timestep {first} is not in the timesteps of the scheduler of the pipeline this denoiser "
                    "was parallelized on; call it with that scheduler's own timesteps (a pipeline made from it "
                    "with from_pipe or **pipe.components and its own scheduler must not share its UNet: give "
                    "it handle.original)")
        self._timesteps_seen, self._all_values, self._begin_at = timesteps, values, start
        self._steps, self._values, self._num_steps = timesteps[start:], values[start:], len(values) - start
        self._k, self._role = -1, -1
        for role in self._roles:
            role.last = None
        self.executor.stats.generations += 1
        RANGES.end(self._generation_range)  # an abandoned one ends here
        self._generation_range = RANGES.start(f"generation {self.executor.stats.generations}")

    def _follow_changes(self, call):
        """Make the plan and executor at the first call when they wait for it; make them
        again if the denoiser changed since, or if the call passes tensor arguments the
        plan has not seen (e.g. ControlNet residuals the example inputs lacked: planned
        from the call, each device is sent only the arguments its units read)."""
        now = fingerprint(self.denoiser)
        old, source = self.executor, call
        if old is not None:
            if now != self._fingerprint:
                what = first_change(self._fingerprint, now)
                if self._rebuild is None:
                    raise RuntimeError(f"the denoiser changed after its executor was built ({what}); build a new one")
                log.info("the denoiser changed after parallelize (%s): planning it again", what)
                self.rebuilds += 1
                source = call if self._planned_from_call else None  # the same inputs: the same partition
            elif call.argument_labels() <= self.plan.graph.arguments.keys():
                return
            else:
                log.info("the call passes arguments the plan has not seen: planning from the call")
            self.plan = self.executor = None  # a failed rebuild leaves nothing half-made
            self.close()
        self.plan, self.executor = self._rebuild(source)
        self._roles = [_Role(self.executor)]
        self.executor.timeline = self.timeline
        self._planned_from_call = source is not None
        if old is not None:
            self.executor.stats.absorb(old.stats)
        self._fingerprint = fingerprint(self.denoiser)


def _is_model_timestep(call, value):
    """Whether the call's timestep is scheduler timestep `value` as its pipeline hands it
    to the model (cast, divided: adapters.py), compared exactly in the model's dtype."""
    timestep = call.timestep
    first = timestep.flatten()[:1] if isinstance(timestep, torch.Tensor) else timestep
    expected = as_model_timestep(value, first, call.adapter.timestep_divisor)
    return _scalar(expected) == _scalar(first)


def _scalar(t):
    return t.flatten()[0].item() if isinstance(t, torch.Tensor) else t
