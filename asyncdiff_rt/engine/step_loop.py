"""The step loop every executor shares (DESIGN.md, "One step loop").

What a step is does not depend on the executor: which step and call it is, its NVTX
range, the program's instructions in order through a dispatch table, the count of
steps per phase, the prediction kept for a step that emits the one before, and the
rule that a failed step ends the generation (every later step is refused until the
next `start`). An executor subclasses `StepLoop` and supplies only how it launches
work and moves tensors: the handlers `_send`, `_send_latent`, `_forward`,
`_emit_forward` and `_emit_cache`, the hooks `_before_step`, `_after_step` and
`_abandon`, and the attributes its sibling shares (`shared_by_roles`).
"""
from ..profiling.nvtx import RANGES
from ..schedule import Emit, Forward, Send, SendLatent


class StepLoop:
    name = None  # the executor's name, in its errors
    shared_by_roles = ()  # attributes a sibling shares with this executor (weights, devices, counters)
    _range_suffix = ""  # after "step {k}/{phase}" in the step's NVTX range: where it runs

    def _init_role(self):
        """The state one role of calls owns; executors extend it with their caches."""
        self._handlers = {Send: self._send, SendLatent: self._send_latent, Forward: self._forward, Emit: self._emit}
        self._program = None

    def sibling(self):
        """An executor for another call role (SEMANTICS.md): its own caches and generation
        state, on this executor's `shared_by_roles`. Close it before this one."""
        other = object.__new__(type(self))
        for name in self.shared_by_roles:
            setattr(other, name, getattr(self, name))
        other._shares = self  # its owner: the shared resources are the owner's to close
        other._init_role()
        return other

    def start(self, program, timesteps):
        """Begin one generation: `program` over `timesteps`, nothing emitted yet.
        Executors extend it with their caches' reset."""
        self._program, self._timesteps, self._previous = program, timesteps, None

    def step(self, k, call):
        """Run step k of the program for the pipeline's denoiser call; return its eps."""
        if self._program is None:
            raise RuntimeError("no generation is running (an earlier step failed); start a new one")
        try:
            step = self._program.steps[k]
            self._k, self._call, self._outputs, self._emitted = k, call, {}, None
            self._before_step(step)
            with RANGES.range(f"step {k}/{step.phase}{self._range_suffix}"):
                step.run(self._handlers, self.name)
                self._after_step(step)
            self.stats.steps[step.phase] += 1
        except BaseException as error:
            self._abandon(error)
            raise
        self._previous = self._emitted
        return self._emitted

    def _before_step(self, step):
        """Before the step's range: what the executor readies for `self._call`."""

    def _after_step(self, step):
        """Inside the step's range, after its instructions."""

    def _abandon(self, error):
        """After a failed step: no generation runs. Executors extend it to quiet their
        devices or peers."""
        self._program = None

    def _emit(self, ins):
        if ins.source == "forward":
            self._emitted = self._emit_forward(ins.device)
        elif ins.source == "previous":
            self._emitted = self._previous
        else:  # "cache": the denoiser's output assembled from the host's cache, no unit runs
            self._emitted = self._emit_cache()

    def _emit_forward(self, device):
        """The output of this step's Forward on `device` (None: the warm-up forward)."""
        raise NotImplementedError

    def _emit_cache(self):
        """The denoiser's output assembled from the host's cache (a reuse step)."""
        raise NotImplementedError
