"""The trace cache's key (structure.py): equal for denoisers that trace alike, different
for every change a trace could see."""
import functools

import torch
from diffusers.models.attention_processor import AttnProcessor

from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.plan import traced_units
from asyncdiff_rt.structure import structure
from asyncdiff_rt.trace import unet_inputs


def _unet(seed=0):
    return build_unet("tiny-sd15", device="cpu", dtype=torch.float32, seed=seed)


def _scaled(factor):
    def hook(module, args, output):
        return output * factor

    return hook


def test_other_weights_and_objects_of_the_same_model_are_the_same_structure():
    first, second = _unet(seed=0), _unet(seed=1)
    assert not torch.equal(first.conv_in.weight, second.conv_in.weight)
    assert structure(first) == structure(second)
    first.load_state_dict(second.state_dict())
    assert structure(first) == structure(second)


def test_every_change_a_trace_can_see_is_another_structure():
    base = structure(_unet())
    changes = {
        "dtype": lambda u: u.to(torch.float64),
        "processor": lambda u: u.set_attn_processor(AttnProcessor()),
        "freeu": lambda u: u.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
        "hook": lambda u: u.mid_block.register_forward_hook(_scaled(2.0)),
        "module": lambda u: setattr(u, "conv_out", torch.nn.Conv2d(32, 4, 3, padding=1)),
        "mode": lambda u: u.train(not u.training),
        "tied": lambda u: setattr(u.conv_out, "weight", u.conv_in.weight),
    }
    for name, change in changes.items():
        unet = _unet()
        change(unet)
        assert structure(unet) != base, name


def test_hooks_differ_by_what_they_close_over_and_what_they_bind():
    one, other = _unet(), _unet()
    one.mid_block.register_forward_hook(_scaled(2.0))
    other.mid_block.register_forward_hook(_scaled(3.0))
    assert structure(one) != structure(other)
    one, other = _unet(), _unet()
    one.mid_block.register_forward_hook(functools.partial(_scaled(2.0).__call__))
    other.mid_block.register_forward_hook(functools.partial(_scaled(3.0).__call__))
    assert structure(one) != structure(other)


def test_a_second_denoiser_of_the_same_model_reuses_the_trace_and_a_changed_one_does_not():
    first, second = build_unet("tiny-sd15"), build_unet("tiny-sd15")  # meta: cheap traces
    graph = traced_units(first, unet_inputs(first))
    assert traced_units(second, unet_inputs(second)) is graph
    second.mid_block.register_forward_hook(lambda module, args, output: output + args[0])
    assert traced_units(second, unet_inputs(second)) is not graph
    assert traced_units(first, unet_inputs(first, height=16, width=16)) is not graph  # another input layout
