"""What the drop-in wrapper promises around the pipeline: a refused call from another
thread leaves the running generation as it was (or stops it, where the shared scheduler
it reset can no longer step it); every scheduler diffusers runs SD 1.5 with is followed
step by step, repeated timesteps included; state dicts use the denoiser's own keys; a
pipeline made from a parallelized one saves the original denoiser."""
import threading
import warnings

import diffusers
import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.models.tiny_pipelines import tiny_prompt_embeddings, tiny_sd_pipeline, tiny_transformer_pipeline
from loop import unet_call_kwargs

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline("sd15")


@pytest.fixture
def scheduler_restored(pipe):
    """Tests that give the shared pipeline another scheduler put its DDIM back."""
    scheduler = pipe.scheduler
    yield
    pipe.scheduler = scheduler


def generate(pipe, steps=4, **kwargs):
    return pipe("a red cube", num_inference_steps=steps, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def generate_with_intruder(pipe, at_step, intruder):
    """Generate; at the end of step `at_step` another thread runs `intruder()` while this one
    waits for it to return or raise. Returns (the latents, what the intruder returned or
    raised)."""
    outcome = []

    def other():
        try:
            outcome.append(intruder())
        except RuntimeError as e:
            outcome.append(e)

    def at_step_end(p, i, t, tensors):
        if i == at_step:
            thread = threading.Thread(target=other, name="intruder")
            thread.start()
            thread.join()
        return tensors

    return generate(pipe, callback_on_step_end=at_step_end), outcome[0]


def copied_timesteps(handle):
    """Make the wrapper receive a copy of the pipeline's timestep (as FLUX's t/1000 is), not
    the element of the list its loop runs over: the wrapper places such a call by value."""
    def copy(module, args, kwargs):
        return (args[0], args[1].clone(), *args[2:]), kwargs

    return handle.denoiser.register_forward_pre_hook(copy, with_kwargs=True)


# --- threads -------------------------------------------------------------------------

# Before the fix a refused call arriving at the end of step 0 started a new generation for
# the running thread (issue 20 measured, DDIM, 20 steps: up to 0.016 off its clean run, and
# one generation too many counted).
@pytest.mark.parametrize("executor, arrives_at, timestep", [
    ("reference", 0, "element"), ("local", 0, "element"), ("reference", 2, "element"), ("local", 2, "element"),
    ("reference", 0, "copy")])
def test_a_refused_call_leaves_the_running_generation_as_it_was(pipe, executor, arrives_at, timestep):
    handle = asyncdiff_rt.parallelize(pipe, executor=executor, devices="cpu*2", n_components=2)
    hook = copied_timesteps(handle) if timestep == "copy" else None
    try:
        alone = generate(pipe)
        running, refused = generate_with_intruder(pipe, arrives_at, lambda: generate(pipe))
        assert isinstance(refused, RuntimeError) and "running a generation for thread 'MainThread'" in str(refused)
        assert torch.equal(running, alone)
        assert handle.stats()["generations"] == 2
    finally:
        if hook is not None:
            hook.remove()
        handle.remove()


def test_a_refused_call_with_other_timesteps_stops_the_running_generation(pipe):
    """The refused call set a 3-step list on the shared DDIM: stepping the running 4-step
    generation with it would be silently wrong."""
    handle = asyncdiff_rt.parallelize(pipe, executor="reference", n_components=2)
    try:
        alone = generate(pipe)
        with pytest.raises(RuntimeError, match="set_timesteps on the shared DDIMScheduler .* set other timesteps"):
            generate_with_intruder(pipe, 0, lambda: generate(pipe, steps=3))
        assert torch.equal(generate(pipe), alone)  # the next generation is whole
        assert handle.stats()["generations"] == 3
    finally:
        handle.remove()


def test_a_refused_call_that_resets_a_counting_scheduler_stops_the_running_generation(pipe, scheduler_restored):
    """set_timesteps resets Euler's step_index (and a multistep scheduler's history): the
    running generation cannot go on exactly with the same list either."""
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    handle = asyncdiff_rt.parallelize(pipe, executor="reference", n_components=2)
    try:
        with pytest.raises(RuntimeError, match="reset the scheduler's step count"):
            generate_with_intruder(pipe, 1, lambda: generate(pipe))
        assert handle.stats()["generations"] == 1
    finally:
        handle.remove()


# --- schedulers ----------------------------------------------------------------------

# Schedulers of diffusers 0.42.1 that the plain SD 1.5 pipeline runs and that repeat or
# interleave timesteps: PNDM repeats entries (its PRK steps call the model several times
# at one timestep) and counts steps in `counter`, not `step_index`; Heun, KDPM2 (Ancestral)
# and DPMSolverSDE interleave second-order entries. DPMSolverSDE needs torchsde (skipped
# without) and draws its noise from the global RNG unless given a seed. A copied timestep
# leaves the wrapper the scheduler's count to go by: PNDM's.
REPEATING = [("PNDMScheduler", {"skip_prk_steps": True}, "element"),
             ("PNDMScheduler", {"skip_prk_steps": False}, "element"),
             ("PNDMScheduler", {"skip_prk_steps": True}, "copy"), ("PNDMScheduler", {"skip_prk_steps": False}, "copy"),
             ("HeunDiscreteScheduler", {}, "element"), ("KDPM2DiscreteScheduler", {}, "element"),
             ("KDPM2AncestralDiscreteScheduler", {}, "element"),
             ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, "element")]
