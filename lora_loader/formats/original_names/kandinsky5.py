"""Kandinsky 5 (``Kandinsky5T2VPipeline``, ``Kandinsky5I2VPipeline``, ``Kandinsky5T2IPipeline``, ``Kandinsky5I2IPipeline``):
no original names to map, only what tells ``lora-loader inspect`` the family.

diffusers' ``KandinskyLoraLoaderMixin`` converts nothing, and diffusers' ``Kandinsky5Transformer3DModel`` keeps the
original checkpoint's module names (``visual_transformer_blocks.N.self_attention.to_query``, ``text_transformer_blocks``,
``out_layer.modulation``), so a LoRA from Kandinsky's own code, ComfyUI (``diffusion_model.``), or diffusers' layout
loads by module path. The text / visual block names are Kandinsky 5's alone.
"""

from __future__ import annotations

from .engine import Family

KANDINSKY5 = Family(
    "Kandinsky 5",
    hint="Kandinsky 5 LoRAs are in its checkpoint's (and diffusers') names",
    key="kandinsky5",
    detect=(
        r"^(visual|text)_transformer_blocks_\d+_",
        r"^(visual|text|pooled_text)_embeddings_in_layer$",
        r"^time_embeddings_(in|out)_layer$",
        r"^out_layer_(modulation_)?out_layer$",
    ),
    header_hints=("kandinsky5", "kandinsky-5", "kandinsky_5"),
)  # fmt: skip
