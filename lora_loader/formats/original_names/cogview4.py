"""CogView4 (``CogView4Pipeline``, ``CogView4ControlPipeline``): no original names to map, only what tells
``lora-loader inspect`` the family.

diffusers' ``CogView4LoraLoaderMixin`` converts nothing: its LoRAs come from diffusers' training scripts, finetrainers
and SimpleTuner, in diffusers' module names, which load by module path. The time-and-size embedder
(``time_condition_embed``) is CogView4's alone; ``patch_embed.text_proj`` and ``attn1``-only blocks are CogVideoX's names
too (so this entry comes before CogVideoX's); an attention-only file (finetrainers' default ``to_q``, ``to_k``, ``to_v``,
``to_out.0``) is CogView4's by its width (4096: CogVideoX's are 1920 / 3072) and the absence of a cross-attention
(LTX-2's ``attn1`` is 4096 wide too, beside an ``attn2``).
"""

from __future__ import annotations

from .engine import Family

COGVIEW4 = Family(
    "CogView4",
    hint="CogView4 LoRAs are in diffusers' names",
    key="cogview4",
    detect=(r"^time_condition_embed_(timestep|condition)_embedder_linear_[12]$",),
    detect_widths=((r"^transformer_blocks_\d+_attn1_(to_q|to_k|to_v)$", (4096,)),),
    detect_unless=(r"^transformer_blocks_\d+_attn2_",),
    # finetrainers / SimpleTuner "cogview4", modelspec "cogview4/lora".
    header_hints=("cogview4", "cogview-4", "cogview_4"),
)  # fmt: skip
