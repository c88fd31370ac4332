"""SANA (``SanaPipeline``, Sana Sprint, ``SanaControlNetPipeline``) and SANA-Video (``SanaVideoPipeline``, image-to-video):
no original names to map, only what tells ``lora-loader inspect`` the family.

diffusers' ``SanaLoraLoaderMixin`` converts nothing: its LoRAs come from diffusers' ``train_dreambooth_lora_sana.py``
(which NVlabs' Sana repo uses for its LoRA recipe), SimpleTuner (diffusers / PEFT layout) and OneTrainer (Kohya keys in
diffusers' names, ``lora_transformer_transformer_blocks_0_attn1_to_q``), all in diffusers' module names, which load by
module path. The Mix-FFN's 1x1 / depthwise convolutions (``ff.conv_inverted`` / ``conv_depth`` / ``conv_point``, SANA-Video's
``conv_temp``) and Sprint's guidance embedder are SANA's alone; attention-only files (the training script's default
``to_q``, ``to_k``, ``to_v``) name ``attn1`` / ``attn2`` as LTX-Video and PixArt do: their self-attention's input
width tells SANA's (1152: 600M / Sprint 0.6B; 2240: 1.6B, 4.8B, Sprint 1.6B, SANA-Video 2B) from LTX-Video's (2048),
and not from PixArt's (1152), which no entry names.
"""

from __future__ import annotations

from .engine import Family

SANA = Family(
    "SANA",
    hint="SANA LoRAs are in diffusers' names",
    key="sana",
    detect=(
        r"^transformer_blocks_\d+_ff_conv_(inverted|depth|point|temp)$",
        r"^time_embed_guidance_embedder_linear_[12]$",
    ),
    detect_widths=((r"^transformer_blocks_\d+_attn1_(to_q|to_k|to_v)$", (1152, 2240)),),
    # SimpleTuner / ai-toolkit "sana", modelspec "sana-1600m/lora", SANA-Video "sana_video".
    header_hints=("sana",),
)  # fmt: skip
