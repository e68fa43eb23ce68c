"""A UNet with SD 1.5's block types, two of each, one layer per block: the smallest
whose kernel sites are those of the real layout, for tests that pay per kernel launch
(Triton's interpreter) or per compiled graph."""
import torch
from diffusers import UNet2DConditionModel


def small_unet(attention=True):
    """`attention=False`: no cross-attention blocks and no middle block (fewer graphs to compile)."""
    torch.manual_seed(0)
    cross = "CrossAttn" if attention else ""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=(f"{cross}DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", f"{cross}UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn" if attention else None,
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).eval()
