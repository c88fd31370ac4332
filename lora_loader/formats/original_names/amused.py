"""aMUSEd (``AmusedLoraLoaderMixin``: the ``transformer``, a ``UVit2DModel``, and the CLIP ``text_encoder``): no original
names to map, only what tells ``lora-loader inspect`` the family.

diffusers' aMUSEd LoRAs (its ``train_amused.py``, the mixin's ``save_lora_weights``) are in diffusers' names
(``transformer.transformer_layers.0.attn1.to_q.lora_A.weight``), which load by module path; the SD mixin's Kohya
conversion meets no aMUSEd file. The U-ViT's ``transformer_layers``, its conv blocks (``down_block.res_blocks``,
``channelwise_linear``) and the hidden projections are aMUSEd's alone.
"""

from __future__ import annotations

from .engine import Family

AMUSED = Family(
    "aMUSEd",
    hint="aMUSEd LoRAs are in diffusers' names",
    key="amused",
    detect=(
        r"^transformer_layers_\d+_(attn[12]_|norm[123]_linear$|ff_net_)",
        r"^(down|up)_block_(res_blocks|attention_blocks)_\d+_",
        r"^(project_(to|from)_hidden|mlm_layer_conv[12])$",
    ),
    header_hints=("amused",),
)  # fmt: skip
