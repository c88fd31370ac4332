"""Flux.2 (dev, Klein 4B / 9B) in Black Forest Labs' module names -> diffusers' `Flux2Transformer2DModel`.

Flux.2 keeps Flux.1's block names (``double_blocks_{i}_img_attn_qkv``, ``single_blocks_{i}_linear1``)
for other modules: a single block's ``linear1`` is ONE diffusers module (``attn.to_qkv_mlp_proj``:
q, k, v and the SwiGLU MLP's gate and up, ``[d, d, d, 3d, 3d]``), ``linear2`` is ``attn.to_out``, the
MLPs are ``ff.linear_in`` / ``ff.linear_out`` (SwiGLU: ``img_mlp_0`` has ``6d`` rows where Flux.1's has
``4d``), and the per-block modulations are three shared ones (``double_stream_modulation_img_lin``, ...).
The double blocks' fused ``qkv`` splits into ``to_q`` / ``to_k`` / ``to_v`` as in Flux.1 (a LyCORIS
factorisation stays whole: each part takes its rows of the dense product). The final layer's adaLN
modulation is ``(shift, scale)`` in BFL's order and ``(scale, shift)`` in diffusers' (swapped, as
diffusers' single-file conversion does). Names as diffusers' ``_convert_non_diffusers_flux2_lora_to_diffusers``
and ``_convert_kohya_flux2_lora_to_diffusers`` map them.

Which of Flux.1 and Flux.2 a file in these names is for: a name only one has (the shared modulations,
``vector_in``, the per-block ``img_mod``), else the width ratios (``shapes``: ``linear1`` has 9 rows per
input feature in Flux.2, 7 in Flux.1), else the header, else the live model (see `original_names.family_of`).
"""

from __future__ import annotations

from .engine import Blocks, Family, fused, swapped

FLUX2 = Family(
    "Flux.2",
    hint="double_blocks_*, single_blocks_*_linear1, double_stream_modulation_img_lin, ...",
    blocks=(
        Blocks("double_blocks_{i}_", "transformer_blocks.{i}.", {
            "img_attn_proj": "attn.to_out.0",
            "img_attn_qkv": fused("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_mlp_0": "ff.linear_in",
            "img_mlp_2": "ff.linear_out",
            "txt_attn_proj": "attn.to_add_out",
            "txt_attn_qkv": fused("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_mlp_0": "ff_context.linear_in",
            "txt_mlp_2": "ff_context.linear_out",
        }),
        Blocks("single_blocks_{i}_", "single_transformer_blocks.{i}.", {
            "linear1": "attn.to_qkv_mlp_proj",
            "linear2": "attn.to_out",
        }),
    ),
    modules={
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "guidance_in_in_layer": "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img_lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt_lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation_lin": "single_stream_modulation.linear",
        "final_layer_linear": "proj_out",
        "final_layer_adaLN_modulation_1": swapped("norm_out.linear"),
    },
    key="flux2",
    # diffusers' Flux.2 paths no other family has (for `lora-loader inspect` on a converted file).
    detect=(r"attn_to_qkv_mlp_proj$", r"stream_modulation_(img_|txt_)?linear$", r"^time_guidance_embed_",
            r"^transformer_blocks_\d+_ff(_context)?_linear_(in|out)$", r"^single_transformer_blocks_\d+_attn_to_out$"),
    header_hints=("flux-2", "flux.2", "flux2", "flux_2", "klein"),
    model_classes=("Flux2Transformer2DModel",),
    # Its blocks' names, and the shared modulations (top-level, but no other family's names): a file of only
    # those (ai-toolkit trains them too) is Flux.2's.
    claim=(r"double_blocks_\d+_", r"single_blocks_\d+_", r"(double_stream_modulation_(img|txt)|single_stream_modulation)_lin$"),
    # Output rows per input feature of the modules whose widths differ from Flux.1's (d = hidden size).
    shapes=((r"single_blocks_\d+_linear1$", 9), (r"single_blocks_\d+_linear2$", (1, 4)),
            (r"double_blocks_\d+_(img|txt)_mlp_0$", 6), (r"double_blocks_\d+_(img|txt)_mlp_2$", (1, 3))),
)  # fmt: skip
