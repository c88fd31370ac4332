"""ERNIE-Image (``ErnieImagePipeline``): no original names to map, only what tells ``lora-loader inspect`` the family.

diffusers' ``ErnieImageLoraLoaderMixin`` only rewrites the prefix (PEFT's ``base_model.model.`` and ai-toolkit's /
ComfyUI's ``diffusion_model.`` -> ``transformer.``): the checkpoint's names are diffusers' (``layers.N.self_attention.to_q``,
``layers.N.mlp.gate_proj``), so ai-toolkit, musubi-tuner (``lora_unet_layers_0_self_attention_to_q``), OneTrainer and
PEFT files load by module path. The ``self_attention.to_q`` / ``mlp.linear_fc2`` block names and the final norm are ERNIE's
alone (its ``time_embedding`` is no SD UNet's).
"""

from __future__ import annotations

from .engine import Family

ERNIE_IMAGE = Family(
    "ERNIE-Image",
    hint="ERNIE-Image LoRAs are in its checkpoint's (and diffusers') names",
    key="ernie-image",
    detect=(
        r"^layers_\d+_self_attention_(to_q|to_k|to_v|to_out_0)$",
        r"^layers_\d+_mlp_linear_fc2$",  # not gate_proj / up_proj: a causal LM's layers_N_mlp_ names
        r"^final_norm_linear$",
    ),
    # ai-toolkit / musubi-tuner "ernie_image", modelspec "ernie-image/lora".
    header_hints=("ernie",),
)  # fmt: skip
