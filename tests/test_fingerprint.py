"""fingerprint.Watch: its quick test finds every change the full fingerprint finds (and
only those), on the tiny SD 1.5 UNet, without running a pipeline."""
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from asyncdiff_rt.fingerprint import Watch, fingerprint
from asyncdiff_rt.models.configs import build_unet

warnings.filterwarnings("ignore", category=FutureWarning)


class ScaledProcessor(AttnProcessor):
    def __call__(self, *args, **kwargs):
        return 0.5 * super().__call__(*args, **kwargs)


def in_place_weight(unet):
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.01)


def load_state_dict(unet):
    unet.load_state_dict({k: v * 1.01 for k, v in unet.state_dict().items()})


def assigned_weight(unet):
    unet.conv_in.weight = torch.nn.Parameter(unet.conv_in.weight.detach().clone())


def data_swapped(unet):
    unet.conv_in.weight.data = unet.conv_in.weight.data.clone()


def data_reshaped(unet):  # same address, same version: only the shape tells
    unet.conv_in.bias.data = unet.conv_in.bias.data.view(1, -1)


def dtype_move(unet):
    unet.to(torch.float64)


def train_mode(unet):
    unet.train()


def freeu(unet):
    unet.up_blocks[0].s1 = 0.9  # what enable_freeu sets


def plain_attribute_removed(unet):
    del unet.up_blocks[1].resnets[0].output_scale_factor


def attribute_renamed(unet):  # one removed, one added: the same number of attributes
    block = unet.up_blocks[1].resnets[0]
    value = block.output_scale_factor
    del block.output_scale_factor
    block.output_scale_factor_ = value


def int_to_tensor(unet):  # equal by ==, not the same
    unet.up_blocks[1].resnets[0].output_scale_factor = torch.tensor(unet.up_blocks[1].resnets[0].output_scale_factor)


def processor(unet):
    unet.set_attn_processor(ScaledProcessor())


def processor_attribute(unet):
    next(m for m in unet.modules() if hasattr(m, "processor")).processor.scale = 0.5


def fused(unet):
    unet.fuse_qkv_projections()


def module_swapped(unet):
    unet.conv_out = torch.nn.Conv2d(unet.conv_out.in_channels, unet.conv_out.out_channels, 3, padding=1)


def forward_hook(unet):
    unet.up_blocks[1].register_forward_hook(lambda module, args, out: out)


def pre_hook(unet):
    unet.mid_block.resnets[0].norm1.register_forward_pre_hook(lambda module, args: None)


def hook_dict_replaced_then_used(unet):  # a fresh, equal (empty) dict, then a hook in it
    from collections import OrderedDict
    unet.conv_in._forward_hooks = OrderedDict()
    unet.conv_in.register_forward_hook(lambda module, args, out: out)


def buffer(unet):
    unet.conv_in.register_buffer("extra", torch.zeros(1))


def instance_forward(unet):
    unet.conv_in.forward = lambda x: x  # not a change the fingerprint counts (executors install these)


def list_attribute_mutated(unet):
    unet.conv_in.extra_list = []
    return lambda: unet.conv_in.extra_list.append(1)


CHANGES = [in_place_weight, load_state_dict, assigned_weight, data_swapped, data_reshaped, dtype_move, train_mode,
           freeu, plain_attribute_removed, attribute_renamed, int_to_tensor, processor, processor_attribute, fused,
           module_swapped, forward_hook, pre_hook, hook_dict_replaced_then_used, buffer]


def fresh():
    return build_unet("tiny-sd15", device="cpu", dtype=torch.float32, seed=0).eval()


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__ for c in CHANGES])
def test_every_change_is_found(change):
    unet = fresh()
    watch = Watch(unet)
    assert watch._quick is not None  # the quick test is in use
    assert watch.changed() is None
    before = fingerprint(unet)
    change(unet)
    assert fingerprint(unet) != before  # a change the full fingerprint counts
    assert watch.changed() is not None
    assert watch.changed() is not None  # it stays reported until record()
    watch.record()
    assert watch.changed() is None


def test_a_change_after_an_equal_state_is_found():
    """A value set again (the slow path, found equal) and then a change made in place."""
    unet = fresh()
    watch = Watch(unet)
    mutate = list_attribute_mutated(unet)
    assert watch.changed() is not None
    watch.record()
    unet.up_blocks[0].resnets[0].output_scale_factor = float(unet.up_blocks[0].resnets[0].output_scale_factor)
    assert watch.changed() is None
    mutate()
    assert watch.changed() is not None


def test_what_the_fingerprint_leaves_out_is_no_change():
    unet = fresh()
    watch = Watch(unet)
    instance_forward(unet)
    assert watch.changed() is None
    unet.conv_in.forward_hook_state = None  # a new attribute is a change
    assert watch.changed() is not None
