"""Qwen-Image (Image, Edit, Edit-Plus, Layered, 2.1): diffusers' ``QwenImageTransformer2DModel``.

Qwen-Image's own checkpoint already uses diffusers' module names (``transformer_blocks.0.attn.to_q``,
``img_mod.1``, ``img_mlp.net.0.proj``, ``txt_in``, ``norm_out.linear``), so every trainer's file names
them so too, behind its prefix and suffix spelling, and loads by module path (no renames):
diffusers / PEFT (``transformer.<path>.lora_A.weight``), ComfyUI / ai-toolkit (``diffusion_model.``),
Kohya / musubi-tuner (``lora_unet_transformer_blocks_0_attn_to_q``), DiffSynth-Studio
(``<path>.lora_A.default.weight``), Qwen-Image-Lightning (``<path>.lora_down.weight`` + ``.alpha``),
LoKr (``diffusion_model.<path>.lokr_w1``, ``lycoris_<path>.lokr_w1``). This entry only names the family:
`detect` lists the diffusers names no other family has, for ``lora-loader inspect``.
"""

from __future__ import annotations

from .engine import Family

QWEN_IMAGE = Family(
    "Qwen-Image",
    hint="transformer_blocks_*_img_mod_1, transformer_blocks_*_txt_mlp_net_0_proj, ...",
    key="qwen-image",
    model_classes=("QwenImageTransformer2DModel",),
    # The per-stream modulation and MLPs (img_mod / txt_mod, img_mlp / txt_mlp) and the text input norm.
    detect=(r"^transformer_blocks_\d+_(img|txt)_(mod_1|mlp_net_0_proj|mlp_net_2)$", r"^txt_norm$"),
    # musubi-tuner "qwen_image", ai-toolkit "qwen_image" / "qwen_image_edit", modelspec "qwen-image/lora".
    header_hints=("qwen_image", "qwen-image", "qwenimage"),
)  # fmt: skip
