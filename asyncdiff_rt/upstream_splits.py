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
}


def _block_types(denoiser, name):
    return [type(block).__name__ for block in getattr(denoiser, name, [])]


def recognise_family(denoiser):
    """'sd15', 'sd21' or 'sdxl' when the block structure matches, else None."""
    down, up = _block_types(denoiser, "down_blocks"), _block_types(denoiser, "up_blocks")
    if not all(hasattr(denoiser, m) for m in ("conv_in", "mid_block", "conv_out")):
        return None
    if any(len(b.resnets) != 2 for b in denoiser.down_blocks):
        return None
    if down == _XL_DOWN and up == _XL_UP:
        return "sdxl"
    if down == _SD_DOWN and up == _SD_UP:
        # SD 2.x transformers project with Linear layers, SD 1.x with 1x1 convolutions.
        linear = isinstance(denoiser.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
        return "sd21" if linear else "sd15"
    return None
