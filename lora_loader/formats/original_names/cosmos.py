"""Cosmos Predict 2.5 (``Cosmos2_5_PredictBasePipeline``, the one pipeline ``CosmosLoraLoaderMixin`` serves): what tells
``lora-loader inspect`` the family.

diffusers' ``CosmosLoraLoaderMixin`` converts nothing: a LoRA in diffusers' names (``transformer_blocks.N.attn1.to_q``,
``norm1.linear_1`` adaLN-LoRA layers) loads by module path. The DiT (``CosmosTransformer3DModel``) is Cosmos-Predict2's,
which Anima uses too (Anima's table maps the checkpoint's ``blocks.N.self_attn.q_proj`` names onto it): a file in
those names or with Anima's text conditioner is Anima's; the cross-attention projection of Predict 2.5's text
features (``crossattn_proj``) is Cosmos 2.5's alone.
"""

from __future__ import annotations

from .engine import Family

COSMOS = Family(
    "Cosmos Predict 2.5",
    hint="Cosmos LoRAs are in diffusers' names",
    key="cosmos",
    detect=(
        r"^crossattn_proj_\d+$",
        r"^transformer_blocks_\d+_norm[123]_linear_[12]$",
        r"^(patch_embed_proj|time_embed_t_embedder_linear_[12])$",
    ),
    header_hints=("cosmos",),
)  # fmt: skip
