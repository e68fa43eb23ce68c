"""The reference code's published splits, as dotted module paths.

A path names a unit or every unit under it ("down_blocks.1" = the whole block). The
family is recognised by block structure, never by a hub id, so fine-tuned checkpoints
and scaled-down test UNets of the same layout get their family's table.
"""
import torch

_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_XL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_XL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
_X4_DOWN = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3
_X4_UP = ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]
_SVD_DOWN = ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"]
_SVD_UP = ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3
_MOTION_DOWN = ["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"]
_MOTION_UP = ["UpBlockMotion"] + ["CrossAttnUpBlockMotion"] * 3
_MOTION_XL_DOWN = ["DownBlockMotion", "CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion"]
_MOTION_XL_UP = ["CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion", "UpBlockMotion"]


def _layers(block, *names):
    return [f"{block}.{name}" for name in names]


_R0A0R1 = ("resnets.0", "attentions.0", "resnets.1")

SPLITS = {
    "sd15": {
        2: [
            ["conv_in", "down_blocks", "mid_block", "up_blocks.0", *_layers("up_blocks.1", *_R0A0R1)],
            [*_layers("up_blocks.1", "attentions.1", "resnets.2", "attentions.2", "upsamplers"),
             "up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"],
        ],
        3: [
            ["conv_in", "down_blocks"],
            ["mid_block", "up_blocks.0", "up_blocks.1",
             *_layers("up_blocks.2", *_R0A0R1, "attentions.1", "resnets.2")],
            [*_layers("up_blocks.2", "attentions.2", "upsamplers"), "up_blocks.3", "conv_norm_out", "conv_out"],
        ],
        4: [
            ["conv_in", "down_blocks.0", "down_blocks.1"],
            ["down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", *_layers("up_blocks.1", *_R0A0R1)],
            [*_layers("up_blocks.1", "attentions.1", "resnets.2", "attentions.2", "upsamplers"), "up_blocks.2"],
            ["up_blocks.3", "conv_norm_out", "conv_out"],
        ],
    },
    "sd21": {
        2: [
            ["conv_in", "down_blocks", "mid_block", "up_blocks.0",
             *_layers("up_blocks.1", *_R0A0R1, "attentions.1", "resnets.2")],
            [*_layers("up_blocks.1", "attentions.2", "upsamplers"), "up_blocks.2", "up_blocks.3",
             "conv_norm_out", "conv_out"],
        ],
        3: [
            ["conv_in", "down_blocks"],
            ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"],
            ["up_blocks.3", "conv_norm_out", "conv_out"],
        ],
        4: [
            ["conv_in", "down_blocks.0", "down_blocks.1"],
            ["down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"],
            ["up_blocks.2", "up_blocks.3.resnets.0"],
            [*_layers("up_blocks.3", "attentions.0", "resnets.1", "attentions.1", "resnets.2", "attentions.2"),
             "conv_norm_out", "conv_out"],
        ],
    },
    "sdxl": {
        2: [
            ["down_blocks.2", "mid_block", *_layers("up_blocks.0", *_R0A0R1, "attentions.1")],
            ["conv_in", "down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2", "conv_norm_out",
             "conv_out", *_layers("up_blocks.0", "resnets.2", "attentions.2", "upsamplers")],
        ],
        3: [
            ["down_blocks.2", "mid_block", "up_blocks.0.resnets.0"],
            [*_layers("up_blocks.0", "attentions.0", "resnets.1", "attentions.1", "resnets.2", "attentions.2",
                      "upsamplers")],
            ["conv_in", "down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2", "conv_norm_out",
             "conv_out"],
        ],
        4: [
            [*_layers("down_blocks.1", "attentions.0", "resnets.1", "attentions.1", "downsamplers"),
             "down_blocks.2"],
            ["mid_block", "up_blocks.0.resnets.0", "up_blocks.0.attentions.0"],
            [*_layers("up_blocks.0", "resnets.1", "attentions.1", "resnets.2", "attentions.2", "upsamplers")],
            ["conv_in", "down_blocks.0", "down_blocks.1.resnets.0", "up_blocks.1", "up_blocks.2",
             "conv_norm_out", "conv_out"],
        ],
    },
    # Stable Video Diffusion img2vid-xt (UNetSpatioTemporalConditionModel), stride 1.
    "svd": {
        2: [
            ["conv_in", "down_blocks", "mid_block", "up_blocks.0", "up_blocks.1"],
            ["up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"],
        ],
        3: [
            ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
            ["down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"],
            ["up_blocks.3", "conv_norm_out", "conv_out"],
        ],
        4: [
            ["down_blocks.1.resnets.0", "down_blocks.1.attentions.0", "conv_in", "down_blocks.0"],
            [*_layers("down_blocks.1", "resnets.1", "attentions.1", "downsamplers"), "down_blocks.2", "down_blocks.3",
             "mid_block", "up_blocks.0", "up_blocks.1"],
            ["up_blocks.2", "up_blocks.3.resnets.0", "up_blocks.3.attentions.0"],
            [*_layers("up_blocks.3", "resnets.1", "attentions.1", "resnets.2", "attentions.2"),
             "conv_norm_out", "conv_out"],
        ],
    },
    # AnimateDiff (UNetMotionModel from SD 1.5): the reference code's table for the SD 1.5
    # checkpoint it runs AnimateDiff with. Whole blocks, so their motion modules go with them.
    "animatediff": {
        2: [
            ["conv_in", "down_blocks", "mid_block", "up_blocks.0", "up_blocks.1"],
            ["up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"],
        ],
        3: [
            ["conv_in", "down_blocks"],
            ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"],
            ["up_blocks.3", "conv_norm_out", "conv_out"],
        ],
    },
    # Stable Diffusion x4 upscaler.
    "upscaler": {
        2: [
            ["conv_in", "down_blocks", "mid_block", "up_blocks.0",
             *_layers("up_blocks.1", "attentions.0", "resnets.0", "attentions.1", "resnets.1")],
            # The reference code lists up_blocks[0].upsamplers here, a module component 0 already
            # holds (all of up_blocks[0]), and up_blocks[1].upsamplers nowhere: it can only mean
            # up_blocks.1's, the layer that follows up_blocks.1.resnets.2.
            [*_layers("up_blocks.1", "attentions.2", "resnets.2", "upsamplers"), "up_blocks.2", "up_blocks.3",
             "conv_norm_out", "conv_out"],
        ],
        3: [
            ["conv_in", "down_blocks"],
            ["mid_block", "up_blocks.0", "up_blocks.1",
             *_layers("up_blocks.2", "attentions.0", "resnets.0", "attentions.1")],
            [*_layers("up_blocks.2", "resnets.1", "attentions.2", "resnets.2", "upsamplers"), "up_blocks.3",
             "conv_norm_out", "conv_out"],
        ],
        4: [
            ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
            ["down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"],
            ["up_blocks.2"],
            ["up_blocks.3", "conv_norm_out", "conv_out"],
        ],
    },
}


