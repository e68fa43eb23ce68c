"""AsyncDenoiser: a drop-in module with the denoiser's call signature that runs the
AsyncDiff program.

It follows the step index through the scheduler's timesteps. Pipelines pass the model an
element of the timesteps list their loop runs over (a view of it): that list is the
generation the call belongs to, and the element's position in it is the step, also where
a scheduler repeats a timestep (Heun, PNDM). A timestep that is no such view (FLUX's
t/1000) is placed by the scheduler's own count (`step_index`, PNDM's `counter`) or, where
it keeps none, by its value in call order; then a new generation starts when the
scheduler's `timesteps` tensor is a new object (every pipeline call runs `set_timesteps`)
that the call does not continue, or a call comes for a step before the current one. The
first step of a call locates its start in the list, so img2img and inpainting with
strength < 1 work.

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
  runs is refused (one generation at a time per parallelized denoiser) and touches none
  of its state. The refused pipeline call has already run `set_timesteps` on the shared
  scheduler, though: the running generation goes on only where that left what its
  scheduler steps with as it was (the same timesteps, no step count or history to
  reset: DDIM, DDPM), and raises otherwise rather than step a scheduler it lost;
- inputs that change shape within a generation (a callback that drops the
  unconditional half) restart that role's warm-up for the rest of it at the new shapes.
"""
import logging
import threading
from dataclasses import dataclass

import torch

from .engine.call import DenoiserCall, as_model_timestep
from .fingerprint import Watch
from .profiling.nvtx import RANGES
from .stacking import cache_hooks, check_steps, stack_signature

log = logging.getLogger(__name__)


