"""SD3 / SD3.5 in Stability's original ("MMDiT") module names, as sd-scripts and ComfyUI write them -> diffusers' SD3 transformer.

``joint_blocks_{i}_x_block_attn_qkv`` is diffusers' ``transformer_blocks.{i}.attn.to_q``/``to_k``/``to_v``
stacked by rows (``context_block`` the ``add_*_proj`` ones, ``attn2`` SD3.5's second attention),
``mlp_fc1``/``fc2`` the feed-forwards, ``adaLN_modulation_1`` the norms' linears. The last
block's context modulation and the final layer's have two halves, ``(shift, scale)`` in
Stability's order and ``(scale, shift)`` in diffusers'; they are recognised by their shape
(two rows per input feature, where the others have six), so a file that targets a subset
of blocks needs no block count.
"""

from __future__ import annotations

from .engine import IF_TWO_HALVES, Blocks, Family, fused, swapped

SD3 = Family(
    "SD3",
    hint="joint_blocks_*_x_block_*, context_embedder, ...",
    blocks=(
        Blocks("joint_blocks_{i}_x_block_", "transformer_blocks.{i}.", {
            "attn_qkv": fused("attn.to_q", "attn.to_k", "attn.to_v"),
            "attn_proj": "attn.to_out.0",
            "attn2_qkv": fused("attn2.to_q", "attn2.to_k", "attn2.to_v"),
            "attn2_proj": "attn2.to_out.0",
            "mlp_fc1": "ff.net.0.proj",
            "mlp_fc2": "ff.net.2",
            "adaLN_modulation_1": "norm1.linear",
        }),
        Blocks("joint_blocks_{i}_context_block_", "transformer_blocks.{i}.", {
            "attn_qkv": fused("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "attn_proj": "attn.to_add_out",
            "mlp_fc1": "ff_context.net.0.proj",
            "mlp_fc2": "ff_context.net.2",
            "adaLN_modulation_1": swapped("norm1_context.linear", IF_TWO_HALVES),
        }),
    ),
    modules={
        "x_embedder_proj": "pos_embed.proj",
        "context_embedder": "context_embedder",
        "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
        "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
        "final_layer_linear": "proj_out",
        "final_layer_adaLN_modulation_1": swapped("norm_out.linear", IF_TWO_HALVES),
    },
    key="sd3",
    model_classes=("SD3Transformer2DModel",),
)  # fmt: skip
