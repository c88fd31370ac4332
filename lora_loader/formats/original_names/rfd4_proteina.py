"""RFD4 Proteina (``RFD4ProteinaPipeline``, a protein design model: ``RFD4ProteinaTransformer``): no original names to
map, only what tells ``lora-loader inspect`` the family.

diffusers' ``RFD4ProteinaLoraLoaderMixin`` converts nothing: a LoRA in diffusers' names
(``transformer.transformer_layers.0.mhba.mha.to_q.lora_A.weight``) loads by module path. The trunk's biased attention
(``mhba``), the pair updates and the recycling projections are Proteina's alone.
"""

from __future__ import annotations

from .engine import Family

RFD4_PROTEINA = Family(
    "RFD4 Proteina",
    hint="RFD4 Proteina LoRAs are in diffusers' names",
    key="rfd4-proteina",
    detect=(
        r"^transformer_layers_\d+_(mhba|transition)_",
        r"^pair_update_layers_\d+_",
        r"^(s_cycle_proj|z_cycle_proj|insertion_[qk]_proj)$",
    ),
    header_hints=("proteina",),
)  # fmt: skip
