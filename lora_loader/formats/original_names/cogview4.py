"""CogView4 (``CogView4Pipeline``, ``CogView4ControlPipeline``): no original names to map, only what tells
``lora-loader inspect`` the family.

diffusers' ``CogView4LoraLoaderMixin`` converts nothing: its LoRAs come from diffusers' training scripts, finetrainers
and SimpleTuner, in diffusers' module names, which load by module path. The time-and-size embedder
(``time_condition_embed``) is CogView4's alone; ``patch_embed.text_proj`` and ``attn1``-only blocks are CogVideoX's names
too (so this entry comes before CogVideoX's), and an attention-only file is told from CogVideoX's only by a header.
"""

from __future__ import annotations

from .engine import Family

COGVIEW4 = Family(
    "CogView4",
    hint="CogView4 LoRAs are in diffusers' names",
    key="cogview4",
    detect=(r"^time_condition_embed_(timestep|condition)_embedder_linear_[12]$",),
    # finetrainers / SimpleTuner "cogview4", modelspec "cogview4/lora".
    header_hints=("cogview4", "cogview-4", "cogview_4"),
)  # fmt: skip
