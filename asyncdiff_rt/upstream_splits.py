"""The reference code's published splits, as dotted module paths.

A path names a unit or every unit under it ("down_blocks.1" = the whole block). The
family is recognised by block structure, never by a hub id, so fine-tuned checkpoints
and scaled-down test UNets of the same layout get their family's table.

SD3's split is equal chunks of its joint blocks, so it scales with the block count: the
family `recognise_family` returns for an SD3 transformer is the string "sd3" carrying its
block count (`Family.blocks`), and `SPLITS.get` of it gives the table for that count;
`SPLITS["sd3"]` is the published one (SD 3 Medium, 24 blocks).
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


class Family(str):
    """A family name (compares and prints as the plain string) that may carry the block
    count its table scales with."""

    blocks = None

    def __new__(cls, name, blocks=None):
        family = super().__new__(cls, name)
        family.blocks = blocks
        return family


SD3_BLOCKS = 24  # SD 3 Medium's joint blocks, the layout the reference code splits
SD3_COUNTS = (2, 3, 4)  # the component counts the reference code runs SD3 with


def sd3_split(blocks, n):
    """The reference code's SD3 split for `blocks` joint transformer blocks and `n`
    components: equal contiguous chunks in order (24 blocks: 0-11 | 12-23 for N=2, 0-7 |
    8-15 | 16-23 for N=3, 0-5 | 6-11 | 12-17 | 18-23 for N=4); where the count does not
    divide, the first chunks take one block more. The last component also runs norm_out
    and proj_out (the output). `pos_embed`, the patch embedding that reads the latent, is a
    unit here but no block in the reference's table: component 0 gets it, as it feeds
    block 0. (context_embedder and time_text_embed read only the conditioning: shared, on
    every device.)"""
    if not 1 <= n <= blocks:
        raise ValueError(f"{blocks} joint blocks cannot be split into {n} components")
    size, extra = divmod(blocks, n)
    table, start = [], 0
    for c in range(n):
        stop = start + size + (c < extra)
        table.append([f"transformer_blocks.{b}" for b in range(start, stop)])
        start = stop
    table[0].insert(0, "pos_embed")
    table[-1] += ["norm_out", "proj_out"]
    return table


class _Splits(dict):
    """family -> {N: table}; a family that carries its block count gets its table scaled."""

    _SCALED = {"sd3": (sd3_split, SD3_COUNTS)}

    def get(self, family, default=None):
        blocks = getattr(family, "blocks", None)
        if blocks is not None and family in self._SCALED:
            split, counts = self._SCALED[family]
            return {n: split(blocks, n) for n in counts if n <= blocks}
        return super().get(family, default)


SPLITS = _Splits({
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
    # Stable Diffusion 3 Medium (SD3Transformer2DModel, 24 JointTransformerBlocks): equal
    # chunks of blocks, the output layers last, pos_embed with block 0 (see `sd3_split`).
    "sd3": {n: sd3_split(SD3_BLOCKS, n) for n in SD3_COUNTS},
})


def _block_types(denoiser, name):
    return [type(block).__name__ for block in getattr(denoiser, name, [])]


def _is_sd3(denoiser):
    """An SD3Transformer2DModel-like layout: patch embedding, a list of joint
    (MMDiT) blocks, the output norm and projection; FLUX's extra single-stream blocks excluded."""
    blocks = _block_types(denoiser, "transformer_blocks")
    return (bool(blocks) and set(blocks) == {"JointTransformerBlock"}
            and all(hasattr(denoiser, m) for m in ("pos_embed", "norm_out", "proj_out"))
            and not hasattr(denoiser, "single_transformer_blocks"))


def recognise_family(denoiser):
    """The family of `denoiser`'s block structure: 'sd15', 'sd21', 'sdxl', 'upscaler',
    'svd', 'animatediff', 'sd3' (a `Family` carrying its joint block count; SD 3 Medium,
    SD 3.5 and scaled-down ones) or 'animatediff-sdxl' (a layout with no published split),
    else None. Block types, two layers per down block, and for image UNets the projection
    style and the noise-level class embedding; never a hub id."""
    if _is_sd3(denoiser):
        return Family("sd3", blocks=len(denoiser.transformer_blocks))
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
