"""What users stack on a denoiser besides step caches: LoRA (diffusers' pipeline methods
through peft), torchao's int8 weight-only quantization and torch.compile, before or after
`parallelize`. Each runs with W = K equal to the plain pipeline with the same change, or
is refused with the reason; a change within a generation is refused and the pipeline
stays usable."""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import asyncdiff_rt
from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.models import tiny_pipelines as tiny
from test_step_cache_hooks import STEPS, flux_call as call  # one tiny FLUX call for both files

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def lora():
    """A random LoRA for the tiny FLUX transformer, as `load_lora_weights` takes it."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    other = tiny.tiny_transformer_pipeline("flux", seed=1)
    torch.manual_seed(3)
    other.transformer.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                                  init_lora_weights=False))
    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(other.transformer).items()}


def load(pipe, weights):
    pipe.load_lora_weights(dict(weights), adapter_name="a")


def load_and_fuse(pipe, weights):
    load(pipe, weights)
    pipe.fuse_lora()


def load_and_weigh(pipe, weights):
    load(pipe, weights)
    pipe.set_adapters(["a"], [0.5])


LORA_CHANGES = {"load": load, "fuse": load_and_fuse, "set_adapters": load_and_weigh}


@pytest.fixture(scope="module")
def plain():
    return call(tiny.tiny_transformer_pipeline("flux"))


@pytest.mark.parametrize("change", sorted(LORA_CHANGES))
def test_lora_before_or_after_parallelize_equals_the_plain_lora_pipeline(change, lora, plain):
    pipe = tiny.tiny_transformer_pipeline("flux")
    LORA_CHANGES[change](pipe, lora)
    want = call(pipe)
    assert not torch.equal(want, plain)

    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)  # before
    assert torch.equal(call(pipe), want)
    handle.remove()
    if change == "load":  # asynchronous steps: the executors agree bit for bit (once: the replicas copy LoRA layers)
        outs = {}
        for executor in ("reference", "local"):
            handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=1, executor=executor, devices="cpu*2")
            outs[executor] = call(pipe)
            handle.remove()
        assert torch.equal(outs["local"], outs["reference"]) and not torch.equal(outs["local"], want)

    pipe = tiny.tiny_transformer_pipeline("flux")
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    assert torch.equal(call(pipe), plain)
    LORA_CHANGES[change](pipe, lora)  # after: diffusers' pipeline methods reach the original denoiser
    assert torch.equal(call(pipe), want) and handle.stats()["rebuilds"] == 1
    handle.remove()
    assert torch.equal(call(pipe), want)
    assert "fuse_lora" not in pipe.__dict__  # remove() takes the pipeline's methods back too


def test_lora_loaded_within_a_generation_is_refused_and_the_pipeline_stays_usable(lora, plain):
    pipe = tiny.tiny_transformer_pipeline("flux")
    load(pipe, lora)
    want = call(pipe)
    pipe.unload_lora_weights()
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=1)
    asynchronous = call(pipe)

    def load_at_step_1(p, i, t, kwargs):
        if i == 1:
            load(p, lora)
        return kwargs

    with pytest.raises(RuntimeError, match="load_lora_weights.*within a generation.*next one"):
        call(pipe, load_at_step_1)
    assert torch.equal(call(pipe), asynchronous)  # nothing was loaded

    def load_on_the_denoiser_at_step_1(p, i, t, kwargs):  # past the pipeline's method: found at the next step
        if i == 1:
            p.transformer.load_lora_adapter(dict(lora), adapter_name="a", prefix="transformer")
        return kwargs

    with pytest.raises(RuntimeError, match="LoRA adapter.*within this generation"):
        call(pipe, load_on_the_denoiser_at_step_1)
    handle.remove()
    assert torch.equal(call(pipe), want)  # loaded: it takes effect from the next generation


def int8(pipe):
    torchao = pytest.importorskip("torchao.quantization")
    torchao.quantize_(pipe.transformer, torchao.Int8WeightOnlyConfig())


def test_int8_weight_only_runs_on_the_reference_executor_and_is_refused_on_the_local_one(plain):
    pipe = tiny.tiny_transformer_pipeline("flux")
    int8(pipe)
    want = call(pipe)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)  # before
    assert torch.equal(call(pipe), want)
    handle.remove()
    with pytest.raises(ValueError, match="Int8Tensor.*'local' executor.*executor='reference'"):
        asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS, executor="local", devices="cpu*2")
    assert not isinstance(pipe.transformer, AsyncDenoiser)

    pipe = tiny.tiny_transformer_pipeline("flux")
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    call(pipe)
    int8(pipe)  # after
    assert torch.equal(call(pipe), want)
    handle.remove()


def test_a_compiled_denoiser_is_refused_before_or_after_parallelize(plain):
    pipe = tiny.tiny_transformer_pipeline("flux")
    original = pipe.transformer
    pipe.transformer = torch.compile(original)  # compiles lazily: nothing is compiled here
    with pytest.raises(ValueError, match=r"compiled \(pipe.transformer = torch.compile.*_orig_mod"):
        asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    pipe.transformer = original
    original.compile()
    with pytest.raises(ValueError, match=r"compiled \(pipe.transformer.compile\(\)"):
        asyncdiff_rt.parallelize(pipe, n_components=2, warmup=STEPS)
    original._compiled_call_impl = None  # what .compile() set

    handle = asyncdiff_rt.parallelize(pipe, n_components=2, warmup=1)
    call(pipe)
    handle.original.compile()  # after, on the denoiser: refused at the next generation
    with pytest.raises(ValueError, match="compiled"):
        call(pipe)
    original._compiled_call_impl = None
    call(pipe)  # usable again
    handle.denoiser.compile(backend="eager")  # after, on the parallelized one
    with pytest.raises(Exception, match="parallelized denoiser cannot be compiled"):
        call(pipe)
    handle.denoiser._compiled_call_impl = None
    asynchronous = call(pipe)
    counters.clear()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")  # the wrapper compiled: it stays eager
    assert torch.equal(call(pipe), asynchronous) and not counters["stats"]["unique_graphs"]  # nothing compiled
    with pytest.raises(RuntimeError, match="replaced after parallelize"):
        handle.remove()