# The others, one of each kind (all of diffusers' SD schedulers were run this way when this
# was written, LMS and CosineDPMSolverMultistep included, with scipy and torchsde).
PLAIN = ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
         "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler",
         "CMStochasticIterativeScheduler"]  # float64 timesteps, placed by the element passed
SCHEDULER_STEPS = 4


def _scheduler(config, name, overrides):
    try:
        return getattr(diffusers, name).from_config(config, **overrides)
    except ImportError as e:  # scipy, torchsde
        pytest.skip(f"{name}: {e}")


@pytest.mark.parametrize("name, overrides, timestep", REPEATING,
                         ids=[name + "".join(f"-{k}={v}" for k, v in o.items()) + f"-{t}" for name, o, t in REPEATING])
def test_schedulers_that_repeat_timesteps_are_followed_step_by_step(pipe, scheduler_restored, name, overrides,
                                                                    timestep):
    """W = K is the plain pipeline; W = 1 on the local executor is the reference executor.
    With the timestep a copy, steps are told apart by the scheduler's count (step_index,
    PNDM's counter) instead of the list element the pipeline passed."""
    pipe.scheduler = _scheduler(pipe.scheduler.config, name, overrides)
    plain = generate(pipe, SCHEDULER_STEPS)
    results = []
    for executor, warmup in (("local", None), ("local", 1), ("reference", 1)):
        handle = asyncdiff_rt.parallelize(pipe, executor=executor, devices="cpu*2", n_components=2,
                                          warmup=warmup or len(pipe.scheduler.timesteps))
        hook = copied_timesteps(handle) if timestep == "copy" else None
        try:
            results.append(generate(pipe, SCHEDULER_STEPS))
        finally:
            if hook is not None:
                hook.remove()
            handle.remove()
    assert torch.equal(results[0], plain)
    assert torch.equal(results[1], results[2])


