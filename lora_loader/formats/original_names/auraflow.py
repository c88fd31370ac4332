"""AuraFlow (``AuraFlowPipeline``: AuraFlow 0.x, Pony V7): no original names to map, only what tells
``lora-loader inspect`` the family.

diffusers' ``AuraFlowLoraLoaderMixin`` converts nothing: its LoRAs come from SimpleTuner, diffusers' scripts and
diffusion-pipe (diffusers' model, ``diffusion_model.`` + diffusers' names, as ComfyUI maps AuraFlow LoRAs onto its own
``double_layers`` with ``auraflow_to_diffusers``), which load by module path. ``joint_transformer_blocks`` and the
feed-forward's ``out_projection`` are AuraFlow's alone; its single blocks are named as Flux's diffusers names
(``single_transformer_blocks_N_attn_to_q``), so a file of those only is Flux's unless a header says AuraFlow.
"""

from __future__ import annotations

from .engine import Family

AURAFLOW = Family(
    "AuraFlow",
    hint="AuraFlow LoRAs are in diffusers' names",
    key="auraflow",
    detect=(
        r"^joint_transformer_blocks_\d+_",
        r"^single_transformer_blocks_\d+_ff_(linear_[12]|out_projection)$",
        r"^time_step_proj_linear_[12]$",
    ),
    # SimpleTuner / diffusion-pipe "auraflow", modelspec "auraflow/lora", Pony V7.
    header_hints=("auraflow", "aura_flow", "aura-flow", "pony-v7", "pony_v7", "ponyv7"),
)  # fmt: skip
