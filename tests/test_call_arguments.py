"""The call's arguments reach every device at every step, whatever the caller does with
its tensors: new tensors at recycled addresses, writes the version counter does not see,
ControlNet residuals that change every step, a batch that changes within a generation."""
import inspect
import re
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.models.tiny_pipelines import tiny_controlnet_pipeline, tiny_sd_pipeline
from asyncdiff_rt.plan import make_plan
from asyncdiff_rt.trace import unet_inputs
from loop import scheduler

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 5


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny-sd15", device="cpu", dtype=torch.float32).eval()


def conditions(unet, steps):
    """A different text conditioning for every step (as a caller may pass)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, unet.config.cross_attention_dim, generator=g) for _ in range(steps)]


def loop(unet, executor, pass_condition, **settings):
    """A DDIM loop through an AsyncDenoiser where `pass_condition(k, values)` hands over
    the step's conditioning the way a caller might."""
    sched = scheduler()
    plan = make_plan(unet, unet_inputs(unet), **settings)
    devices = f"cpu*{plan.n_devices}" if executor == "local" else None
    runner = make_executor(executor, unet, plan, devices)
    wrapper = AsyncDenoiser(unet, plan, runner, lambda: sched)
    sched.set_timesteps(STEPS)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            for k, (t, cond) in enumerate(zip(sched.timesteps, conditions(unet, STEPS))):
                eps = wrapper(torch.cat([latents] * 2), t, encoder_hidden_states=pass_condition(k, cond)).sample
                latents = sched.step(eps.chunk(2)[1], t, latents).prev_sample
    finally:
        runner.close()
    return latents


def fresh_tensors(k, values):
    return values.clone()


def recycled_address():
    """New tensors, version 0, at one address: what a caching allocator hands out."""
    storage = np.empty((2, 5, 16), dtype=np.float32)

    def pass_condition(k, values):
        storage[...] = values.numpy()
        return torch.from_numpy(storage)

    return pass_condition


def written_through_data():
    """One tensor whose values are written through `.data` (no version bump)."""
    held = []

    def pass_condition(k, values):
        if not held:
            held.append(values.clone())
        held[0].data.copy_(values)
        return held[0]

    return pass_condition


@pytest.mark.parametrize("handover", ["recycled_address", "written_through_data"])
@pytest.mark.parametrize("settings", [dict(n_components=2, warmup=1), dict(n_components=3, stride=2, warmup=1),
                                      dict(n_components=2, warmup=STEPS)], ids=["2x1", "3x2", "WK"])
def test_every_step_reads_the_arguments_it_was_given(unet, handover, settings):
    expected = loop(unet, "reference", fresh_tensors, **settings)
    assert torch.equal(loop(unet, "reference", globals()[handover](), **settings), expected)
    assert torch.equal(loop(unet, "local", globals()[handover](), **settings), expected)


@pytest.fixture(scope="module")
def controlnet():
    return tiny_controlnet_pipeline("sd15")


def control(pipe, seed, **kwargs):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 16, 16, generator=g)
    return pipe("a red cube", image=image, num_inference_steps=4, height=16, width=16, output_type="latent",
                generator=g, **kwargs).images


@pytest.mark.slow
def test_controlnet_local_equals_reference_on_twenty_seeds(controlnet):
    settings = dict(n_components=3, stride=2, warmup=1)
    results = {}
    for executor in ("reference", "local"):
        handle = asyncdiff_rt.parallelize(controlnet, executor=executor, devices="cpu*4", **settings)
        try:
            results[executor] = [control(controlnet, seed) for seed in range(20)]
        finally:
            handle.remove()
    for seed, (ref, local) in enumerate(zip(results["reference"], results["local"])):
        assert torch.equal(ref, local), f"seed {seed}"


def test_controlnet_warmup_over_all_steps_is_sequential(controlnet):
    sequential = control(controlnet, 0)
    handle = asyncdiff_rt.parallelize(controlnet, executor="local", devices="cpu*2", n_components=2, warmup=4)
    try:
        assert torch.equal(control(controlnet, 0), sequential)
    finally:
        handle.remove()


def drop_unconditional_at(step):
    """diffusers' documented dynamic-CFG callback: from `step` on, no guidance and only
    the conditional half of the batch."""
    def callback(pipe, i, t, tensors):
        if i == step - 1:
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return tensors

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_batch_change_within_a_generation_restarts_the_warmup():
    pipe = tiny_sd_pipeline("sd15")

    def generate():
        return pipe("a red cube", num_inference_steps=6, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **drop_unconditional_at(3)).images

    sequential = generate()
    results = {}
    for executor, warmup in (("reference", 6), ("reference", 2), ("local", 2)):
        handle = asyncdiff_rt.parallelize(pipe, executor=executor, devices="cpu*2", n_components=2, warmup=warmup)
        try:
            results[executor, warmup] = generate()
            steps = handle.stats()["steps"]
        finally:
            handle.remove()
    assert torch.equal(results["reference", 6], sequential)  # W = K: every step a whole forward
    assert torch.equal(results["local", 2], results["reference", 2])
    assert steps == {"warmup": 4, "async": 2}  # 2 warm-up steps at each batch size


