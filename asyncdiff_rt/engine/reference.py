"""The reference executor: one device, whole forwards with cache substitution.

It is the readable oracle. Each device of the plan is simulated by its own cache view
and latent; Send and SendLatent copy between views exactly as the program says, so a
program that forgets a transfer computes with stale data and the tests see it.
"""
import torch
import torch.utils._pytree as pytree

from .stages import EAGER, apply_stages
from .stats import ExecutorStats
from .step_loop import StepLoop
from .substitution import UnitSwitch


class ReferenceExecutor(StepLoop):
    name = "reference"
    shared_by_roles = ("plan", "_switch", "stats")  # a sibling: its own simulated devices, on the same denoiser
    _range_suffix = " (reference)"

    def __init__(self, denoiser, plan, stages=EAGER):
        self.plan = plan
        # the stages of every device, on the one denoiser (stages.py), under the unit switch
        self._stages = apply_stages(denoiser, plan.graph.paths, plan.graph.paths, stages)
        try:
            self._switch = UnitSwitch(denoiser, plan.graph.paths)
        except BaseException:
            self._stages.remove()  # nothing left half-made
            raise
        self.stats = ExecutorStats(plan.n_devices)
        self._shares = None
        self._init_role()

    def start(self, program, timesteps):
        """Begin one generation: empty caches on every simulated device."""
        super().start(program, timesteps)
        self._shapes = {}  # unit -> an output of it, filled by the warm-up commit
        self._views = [_DeviceCache(self._shapes) for _ in range(program.n_devices)]
        self._latents = [None] * program.n_devices

    def _before_step(self, step):
        self._latents[self._program.host] = self._call.latent

    def _send(self, ins):
        entry = self._views[ins.src][ins.unit]
        self._views[ins.dst][ins.unit] = entry
        self.stats.add_received(ins.dst, _nbytes(entry))

    def _send_latent(self, ins):
        self._latents[ins.dst] = self._latents[self._program.host]
        self.stats.add_received(ins.dst, _nbytes(self._latents[ins.dst]))

    def _forward(self, ins):
        program, owner = self._program, self.plan.transfers.owner
        skipped = frozenset()
        if ins.device is None:
            compute, view, latent = self.plan.graph.paths, {}, self._call.latent
        else:
            skipped = self.plan.transfers.skipped_arguments(ins.device)
            compute = self.plan.partition.components[program.component_of(ins.device)]
            view = self._views[ins.device]
            # A device whose units never read the latent runs its glue on a zero buffer.
            latent = self._latents[ins.device]
            latent = torch.zeros_like(self._call.latent) if latent is None else latent
        record = {}
        with self._switch.forward_with(compute, view, record):
            self._outputs[ins.device] = self._call.run(latent, self._timesteps[ins.tau_index], skipped)
        self.stats.argument_bytes[program.host if ins.device is None else ins.device] += \
            self._call.argument_bytes(skipped)
        if ins.commit:
            for path, out in record.items():
                self._views[owner[path]][path] = out
                self._shapes.setdefault(path, out)
        self.stats.forwards[-1 if ins.device is None else ins.device] += 1

    def _emit_forward(self, device):
        return self._outputs[device]

    def _emit_cache(self):
        host = self._program.host
        tau = self._timesteps[self._k - int(self._program.time_shift)]
        skipped = self.plan.transfers.skipped_arguments(host)
        with self._switch.forward_with((), self._views[host], {}):
            return self._call.run(self._call.latent, tau, skipped)

    def close(self):
        if self._shares is None:  # a sibling leaves the switch and stages to their owner
            self._switch.remove()
            self._stages.remove()


def _nbytes(tree):
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


class _DeviceCache(dict):
    """One simulated device's cache. A unit it was never sent reads as zeros, like an
    uninitialised buffer: only glue whose result no computed unit uses may see it."""

    def __init__(self, shapes):
        super().__init__()
        self._shapes = shapes

    def __missing__(self, path):
        if path not in self._shapes:
            raise KeyError(path)
        return pytree.tree_map(lambda t: torch.zeros_like(t) if isinstance(t, torch.Tensor) else t, self._shapes[path])
