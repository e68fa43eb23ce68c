"""A UNet with SD 1.5's block types, two of each, one layer per block: the smallest
whose stages (kernel sites, compiled unit classes) are those of the real layout, for
tests that pay per kernel launch (Triton's interpreter) or per compiled graph."""
import torch
from diffusers import UNet2DConditionModel


def small_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).eval()
