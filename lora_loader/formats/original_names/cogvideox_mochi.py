"""CogVideoX and Mochi: no original names to map, only what tells ``lora-loader inspect`` the family.

Every producer of their LoRAs writes diffusers' module names (diffusers' training scripts,
finetrainers, cogvideox-factory, THUDM's SAT export, the Mochi fine-tuner through
``MochiPipeline.save_lora_weights``), and diffusers converts nothing for either. Their
attention-only LoRAs (``to_q``, ``to_k``, ``to_v``, ``to_out.0``: the scripts' default) name only
``transformer_blocks.{i}.attn1.*``, which LTX-Video, PixArt and Sana have too, beside an
``attn2``: those rule CogVideoX out. Mochi has 48 blocks where CogVideoX has 30 or 42, and its
joint attention's ``add_*_proj`` / ``to_add_out`` under ``attn1`` (Flux's are under ``attn``).
"""

from __future__ import annotations

from .engine import Family

_OTHERS_WITH_ATTN1 = r"^transformer_blocks_\d+_attn2_"  # LTX-Video (0.9.x, LTX-2), PixArt, Sana, Allegro, Latte

MOCHI = Family(
    "Mochi",
    hint="Mochi LoRAs are in diffusers' names",
    key="mochi",
    detect=(
        r"^transformer_blocks_\d+_attn1_(add_[qkv]_proj|to_add_out)$",
        r"^time_embed_(pooler_|caption_proj$)",
        r"^transformer_blocks_(4[2-7])_attn1_to_",  # blocks 42-47: Mochi-1 has 48, CogVideoX at most 42
    ),
    detect_unless=(_OTHERS_WITH_ATTN1,),
    header_hints=("mochi",),
)

COGVIDEOX = Family(
    "CogVideoX",
    hint="CogVideoX LoRAs are in diffusers' names",
    key="cogvideox",
    detect=(
        r"^patch_embed_text_proj$",
        r"^transformer_blocks_\d+_attn1_to_(q|k|v|out_0)$",
    ),
    detect_unless=(_OTHERS_WITH_ATTN1, r"^transformer_blocks_\d+_attn1_(add_|to_add_out)", r"^time_embed_"),
    header_hints=("cogvideox",),
)