def _block_types(denoiser, name):
    return [type(block).__name__ for block in getattr(denoiser, name, [])]


def recognise_family(denoiser):
    """The family of `denoiser`'s block structure: 'sd15', 'sd21', 'sdxl', 'upscaler',
    'svd', 'animatediff' or 'animatediff-sdxl' (a layout with no published split), else None.
    Block types, two layers per down block, and for image UNets the projection style and
    the noise-level class embedding; never a hub id."""
    down, up = _block_types(denoiser, "down_blocks"), _block_types(denoiser, "up_blocks")
    if not all(hasattr(denoiser, m) for m in ("conv_in", "mid_block", "conv_out")):
        return None
    if any(len(getattr(b, "resnets", ())) != 2 for b in denoiser.down_blocks):
        return None
    if down == _SVD_DOWN and up == _SVD_UP:
        return "svd"
    if down == _MOTION_DOWN and up == _MOTION_UP:
        return "animatediff"
    if down == _MOTION_XL_DOWN and up == _MOTION_XL_UP:
        return "animatediff-sdxl"
    if down == _XL_DOWN and up == _XL_UP:
        return "sdxl"
    if down == _SD_DOWN and up == _SD_UP:
        # SD 2.x transformers project with Linear layers, SD 1.x with 1x1 convolutions.
        linear = isinstance(denoiser.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
        return "sd21" if linear else "sd15"
    if down == _X4_DOWN and up == _X4_UP and getattr(denoiser, "class_embedding", None) is not None:
        return "upscaler"  # the noise level of the low-resolution image enters as a class label
    return None
