"""Anima (``AnimaModularPipeline``; components ``transformer``, a Cosmos-Predict2 ``CosmosTransformer3DModel``, and
``text_conditioner``, an ``AnimaTextConditioner``) in the original checkpoint's module names (``MiniTrainDIT`` with its
``llm_adapter``, as ComfyUI, sd-scripts' ``networks/lora_anima.py`` + ``convert_anima_lora_to_comfy.py``,
diffusion-pipe and ai-toolkit write them) -> diffusers' modules.

Names as diffusers' ``_convert_non_diffusers_anima_lora_to_diffusers`` maps LoRAs:

- ``blocks.N.`` -> ``transformer_blocks.N.``: ``self_attn.{q,k,v}_proj`` / ``output_proj`` -> ``attn1.to_{q,k,v}`` /
  ``to_out.0``, ``cross_attn.*`` -> ``attn2.*``, ``q_norm`` / ``k_norm`` -> ``norm_q`` / ``norm_k``, ``mlp.layer1`` /
  ``layer2`` -> ``ff.net.0.proj`` / ``ff.net.2``, ``adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}`` ->
  ``norm{1,2,3}.linear_{1,2}``;
- top level: ``x_embedder.proj.1`` -> ``patch_embed.proj``, ``t_embedder.1.linear_{1,2}`` -> ``time_embed.t_embedder
  .linear_{1,2}``, ``t_embedding_norm`` -> ``time_embed.norm``, ``final_layer.adaln_modulation.{1,2}`` ->
  ``norm_out.linear_{1,2}``, ``final_layer.linear`` -> ``proj_out``;
- ``llm_adapter.*`` is the ``text_conditioner`` component, whose module names are the checkpoint's
  (``blocks.N.self_attn.q_proj``, ``cross_attn.o_proj``, ``mlp.0`` / ``mlp.2``, ``in_proj``, ``out_proj``).

Kohya files in diffusers' names (``lora_unet_transformer_blocks_0_attn1_to_q``) have no name of this table: they load
by module path. Cosmos-Predict2's own LoRAs name the same DiT blocks.
"""

from __future__ import annotations

from .engine import Blocks, Family, Target

_BLOCK = {
    "self_attn_q_proj": "attn1.to_q",
    "self_attn_k_proj": "attn1.to_k",
    "self_attn_v_proj": "attn1.to_v",
    "self_attn_output_proj": "attn1.to_out.0",
    "self_attn_q_norm": "attn1.norm_q",
    "self_attn_k_norm": "attn1.norm_k",
    "cross_attn_q_proj": "attn2.to_q",
    "cross_attn_k_proj": "attn2.to_k",
    "cross_attn_v_proj": "attn2.to_v",
    "cross_attn_output_proj": "attn2.to_out.0",
    "cross_attn_q_norm": "attn2.norm_q",
    "cross_attn_k_norm": "attn2.norm_k",
    "mlp_layer1": "ff.net.0.proj",
    "mlp_layer2": "ff.net.2",
    "adaln_modulation_self_attn_1": "norm1.linear_1",
    "adaln_modulation_self_attn_2": "norm1.linear_2",
    "adaln_modulation_cross_attn_1": "norm2.linear_1",
    "adaln_modulation_cross_attn_2": "norm2.linear_2",
    "adaln_modulation_mlp_1": "norm3.linear_1",
    "adaln_modulation_mlp_2": "norm3.linear_2",
}

# The text conditioner's blocks keep the checkpoint's names.
_ADAPTER_BLOCK = {
    f"{attn}_{leaf}": f"{attn}.{leaf}"
    for attn in ("self_attn", "cross_attn")
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
} | {"mlp_0": "mlp.0", "mlp_2": "mlp.2", "norm_self_attn": "norm_self_attn", "norm_cross_attn": "norm_cross_attn",
     "norm_mlp": "norm_mlp"}  # fmt: skip

_CONDITIONER = "text_conditioner"

_TOP_LEVEL = {
    "x_embedder_proj_1": "patch_embed.proj",
    "t_embedder_1_linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder_1_linear_2": "time_embed.t_embedder.linear_2",
    "t_embedding_norm": "time_embed.norm",
    "final_layer_adaln_modulation_1": "norm_out.linear_1",
    "final_layer_adaln_modulation_2": "norm_out.linear_2",
    "final_layer_linear": "proj_out",
    "llm_adapter_in_proj": Target(("in_proj",), component=_CONDITIONER),
    "llm_adapter_out_proj": Target(("out_proj",), component=_CONDITIONER),
    "llm_adapter_embed": Target(("embed",), component=_CONDITIONER),
    "llm_adapter_norm": Target(("norm",), component=_CONDITIONER),
}

ANIMA = Family(
    "Anima",
    hint="blocks_*_self_attn_q_proj, blocks_*_mlp_layer1, blocks_*_adaln_modulation_self_attn_1, llm_adapter_blocks_*_..., ...",
    blocks=(
        Blocks("blocks_{i}_", "transformer_blocks.{i}.", _BLOCK),
        Blocks("llm_adapter_blocks_{i}_", "blocks.{i}.", _ADAPTER_BLOCK, component=_CONDITIONER),
    ),
    modules=_TOP_LEVEL,
    key="anima",
    model_classes=("CosmosTransformer3DModel",),
    # Its diffusers names are Cosmos-Predict2's (the same CosmosTransformer3DModel): no `detect` over them. A file is
    # Anima's by its own keys in the checkpoint's names, a text_conditioner part (`families`), or its header.
    detect_original=True,
    # sd-scripts / ai-toolkit / diffusion-pipe "anima", modelspec "anima/lora".
    header_hints=("anima",),
)  # fmt: skip