# --- binding by the parameter-name table (engine/call.py) ----------------------------

def _forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True):
    pass


def _forward_varargs(self, sample, timestep, *args, scale=1.0, **kwargs):
    pass


@pytest.mark.parametrize("function", [_forward, _forward_varargs], ids=["plain", "varargs"])
@pytest.mark.parametrize("args, kwargs", [
    ((1, 2), {}), ((1, 2, 3), {}), ((1,), {"timestep": 2}), ((), {"sample": 1, "timestep": 2, "return_dict": False}),
    ((1, 2), {"return_dict": False, "encoder_hidden_states": 3}), ((1, 2, 3, 4, 5), {}), ((1, 2, 3, 4, 5, 6), {}),
    ((1, 2), {"unknown": 3}), ((1, 2), {"sample": 3}), ((1,), {}), ((), {"timestep": 2}),
    ((1, 2), {"class_labels": 4}), ((1, 2, None), {"class_labels": 4, "scale": 2.0})])
def test_binding_is_the_signatures(function, args, kwargs):
    """The same BoundArguments (order included), args and kwargs, and the same errors, as
    inspect.Signature.bind."""
    from asyncdiff_rt.engine.call import _binder

    class Model:
        forward = function

    model = Model()
    signature = inspect.signature(model.forward)
    try:
        want = signature.bind(*args, **kwargs)
    except TypeError as e:
        with pytest.raises(TypeError, match=re.escape(str(e))):
            _binder(model).bind(args, kwargs)
        return
    binder = _binder(model)
    got = binder.bind(args, kwargs)
    assert list(got.arguments.items()) == list(want.arguments.items()) and got.signature == signature
    assert binder.split(got.arguments) == (want.args, want.kwargs)
    arguments = dict(want.arguments)
    arguments.pop("encoder_hidden_states", None)  # a gap: what follows goes by name
    assert binder.split(arguments) == (inspect.BoundArguments(signature, arguments).args,
                                       inspect.BoundArguments(signature, arguments).kwargs)


ARGUMENT_TREES = [
    {}, {"a": torch.zeros(1), "b": None, "c": True, "d": 2, "e": 1.5, "f": "x"},
    {"a": torch.zeros(1), "b": {"text_embeds": torch.ones(2)}}, {"a": torch.zeros(1), "b": {"time_ids": torch.ones(2)}},
    {"a": [torch.zeros(1), None]}, {"a": (torch.zeros(1), None)}, {"a": [torch.zeros(1)]},
    {"a": torch.nn.Parameter(torch.zeros(1))}, {"b": torch.zeros(1)},
    {"a": torch.zeros(1), "b": OrderedDict(x=torch.ones(1))}, {"a": torch.zeros(1), "b": {"x": torch.ones(1)}}]


@pytest.mark.parametrize("arguments", ARGUMENT_TREES)
def test_flattening_is_pytrees(arguments):
    import torch.utils._pytree as pytree

    from asyncdiff_rt.engine.call import flatten_arguments

    leaves, spec, structure = flatten_arguments(arguments)
    want_leaves, want_spec = pytree.tree_flatten(arguments)
    assert spec == want_spec and len(leaves) == len(want_leaves)
    assert all(a is b for a, b in zip(leaves, want_leaves))
    hash(structure)
    for other in ARGUMENT_TREES:  # equal structures exactly where the specs are equal
        assert (flatten_arguments(other)[2] == structure) == (pytree.tree_flatten(other)[1] == spec)


@pytest.mark.parametrize("arguments", ARGUMENT_TREES)
def test_labels_are_the_leaves_labels(arguments):
    from asyncdiff_rt.arguments import labelled_leaves
    from asyncdiff_rt.engine.call import DenoiserCall

    class Model:
        def forward(self, sample, timestep, **kwargs):
            pass

    for _ in range(2):  # made, then from the table
        call = DenoiserCall(Model(), (torch.zeros(1), torch.zeros(())), arguments)
        want = labelled_leaves(call.others())
        got = call.labelled_others()
        assert [label for label, _ in got] == [label for label, _ in want]
        assert all(a is b for (_, a), (_, b) in zip(got, want))
