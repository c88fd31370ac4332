"""Flux.1 in Black Forest Labs' module names (sd-scripts, ComfyUI, BFL's Control LoRAs) -> diffusers' Flux transformer.

BFL's attention projections are fused: ``double_blocks_{i}_img_attn_qkv`` is diffusers'
``to_q``/``to_k``/``to_v`` stacked by rows, and ``single_blocks_{i}_linear1`` is
``to_q``/``to_k``/``to_v``/``proj_mlp`` (``[d, d, d, 4d]``, Flux's MLP ratio 4). The final
layer's adaLN modulation is ``(shift, scale)`` in BFL's order and ``(scale, shift)`` in
diffusers'. Names as diffusers' ``_convert_kohya_flux_lora_to_diffusers`` maps them.
"""

from __future__ import annotations

from .engine import Blocks, Family, fused, swapped

FLUX = Family(
    "Flux",
    hint="double_blocks_*, single_blocks_*, img_in, ...",
    blocks=(
        Blocks("double_blocks_{i}_", "transformer_blocks.{i}.", {
            "img_attn_proj": "attn.to_out.0",
            "img_attn_qkv": fused("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_mlp_0": "ff.net.0.proj",
            "img_mlp_2": "ff.net.2",
            "img_mod_lin": "norm1.linear",
            "txt_attn_proj": "attn.to_add_out",
            "txt_attn_qkv": fused("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_mlp_0": "ff_context.net.0.proj",
            "txt_mlp_2": "ff_context.net.2",
            "txt_mod_lin": "norm1_context.linear",
        }),
        Blocks("single_blocks_{i}_", "single_transformer_blocks.{i}.", {
            "linear1": fused(("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4)),
            "linear2": "proj_out",
            "modulation_lin": "norm.linear",
        }),
    ),
    modules={
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear": "proj_out",
        "final_layer_adaLN_modulation_1": swapped("norm_out.linear"),
    },
    key="flux",
    model_classes=("FluxTransformer2DModel",),
    # Flux.2 names these modules alike; its widths differ (see `flux2.FLUX2`).
    shapes=((r"single_blocks_\d+_linear1$", 7), (r"single_blocks_\d+_linear2$", (1, 5)),
            (r"double_blocks_\d+_(img|txt)_mlp_0$", 4), (r"double_blocks_\d+_(img|txt)_mlp_2$", (1, 4))),
)  # fmt: skip
