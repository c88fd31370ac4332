"""Ideogram 4 (``Ideogram4Pipeline``) in the original checkpoint's module names -> diffusers'
``Ideogram4Transformer2DModel``.

The reference model (and ai-toolkit's port, ``extensions_built_in/diffusion_models/ideogram4``) names every module
as diffusers does except the attention: a fused ``attention.qkv`` (its rows ``[q; k; v]``, viewed as
``(3, heads, head_dim)``: equal thirds) and ``attention.o``. Names as diffusers'
``_convert_non_diffusers_ideogram4_lora_to_diffusers`` maps them:

- ``layers.{i}.attention.qkv`` -> ``attention.to_q`` / ``to_k`` / ``to_v`` (equal thirds of its rows);
- ``layers.{i}.attention.o`` -> ``attention.to_out.0``;
- ``feed_forward.w1`` / ``w2`` / ``w3`` and ``adaln_modulation`` keep their names;
- top level (no renames; diffusers' converter refuses them, ai-toolkit's ``transformer_only: false`` trains them):
  ``input_proj``, ``llm_cond_proj``, ``t_embedding.mlp_in`` / ``mlp_out``, ``adaln_proj``,
  ``final_layer.linear``, ``final_layer.adaln_modulation``.

Producers: ai-toolkit (``diffusion_model.`` + these names, lora_A / lora_B, or LoKr on the fused ``qkv``), the
reference trainer (``conditional_transformer.``), Kohya-style trainers (``lora_unet_layers_0_attention_qkv`` +
``.alpha``), diffusers / PEFT (``transformer.layers.0.attention.to_q``). The block prefix ``layers_N_`` is Z-Image's
too (whose ``attention_out`` / ``adaLN_modulation_0`` differ): the table that knows most of a file's names reads
it, and a name the table lacks is kept for the live model (diffusers' own names share the block prefix).
"""

from __future__ import annotations

from .engine import Blocks, Family, fused

_BLOCK = {
    "attention_qkv": fused("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention_o": "attention.to_out.0",
    "feed_forward_w1": "feed_forward.w1",
    "feed_forward_w2": "feed_forward.w2",
    "feed_forward_w3": "feed_forward.w3",
    "adaln_modulation": "adaln_modulation",
}

# diffusers' own attention names: known so a file of them counts as this table's; read, never written.
_ALIASES = {
    "attention_to_q": "attention.to_q",
    "attention_to_k": "attention.to_k",
    "attention_to_v": "attention.to_v",
    "attention_to_out_0": "attention.to_out.0",
}

IDEOGRAM4 = Family(
    "Ideogram 4",
    hint="layers_*_attention_qkv, layers_*_attention_o, layers_*_feed_forward_w1, layers_*_adaln_modulation, ...",
    blocks=(Blocks("layers_{i}_", "layers.{i}.", _BLOCK, _ALIASES),),
    modules={
        "input_proj": "input_proj",
        "llm_cond_proj": "llm_cond_proj",
        "t_embedding_mlp_in": "t_embedding.mlp_in",
        "t_embedding_mlp_out": "t_embedding.mlp_out",
        "adaln_proj": "adaln_proj",
        "final_layer_linear": "final_layer.linear",
        "final_layer_adaln_modulation": "final_layer.adaln_modulation",
    },
    keep_unknown=True,  # diffusers' own names share the block prefix: kept for the live model to resolve
    key="ideogram4",
    model_classes=("Ideogram4Transformer2DModel",),
    # Only the names Z-Image (same layers_N_ prefix, same attention.to_q in diffusers) lacks claim a file: the per-block
    # modulation (Z-Image: adaLN_modulation_0), the output projection ``o`` and the top-level modules.
    claim=(r"(conditional_transformer_)?layers_\d+_(adaln_modulation|attention_o|attention_qkv)$",
           r"(conditional_transformer_)?(input_proj|llm_cond_proj|t_embedding_mlp_(in|out)|adaln_proj|final_layer_adaln_modulation)$"),
    # Ideogram's reference trainer writes its module names under ``conditional_transformer.`` (diffusers' converter
    # strips it as it strips ``diffusion_model.``).
    prefix_aliases={"conditional_transformer_": ""},
    # diffusers' names no other family has (a file of only to_q / to_k / to_v / to_out.0 in layers is Z-Image's too).
    detect=(r"^layers_\d+_adaln_modulation$", r"^(llm_cond_proj|adaln_proj|t_embedding_mlp_(in|out))$",
            r"^final_layer_adaln_modulation$"),
    # ai-toolkit: ss_base_model_version / modelspec "ideogram4".
    header_hints=("ideogram",),
)  # fmt: skip