_STEP_STATE = frozenset(("_k", "_role", "_owner"))


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
        self._watch = Watch(denoiser)  # its fingerprint, and a quick test that it holds
        self._cache_hooks = None  # cache_hooks(denoiser) while the fingerprint holds (None: not known)
        self._lock = threading.RLock()
        self._owner = None  # the thread whose generation is running
        self._timesteps_seen = self._steps = self._checked_list = None
        self._roles = [_Role(executor)] if executor is not None else []
        self.rebuilds = 0
        self.removed = False
        self._planned_from_call = False  # else from example inputs built for the model class
        self._generation_range = None  # the NVTX range of the running generation
        self.timeline = None  # profiling: what new executors record into
        self.step_cache = None  # a StepCache (step_cache.py): its skips are part of each program

    def __setattr__(self, name, value):
        if name in _STEP_STATE:  # set at every step: plain attributes, not nn.Module's (microseconds each)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name):
        # Pipelines read the denoiser's config, dtype, device, add_embedding, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("denoiser")  # absent while copying/unpickling
            if inner is None:
                raise
            return getattr(inner, name)

    # Code that treats the wrapper as the denoiser (checkpoint converters, LoRA loaders,
    # state-dict surgery) names its state with the denoiser's own keys, not "denoiser.*".
    # A load changes the denoiser in place: the next generation's fingerprint finds it.
    def state_dict(self, *args, **kwargs):
        return self.denoiser.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.denoiser.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(self, *args, **kwargs):  # parameters() too
        return self.denoiser.named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):  # buffers() too
        return self.denoiser.named_buffers(*args, **kwargs)

    def named_modules(self, *args, **kwargs):  # modules() too; children() stay the wrapper's: the denoiser
        return self.denoiser.named_modules(*args, **kwargs)

    # torch.compile of the wrapper (torch.compile(pipe.transformer) after parallelize) must
    # not trace the executor's program: it runs as it would uncompiled.
    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        if self.removed:  # held by a pipeline made from the parallelized one: plain denoiser
            return self.denoiser(*args, **kwargs)
        if self.__dict__.get("_compiled_call_impl") is not None:
            raise RuntimeError("a parallelized denoiser cannot be compiled in place (.compile() after parallelize): "
                               "it runs the executor's program, not one forward. Undo it "
                               "(handle.denoiser._compiled_call_impl = None) or parallelize the uncompiled pipeline")
        with self._lock:
            self._claim()
            try:
                return self._step(DenoiserCall(self.denoiser, args, kwargs))
            except BaseException:
                self._owner = None  # the generation ended with the error
                raise

    def running(self):
        """Whether a generation has started and not ended."""
        return self._owner is not None

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
        if self._steps is None or not self._continues(scheduler, call):
            self._begin(scheduler, call)
        k = self._locate(scheduler, call)
        if k is None:  # a step before the current one, or past the end: a new generation on the same list
            self._begin(scheduler, call)
            k = self._locate(scheduler, call)
        if stack_signature(self.denoiser) != self._stack:
            self.reset()  # the next call starts a generation, planned again with the change
            raise RuntimeError(
                f"a step cache or LoRA adapter of the denoiser was enabled, loaded or removed within this generation "
                f"(before step {k}): diffusers applies it at once, under caches computed without it. Make the "
                "change between generations: the next one plans again with it")
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
        index = _index_of(call, self._timesteps_seen)
        if index is not None:  # the element the pipeline's loop passed: its position is the step
            k = index - self._begin_at
        elif (counted := _counted_step(scheduler, self._begin_at)) is not None:
            k = counted
        else:
            k = self._k if self._k >= 0 and self._is_timestep_at(call, self._k) else self._k + 1
        if not self._k <= k < self._num_steps:
            return None
        if k > self._k + 1 or not self._is_timestep_at(call, k):
            raise RuntimeError(self._out_of_order(call, k))
        return k

    def _out_of_order(self, call, k):
        """Why a call does not fit step `k`: a timestep the scheduler does not list comes from
        another scheduler (a derived pipeline's own); a listed one out of turn, from a loop
        that skips or repeats steps the scheduler does not count."""
        value = call.scheduler_value()
        where = (f"the denoiser was called with timestep {value} for step {k} of this generation, where the "
                 f"scheduler's list has {self._values[k]}")
        if not any(_is_model_timestep(call, v) for v in self._values):
            return (f"{where}, and {value} is not in that list: the call comes from a pipeline with another "
                    "scheduler (one made with from_pipe or **pipe.components and a scheduler of its own must not "
                    "share this denoiser: give it handle.original)")
        if k > self._k + 1:
            return f"{where}, after step {self._k}: a step was skipped; AsyncDiff needs every step, in order"
        return (f"{where}: the calls do not follow the list in order, and the scheduler has no step counter "
                "(`step_index`) that says which step a repeated timestep belongs to; call the denoiser once per "
                "entry of the scheduler's timesteps, in order, passing that entry")

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
        """Whether the call belongs to the running generation. The element the pipeline's
        loop passes says which list it runs over: the generation's (then it continues,
        whatever another caller has since set on the shared scheduler) or the scheduler's
        new one (a new pipeline call). A timestep that is no such view is placed by value:
        a new list starts a new generation unless the call is at the running one's current
        or next step and not at the new list's start."""
        timesteps, ours = scheduler.timesteps, self._timesteps_seen
        if _index_of(call, ours) is None:
            if timesteps is ours:
                return True
            if _index_in(call.timestep, timesteps) is not None or not self._may_continue(scheduler, call):
                return False
        if timesteps is not ours and timesteps is not self._checked_list:
            self._check_scheduler_kept(scheduler)
        return True

    def _may_continue(self, scheduler, call):
        """By value: whether a call on a scheduler with a new timesteps list is the running
        generation's current or next step rather than a new generation's first."""
        begin = getattr(scheduler, "begin_index", None)
        if self._k < 0 or begin not in (None, self._begin_index):
            return False
        values = self._list_values(scheduler)
        if values and _is_model_timestep(call, values[begin or 0]):
            return False
        return any(_is_model_timestep(call, self._values[k]) for k in (self._k, self._k + 1) if k < self._num_steps)

    def _check_scheduler_kept(self, scheduler):
        """The running generation continues after another caller (a refused thread's
        pipeline call) ran `set_timesteps` on the shared scheduler: only where that left
        what the pipeline steps with as it was; otherwise its result would be wrong."""
        where = (f"another pipeline call ran set_timesteps on the shared {type(scheduler).__name__} while this "
                 f"generation ran (at step {self._k} of {self._num_steps})")
        advice = ("; this generation stops here. Serialise the pipeline calls (a lock around pipe(...)) or "
                  "parallelize one pipeline per thread")
        if self._list_values(scheduler) != self._all_values:
            raise RuntimeError(f"{where} and set other timesteps: the scheduler no longer steps this generation"
                               + advice)
        if _counted_step(scheduler, 0) is not None:
            raise RuntimeError(f"{where}: that reset the scheduler's step count and history (`step_index` or "
                               "`counter`, and the earlier steps' outputs a multistep scheduler keeps)" + advice)
        self._checked_list = scheduler.timesteps  # the same list again, on a scheduler without step state

    def _list_values(self, scheduler):
        return [float(v) for v in scheduler.timesteps.tolist()]  # a host read: once per new list

    def _begin(self, scheduler, call):
        self._follow_changes(call)
        timesteps = scheduler.timesteps
        values = self._list_values(scheduler)
        self._begin_index = getattr(scheduler, "begin_index", None)
        start = _index_in(call.timestep, timesteps)  # the element the pipeline's loop passed
        if start is None:
            start = self._begin_index
        if start is None:
            first = call.scheduler_value()
            start = min(range(len(values)), key=lambda i: abs(values[i] - first))
            if not _is_model_timestep(call, values[start]):
                raise RuntimeError(
                    f"timestep {first} is not in the timesteps of the scheduler of the pipeline this denoiser "
                    "was parallelized on; call it with that scheduler's own timesteps (a pipeline made from it "
                    "with from_pipe or **pipe.components and its own scheduler must not share its UNet: give "
                    "it handle.original)")
        if self._cache_hooks is None:  # the step caches installed: they change only with the fingerprint
            self._cache_hooks = cache_hooks(self.denoiser)
        try:
            check_steps(self.denoiser, self.plan.warmup, len(values) - start, self._cache_hooks)
        except ValueError:
            self.reset()
            raise
        self._timesteps_seen, self._all_values, self._begin_at = timesteps, values, start
        self._checked_list = None  # a list another caller set, found harmless (_check_scheduler_kept)
        self._steps, self._values, self._num_steps = timesteps[start:], values[start:], len(values) - start
        self._stack = stack_signature(self.denoiser)
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
        old, source = self.executor, call
        if old is not None:
            what = self._watch.changed()
            if what is not None:
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
        self._watch.record()
        self._cache_hooks = None


