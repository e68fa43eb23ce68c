"""AsyncDenoiser: a drop-in module with the denoiser's call signature that runs the
AsyncDiff program, one denoiser call per step.

It follows the step index through the scheduler's timesteps: a new generation starts
when the scheduler's `timesteps` tensor is a new object (every pipeline call runs
`set_timesteps`) or the last one finished; the first timestep of a call locates its
start in the list, so img2img and inpainting with strength < 1 work.

What it guards, so that no call silently computes something else:
- a change to the denoiser after the executor was built (FreeU, processors, LoRA,
  weights, dtype) is found at the start of the next generation, and the plan and
  executor are built again from the changed denoiser (`rebuild`);
- a generation belongs to the thread that started it: another thread's call while it
  runs is refused (one generation at a time per parallelized denoiser);
- inputs that change shape within a generation (a callback that drops the
  unconditional half) restart the warm-up for the rest of it at the new shapes.
"""
import logging
import threading

import torch

from .engine.call import DenoiserCall, as_model_timestep
from .fingerprint import fingerprint, first_change

log = logging.getLogger(__name__)


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
        self._timesteps_seen = None
        self._k = self._num_steps = 0
        self.rebuilds = 0
        self.removed = False
        self._planned_from_call = False  # else from example inputs built for the model class

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
            self._owner, self._timesteps_seen, self._k = None, None, self._num_steps

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
        if self._k >= self._num_steps or (scheduler.timesteps is not self._timesteps_seen
                                          and not self._continues(scheduler, call)):
            self._begin(scheduler, call)
        elif call.shapes() != self._shapes:
            log.info("denoiser inputs changed shape at step %d: the warm-up restarts for the rest of the "
                     "generation", self._k)
            self._start(self._steps, self._values, self._k, call)
        self._check_position(scheduler)
        if not self._is_current_timestep(call):
            raise RuntimeError(
                f"denoiser call {self._k} of this generation got timestep {call.scheduler_value()}, but the "
                f"scheduler's list has {self._values[self._k]} there; AsyncDiff needs one denoiser call per "
                "scheduler timestep, in order, from the pipeline it was parallelized on (a pipeline made from it "
                "with from_pipe or **pipe.components and its own scheduler must not share its UNet: give it "
                "handle.original)")
        out = self.executor.step(self._k - self._offset, call)
        self._k += 1
        if self._k == self._num_steps:
            self._owner = None
        return out

    def _check_position(self, scheduler):
        """Schedulers that count their steps say which step this call belongs to: a second
        call within one step (separate guidance passes) must not pass for the next step."""
        if not hasattr(type(scheduler), "step_index"):
            return
        index = scheduler.step_index
        at = 0 if index is None else index - self._begin_at
        if at == self._k - 1:
            raise RuntimeError(
                f"the pipeline called the denoiser twice in scheduler step {at} (separate guidance passes, as Wan "
                "or FLUX true CFG make); AsyncDiff needs one call per step: per-pass caches are not built yet, so "
                "batch both passes into one call or run this pipeline without parallelize")
        if at != self._k:
            raise RuntimeError(f"the scheduler is at step {at} of this generation but the denoiser was called for "
                               f"step {self._k}; AsyncDiff needs one denoiser call per scheduler step, in order")

    def _is_current_timestep(self, call):
        # Most pipelines pass the scheduler's own element (or a view of it): comparing
        # storage reads nothing. A GPU value is taken by call order: reading it would
        # block the host every step.
        timestep, expected = call.timestep, self._steps[self._k]
        if isinstance(timestep, torch.Tensor):
            if timestep.data_ptr() == expected.data_ptr() or timestep.device.type != "cpu":
                return True
        return _is_model_timestep(call, self._values[self._k])

    def _continues(self, scheduler, call):
        """Whether a call whose scheduler has a new timesteps list still continues the
        running generation: another caller set the same list again (e.g. a refused
        thread), and this is the step expected next. A new generation starts at its
        first timestep (or at the scheduler's begin index)."""
        begin = getattr(scheduler, "begin_index", None)
        if self._k == 0 or begin not in (None, self._begin_index):
            return False
        if self._list_values(scheduler) != self._all_values or not _is_model_timestep(call, self._values[self._k]):
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
        self._start(timesteps[start:], values[start:], 0, call)
        self.executor.stats.generations += 1

    def _start(self, steps, values, offset, call):
        """Run steps[offset:] as a program of their own (a generation, or its rest after a
        change of shapes): warm-up first, at most as long as the steps left."""
        left = len(steps) - offset
        program = self.plan.program(left, warmup=min(self.plan.warmup, left) if offset else None)
        self._steps, self._values, self._num_steps, self._k, self._offset = steps, values, len(steps), offset, offset
        self._shapes = call.shapes()
        self.executor.start(program, steps[offset:])

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
            old.close()
        self.plan, self.executor = self._rebuild(source)
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
