"""One parallelized pipeline runs one generation at a time: a second thread's call while
a generation runs is refused with a clear error and never disturbs the first."""
import threading
import warnings

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline("sd15")


def generate(pipe, **kwargs):
    return pipe("a red cube", num_inference_steps=STEPS, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("executor", ["reference", "local"])
def test_a_second_thread_is_refused_and_the_first_is_undisturbed(pipe, executor):
    handle = asyncdiff_rt.parallelize(pipe, executor=executor, devices="cpu*2", n_components=2)
    try:
        alone = generate(pipe)
        errors, second_done = [], threading.Event()

        def second():
            try:
                generate(pipe)
            except RuntimeError as e:
                errors.append(str(e))
            finally:
                second_done.set()

        def at_step(p, i, t, tensors):
            if i == 1:  # in the middle of the first generation, another thread calls
                thread = threading.Thread(target=second, name="intruder")
                thread.start()
                second_done.wait(timeout=60)
            return tensors

        first = generate(pipe, callback_on_step_end=at_step)
        assert len(errors) == 1 and "running a generation for thread 'MainThread'" in errors[0]
        assert "handle.reset()" in errors[0]
        assert torch.equal(first, alone)
        thread = threading.Thread(target=lambda: errors.append(generate(pipe)))  # after it: fine
        thread.start()
        thread.join()
        assert torch.equal(errors[-1], alone)
    finally:
        handle.remove()


def test_an_abandoned_generation_can_be_reset(pipe):
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2)
    try:
        alone = generate(pipe)

        def interrupt(p, i, t, tensors):
            if i == 1:
                raise KeyboardInterrupt
            return tensors

        with pytest.raises(KeyboardInterrupt):
            generate(pipe, callback_on_step_end=interrupt)
        results = []
        other = threading.Thread(target=lambda: results.append(_try(lambda: generate(pipe))))
        other.start()
        other.join()
        assert isinstance(results[0], RuntimeError)
        handle.reset()
        other = threading.Thread(target=lambda: results.append(generate(pipe)))
        other.start()
        other.join()
        assert torch.equal(results[1], alone)
    finally:
        handle.remove()


def _try(fn):
    try:
        return fn()
    except RuntimeError as e:
        return e
