"""The SD / SDXL UNet in Stability's original (LDM / SGM) names, which sd-scripts writes for SDXL.

Unlike a DiT's table (`engine.Family`), the UNet's Stability names number its layers
across blocks (``input_blocks.{n}``), so the map is read off the live UNet's blocks:
`unet_sgm_prefixes` gives diffusers prefix -> Stability prefix, and `sgm_name` a
module's Stability name. `names.ModuleIndex` makes these aliases of the live modules
(loading), and `save.to_kohya` writes them for SDXL (saving). The fixed parts are data:
`TOP_LEVEL` (modules outside the blocks) and `RESNET_TO_SGM` (a resnet's children).
"""

from __future__ import annotations

from torch import nn

# diffusers UNet2DConditionModel top-level module -> Stability name
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers ResnetBlock2D child -> Stability (LDM/SGM) name
RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_sgm_prefixes(unet: nn.Module) -> dict[str, str]:
    """diffusers UNet2DConditionModel prefixes -> Stability layout prefixes, read off the live blocks.

    Follows the layout of sd-scripts' ``make_unet_conversion_map`` (and
    diffusers' SGM converter): ``input_blocks.{n}.0`` resnets, ``.1`` attentions,
    ``input_blocks.{n}.0.op`` downsamplers; ``middle_block.{0,1,2}``;
    ``output_blocks.{n}.{0,1}`` and the upsampler as the block's last layer.
    """
    if not all(hasattr(unet, attr) for attr in ("down_blocks", "up_blocks", "conv_in")):
        return {}
    prefixes = dict(TOP_LEVEL)
    n = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if attentions is not None and j < len(attentions):
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if getattr(block, "downsamplers", None):
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None and hasattr(mid, "resnets"):
        prefixes["mid_block.resnets.0"] = "middle_block.0"
        if getattr(mid, "attentions", None):
            prefixes["mid_block.attentions.0"] = "middle_block.1"
            prefixes["mid_block.resnets.1"] = "middle_block.2"
        elif len(mid.resnets) > 1:
            prefixes["mid_block.resnets.1"] = "middle_block.1"
    n = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if attentions is not None and j < len(attentions):
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            n += 1
        if getattr(block, "upsamplers", None):
            slot = 2 if attentions is not None else 1
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n - 1}.{slot}.conv"
    return prefixes


def sgm_name(name: str, prefixes: dict[str, str]) -> str | None:
    """The Stability name of diffusers module ``name``, given `unet_sgm_prefixes`, or None.

    >>> sgm_name("down_blocks.0.resnets.1.conv1", {"down_blocks.0.resnets.1": "input_blocks.2.0"})
    'input_blocks.2.0.in_layers.2'
    """
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in head and rest and rest[0] in RESNET_TO_SGM:
                rest = [RESNET_TO_SGM[rest[0]], *rest[1:]]
            return ".".join([prefixes[head], *rest])
    return None
