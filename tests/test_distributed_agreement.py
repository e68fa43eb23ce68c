"""Ranks that are called with different inputs raise, every one of them, naming the rank
and what differs: a different prompt (a conditioning argument) or a different seed (the
initial latent). Unchecked, each rank steps its own latent with the host's prediction and
returns an image that equals no reference (issue 20)."""
import pytest
import torch

from asyncdiff_rt.engine.agreement import LATENT, differences, generation_digest

from test_executor_distributed import STEPS, launch, reference_images


class _Program:
    num_steps, warmup, stride = 4, 1, 1


class _Call:
    """What generation_digest reads of a DenoiserCall."""

    def __init__(self, latent, **others):
        self.latent, self._others = latent, others

    def others(self):
        return self._others

    def shapes(self):
        tensors = [self.latent, *[v for v in self._others.values() if isinstance(v, torch.Tensor)]]
        return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


def _digest(latent, cond, scale=1.0):
    call = _Call(latent, encoder_hidden_states=cond, cross_attention_kwargs={"scale": scale})
    return generation_digest(_Program(), [999.0, 500.0, 250.0, 1.0], call)


def _inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.randn(2, 7, 32, generator=g).to(dtype)


def test_the_same_inputs_agree_and_rounding_stays_within_the_tolerance():
    latent, cond = _inputs(0)
    assert differences(_digest(latent, cond), _digest(latent.clone(), cond.clone())) == []
    # another machine's text encoder: float32 rounding (a few units in the last place), half precision's 1 ulp
    assert differences(_digest(latent, cond * (1 + 3e-7)), _digest(latent, cond)) == []
    half_latent, half_cond = _inputs(0, torch.float16)
    nudged = (half_cond.view(torch.int16) + 1).view(torch.float16)  # every element 1 ulp away
    assert differences(_digest(half_latent, nudged), _digest(half_latent, half_cond)) == []


def test_another_seed_names_the_initial_latent():
    latent, cond = _inputs(0)
    other_latent, _ = _inputs(1)
    found = differences(_digest(other_latent, cond), _digest(latent, cond))
    assert len(found) == 1 and found[0].startswith(LATENT) and "seed or generator" in found[0]


def test_another_prompt_names_the_conditioning_argument_even_in_another_order():
    latent, cond = _inputs(0)
    for other in (_inputs(2)[1], cond.flip(0)):  # another prompt; the same prompts in the other order
        found = differences(_digest(latent, other), _digest(latent, cond))
        assert found == ["the conditioning argument(s) <arg>['encoder_hidden_states'] (a different prompt, negative "
                         "prompt, conditioning image or other pipeline argument)"], found


def test_plain_arguments_and_settings_are_compared_exactly():
    latent, cond = _inputs(0)
    found = differences(_digest(latent, cond, scale=0.5), _digest(latent, cond))
    assert found == ["arguments: <arg>['cross_attention_kwargs']['scale']: 0.5 vs 1.0"]
    longer = dict(_digest(latent, cond), steps=6)
    assert differences(longer, _digest(latent, cond)) == ["steps: 6 vs 4"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_given_other_prompts_or_seeds_all_raise_then_run_equal_inputs(tmp_path):
    """One launch of two ranks: rank 0 alone passes its prompts in the other order (both
    ranks raise, naming the text conditioning), then seed 1 instead of 0 (both raise,
    naming the initial latent); then every rank passes the same inputs and returns the
    reference's images bit for bit, in the same process group."""
    results = launch(tmp_path, 2, 2, 1, STEPS, "--mismatches", "--at-rank", 0)
    expected = reference_images(2, 1)
    for rank, (code, record, log) in results.items():
        assert code == 0 and record is not None and "error" not in record, f"rank {rank}:\n{record}\n{log}"
        prompts, seed = record["mismatches"]
        for raised in (prompts, seed):
            assert raised is not None, f"rank {rank} generated from inputs that differ from the host's"
            assert raised["type"] == "GenerationMismatch", raised
            assert raised["error"].startswith("rank 0 runs a different generation than the host (rank 1): ")
            assert "with the same arguments: the same prompt" in raised["error"], raised
        assert "<arg>['encoder_hidden_states']" in prompts["error"] and LATENT not in prompts["error"], prompts
        assert LATENT in seed["error"] and "encoder_hidden_states" not in seed["error"], seed
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected), f"rank {rank} differs"
