"""Chroma (lodestones' Flux.1-schnell derivative) in its checkpoint's module names -> diffusers' `ChromaTransformer2DModel`.

Flux.1's blocks without their modulation Linears (Chroma computes every block's modulation in one
``distilled_guidance_layer``: ``in_proj``, ``layers.N.in_layer`` / ``out_layer``, ``out_proj``; diffusers'
``linear_1`` / ``linear_2`` for the layers' two), no ``vector_in``, no ``guidance_in``, no final adaLN Linear,
as diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers`` maps them. A file in the names Chroma
shares with Flux.1 reads the same in either table; only the distilled guidance layer's names make it Chroma's.
"""

from __future__ import annotations

from .engine import Blocks, Family
from .flux import FLUX

_DOUBLE, _SINGLE = FLUX.blocks
CHROMA = Family(
    "Chroma",
    hint="double_blocks_*, single_blocks_*, distilled_guidance_layer_*, ...",
    blocks=(
        Blocks(_DOUBLE.original, _DOUBLE.diffusers, {k: v for k, v in _DOUBLE.modules.items() if not k.endswith("_mod_lin")}),
        Blocks(_SINGLE.original, _SINGLE.diffusers, {k: v for k, v in _SINGLE.modules.items() if k != "modulation_lin"}),
        Blocks("distilled_guidance_layer_layers_{i}_", "distilled_guidance_layer.layers.{i}.", {
            "in_layer": "linear_1",
            "out_layer": "linear_2",
        }),
    ),
    modules={
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "final_layer_linear": "proj_out",
        "distilled_guidance_layer_in_proj": "distilled_guidance_layer.in_proj",
        "distilled_guidance_layer_out_proj": "distilled_guidance_layer.out_proj",
    },
    key="chroma",
    detect=(r"^distilled_guidance_layer_",),
    header_hints=("chroma",),
    model_classes=("ChromaTransformer2DModel",),
    # Only the distilled guidance layer's names make a file Chroma's: its block names are Flux.1's.
    claim=(r"distilled_guidance_layer_",),
    shapes=FLUX.shapes,
)  # fmt: skip