@pytest.mark.parametrize("name", PLAIN)
def test_every_sd_scheduler_at_full_warmup_is_the_plain_pipeline(pipe, scheduler_restored, name):
    pipe.scheduler = _scheduler(pipe.scheduler.config, name, {})
    plain = generate(pipe, SCHEDULER_STEPS)
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2,
                                      warmup=len(pipe.scheduler.timesteps))
    try:
        assert torch.equal(generate(pipe, SCHEDULER_STEPS), plain)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_flow_matching_schedulers_on_sd3(name):
    """The flow-matching schedulers run with transformer pipelines: the tiny SD3's."""
    pipe = tiny_transformer_pipeline("sd3")
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    embeds, pooled = tiny_prompt_embeddings()

    def generate_sd3():
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=-embeds,
                    negative_pooled_prompt_embeds=-pooled, height=16, width=16, output_type="latent",
                    num_inference_steps=SCHEDULER_STEPS, generator=torch.Generator().manual_seed(0)).images

    plain = generate_sd3()
    handle = asyncdiff_rt.parallelize(pipe, executor="reference", n_components=2,
                                      warmup=len(pipe.scheduler.timesteps))
    try:
        assert torch.equal(generate_sd3(), plain)
    finally:
        handle.remove()


def test_calls_out_of_order_are_refused_with_the_reason():
    """On a schedule without a step counter (the step protocol's), a listed timestep out of
    turn and one that is not listed get different messages; only the latter is a derived
    pipeline's own scheduler (from_pipe)."""
    unet = build_unet("tiny-sd15", device="cpu", dtype=torch.float32).eval()
    handle = asyncdiff_rt.parallelize_denoiser(unet, n_components=2)
    x, kwargs = torch.randn(2, 4, 8, 8), unet_call_kwargs(unet)
    try:
        for wrong, message in ((lambda steps: steps[2].clone(), "do not follow the list in order"),
                               (lambda steps: torch.tensor(7.0), "7.0 is not in that list.* from_pipe")):
            steps = handle.begin([999.0, 500.0, 1.0])
            with torch.no_grad():
                handle.denoiser(x, steps[0].clone(), **kwargs)
                with pytest.raises(RuntimeError, match=message) as refused:
                    handle.denoiser(x, wrong(steps), **kwargs)
            assert ("from_pipe" in str(refused.value)) == ("7.0" in message)
    finally:
        handle.remove()


# --- state dicts ---------------------------------------------------------------------

def test_the_wrapper_names_its_state_with_the_denoisers_keys(pipe):
    handle = asyncdiff_rt.parallelize(pipe, executor="reference", n_components=2)
    try:
        unet = handle.original
        assert list(pipe.unet.state_dict()) == list(unet.state_dict())
        for listing in ("named_parameters", "named_buffers", "named_modules"):
            assert [name for name, _ in getattr(pipe.unet, listing)()] == [name for name, _ in getattr(unet, listing)()]
        assert all(a is b for a, b in zip(pipe.unet.parameters(), unet.parameters()))
    finally:
        handle.remove()


def test_weights_loaded_through_the_wrapper_reach_the_next_generation():
    """A UNet's own state dict (another seed's weights) loads through the wrapper; at W = K
    the next generation is the plain pipeline with those weights."""
    pipe = tiny_sd_pipeline("sd15")
    weights = tiny_sd_pipeline("sd15", seed=1).unet.state_dict()
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2, warmup=4)
    try:
        before = generate(pipe)  # the executor is built and used
        pipe.unet.load_state_dict(weights)
        after = generate(pipe)
        assert handle.stats()["rebuilds"] == 1
    finally:
        handle.remove()
    assert torch.equal(after, generate(pipe)) and not torch.equal(after, before)


# --- saving --------------------------------------------------------------------------

def test_a_pipeline_made_from_a_parallelized_one_saves_the_original_unet(pipe, tmp_path):
    handle = asyncdiff_rt.parallelize(pipe, executor="reference", n_components=2)
    try:
        derived = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        entry = derived.config.unet
        derived.save_pretrained(tmp_path)
        assert derived.unet is handle.denoiser and derived.config.unet == entry  # as it was
    finally:
        handle.remove()
    loaded = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path, safety_checker=None,
                                                                       requires_safety_checker=False)
    assert type(loaded.unet) is type(handle.original)
    saved, original = loaded.unet.state_dict(), handle.original.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
