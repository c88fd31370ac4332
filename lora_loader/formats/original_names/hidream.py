"""HiDream-I1 / E1 (``HiDreamImagePipeline``): diffusers' ``HiDreamImageTransformer2DModel``.

HiDream's own checkpoint (and ComfyUI's ``comfy/ldm/hidream``) already uses diffusers' module names
(``double_stream_blocks.0.block.attn1.to_q``, ``...block.ff_i.experts.0.w1``, ``single_stream_blocks.0.block
.adaLN_modulation.1``, ``caption_projection.0.linear``), so diffusers' ``_convert_non_diffusers_hidream_lora_to_diffusers``
only strips ``diffusion_model.``, and every trainer's file names them so behind its prefix and suffix spelling:
diffusers / PEFT (``transformer.<path>.lora_A.weight``), ComfyUI / diffusion-pipe / ai-toolkit (``diffusion_model.``),
Kohya-style (``lora_unet_double_stream_blocks_0_block_attn1_to_q``), LyCORIS (``lycoris_``). They load by module
path (no renames); this entry only names the family for ``lora-loader inspect``.
"""

from __future__ import annotations

from .engine import Family

HIDREAM = Family(
    "HiDream",
    hint="double_stream_blocks_*_block_attn1_to_q, single_stream_blocks_*_block_ff_i_experts_*_w1, ...",
    key="hidream",
    model_classes=("HiDreamImageTransformer2DModel",),
    # The dual / single stream blocks' wrapped ``block`` and its MoE feed-forward, the caption projections.
    detect=(
        r"^(double|single)_stream_blocks_\d+_block_",
        r"^caption_projection_\d+_linear$",
    ),
    # ai-toolkit "hidream", diffusion-pipe "hidream", modelspec "hidream-i1/lora".
    header_hints=("hidream",),
)  # fmt: skip
