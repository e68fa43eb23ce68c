"""AsyncDenoiser: a drop-in module with the denoiser's call signature that runs the
AsyncDiff program, one denoiser call per step.

It follows the step index through the scheduler's timesteps: a new generation starts
when the scheduler's `timesteps` tensor is a new object (every pipeline call runs
`set_timesteps`) or the last one finished; the first timestep of a call locates its
start in the list, so img2img and inpainting with strength < 1 work.
"""
import torch

from .engine.call import DenoiserCall


class AsyncDenoiser(torch.nn.Module):
    def __init__(self, denoiser, plan, executor, scheduler_source):
        super().__init__()
        self.denoiser = denoiser
        self.plan = plan
        self.executor = executor
        self._scheduler_source = scheduler_source  # () -> the scheduler in use now
        self._timesteps_seen = None
        self._k = self._num_steps = 0

    def __getattr__(self, name):
        # Pipelines read the denoiser's config, dtype, device, add_embedding, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["denoiser"], name)

    def forward(self, *args, **kwargs):
        call = DenoiserCall(self.denoiser, args, kwargs)
        scheduler = self._scheduler_source()
        if scheduler.timesteps is not self._timesteps_seen or self._k >= self._num_steps:
            self._begin(scheduler, call.timestep)
        expected = self._steps[self._k]
        if not _same_timestep(call.timestep, expected):
            raise RuntimeError(
                f"denoiser call {self._k} of this generation got timestep {_scalar(call.timestep)}, "
                f"but the scheduler's list has {_scalar(expected)} there; AsyncDiff needs one denoiser call "
                "per scheduler timestep, in order"
            )
        out = self.executor.step(self._k, call)
        self._k += 1
        return out

    def _begin(self, scheduler, first_timestep):
        timesteps = scheduler.timesteps
        start = getattr(scheduler, "begin_index", None)
        if start is None:
            hits = [i for i, t in enumerate(timesteps) if _same_timestep(first_timestep, t)]
            if not hits:
                raise RuntimeError(
                    f"timestep {_scalar(first_timestep)} is not in the scheduler's timesteps; "
                    "call the denoiser with the scheduler's own timesteps"
                )
            start = hits[0]
        steps = timesteps[start:]
        program = self.plan.program(len(steps))  # raises if warm-up exceeds the step count
        self._steps, self._num_steps, self._k = steps, len(steps), 0
        self._timesteps_seen = timesteps
        self.executor.start(program, steps)
        self.executor.stats.generations += 1


def _scalar(t):
    return t.flatten()[0].item() if isinstance(t, torch.Tensor) else t


def _same_timestep(a, b):
    return float(_scalar(a)) == float(_scalar(b))
