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
            inner = self.__dict__.get("_modules", {}).get("denoiser")  # absent while copying/unpickling
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args, **kwargs):
        call = DenoiserCall(self.denoiser, args, kwargs)
        scheduler = self._scheduler_source()
        if scheduler.timesteps is not self._timesteps_seen or self._k >= self._num_steps:
            self._begin(scheduler, call.timestep)
        if not self._is_current_timestep(call.timestep):
            raise RuntimeError(
                f"denoiser call {self._k} of this generation got timestep {_scalar(call.timestep)}, "
                f"but the scheduler's list has {self._values[self._k]} there; AsyncDiff needs one denoiser "
                "call per scheduler timestep, in order"
            )
        out = self.executor.step(self._k, call)
        self._k += 1
        return out

    def _is_current_timestep(self, timestep):
        # Pipelines pass the scheduler's own element (or a view of it): comparing storage
        # avoids reading a GPU value, which would block the host every step.
        expected = self._steps[self._k]
        if isinstance(timestep, torch.Tensor) and timestep.data_ptr() == expected.data_ptr():
            return True
        return float(_scalar(timestep)) == self._values[self._k]

    def _begin(self, scheduler, first_timestep):
        timesteps = scheduler.timesteps
        values = [float(v) for v in timesteps.tolist()]  # one host read per generation
        start = getattr(scheduler, "begin_index", None)
        if start is None:
            first = float(_scalar(first_timestep))
            if first not in values:
                raise RuntimeError(
                    f"timestep {first} is not in the scheduler's timesteps; "
                    "call the denoiser with the scheduler's own timesteps"
                )
            start = values.index(first)
        steps = timesteps[start:]
        program = self.plan.program(len(steps))  # raises if warm-up exceeds the step count
        self._steps, self._values, self._num_steps, self._k = steps, values[start:], len(steps), 0
        self._timesteps_seen = timesteps
        self.executor.start(program, steps)
        self.executor.stats.generations += 1


def _scalar(t):
    return t.flatten()[0].item() if isinstance(t, torch.Tensor) else t