def _index_of(call, timesteps):
    """`_index_in(call.timestep, timesteps)`, kept on the call for the last list asked
    (a step asks twice)."""
    cached = call.__dict__.get("_index_in")
    if cached is not None and cached[0] is timesteps:
        return cached[1]
    index = _index_in(call.timestep, timesteps)
    call._index_in = (timesteps, index)
    return index


def _index_in(timestep, timesteps):
    """The position in the 1-D tensor `timesteps` of the element that `timestep` is a view
    of (a pipeline's loop variable, maybe expanded to the batch), or None: no host read."""
    if not (isinstance(timestep, torch.Tensor) and isinstance(timesteps, torch.Tensor)) or timesteps.ndim != 1:
        return None
    if timestep.dtype != timesteps.dtype or timestep.device != timesteps.device or len(timesteps) == 0:
        return None
    if any(s != 0 for s in timestep.stride()) and timestep.numel() != 1:
        return None  # more than one element
    if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
        return None
    offset, stride = timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0)
    if stride <= 0 or offset % stride or not 0 <= offset // stride < len(timesteps):
        return None
    return offset // stride


def _counted_step(scheduler, begin_at):
    """The step of a generation that started at list position `begin_at` as the scheduler
    counts it, or None where it counts none: `step_index` is a position in its timesteps
    (None before its first step), PNDM's `counter` the steps taken since `set_timesteps`."""
    if hasattr(type(scheduler), "step_index"):
        index = scheduler.step_index
        return 0 if index is None else index - begin_at
    if isinstance(getattr(scheduler, "counter", None), int) and hasattr(scheduler, "ets"):  # PNDMScheduler
        return scheduler.counter
    return None


def _is_model_timestep(call, value):
    """Whether the call's timestep is scheduler timestep `value` as its pipeline hands it
    to the model (cast, divided: adapters.py), compared exactly in the model's dtype."""
    timestep = call.timestep
    first = timestep.flatten()[:1] if isinstance(timestep, torch.Tensor) else timestep
    expected = as_model_timestep(value, first, call.adapter.timestep_divisor)
    return _scalar(expected) == _scalar(first)


def _scalar(t):
    return t.flatten()[0].item() if isinstance(t, torch.Tensor) else t
