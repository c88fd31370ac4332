"""Lumina-Image 2.0 (``Lumina2Pipeline``) in the original checkpoint's module names (Alpha-VLLM's ``NextDiT``, as
ComfyUI, sd-scripts' ``networks/lora_lumina.py`` and diffusion-pipe write them) -> diffusers'
``Lumina2Transformer2DModel``.

Names as diffusers' ``_convert_non_diffusers_lumina2_lora_to_diffusers`` maps LoRAs and
``scripts/convert_lumina2_to_diffusers.py`` renames the checkpoint, in ``layers``, ``noise_refiner`` and
``context_refiner`` blocks alike:

- ``attention.qkv`` is fused, its rows q, k, v with 24 query heads and 8 key / value heads of 96 rows
  (Lumina-Image 2.0: 2304, 768, 768 rows, diffusers' ``torch.split(lora_B, [2304, 768, 768])``): split 3:1:1
  into ``attn.to_q`` / ``to_k`` / ``to_v``;
- ``attention.out`` -> ``attn.to_out.0``; ``attention.q_norm`` / ``k_norm`` -> ``attn.norm_q`` / ``norm_k``;
- ``feed_forward.w1`` / ``w2`` / ``w3`` -> ``feed_forward.linear_1`` / ``linear_2`` / ``linear_3``;
- ``adaLN_modulation.1`` -> ``norm1.linear`` (``layers`` and ``noise_refiner``: ``context_refiner`` has none);
- top level: ``x_embedder`` keeps its name, ``t_embedder.mlp.{0,2}`` -> ``time_caption_embed.timestep_embedder
  .linear_{1,2}``, ``cap_embedder.1`` -> ``time_caption_embed.caption_embedder.1``, ``final_layer
  .adaLN_modulation.1`` -> ``norm_out.linear_1`` (a scale alone: no halves to swap), ``final_layer.linear`` ->
  ``norm_out.linear_2``.

Z-Image's checkpoint shares most of these names (``layers.N.attention.qkv``, ``feed_forward.w1``, ``x_embedder``)
with other targets (equal q / k / v thirds, ``adaLN_modulation.0``, ``feed_forward.w1`` kept): a file with
``adaLN_modulation.1`` is this table's, a fused qkv whose rows are not 5/3 of its input (Z-Image's are 3x) is not,
and a file in names both know (attention and feed-forward only) is read as Z-Image's unless the live model is a
``Lumina2Transformer2DModel`` (`original_names.for_model`). Files in diffusers' names (``layers.0.attn.to_q``)
share the block prefixes: a name the table lacks is kept (``keep_unknown``) for the live model to resolve.
"""

from __future__ import annotations

from .engine import Blocks, Family, Target

_BLOCK = {
    "attention_qkv": Target(("attn.to_q", "attn.to_k", "attn.to_v"), ratios=(3, 1, 1)),
    "attention_out": "attn.to_out.0",
    "attention_q_norm": "attn.norm_q",
    "attention_k_norm": "attn.norm_k",
    "feed_forward_w1": "feed_forward.linear_1",
    "feed_forward_w2": "feed_forward.linear_2",
    "feed_forward_w3": "feed_forward.linear_3",
    "adaLN_modulation_1": "norm1.linear",
}

# diffusers' own names, known so that a Kohya file of them counts as this table's (read, never written).
_ALIASES = {
    "attn_to_q": "attn.to_q",
    "attn_to_k": "attn.to_k",
    "attn_to_v": "attn.to_v",
    "attn_to_out_0": "attn.to_out.0",
    "feed_forward_linear_1": "feed_forward.linear_1",
    "feed_forward_linear_2": "feed_forward.linear_2",
    "feed_forward_linear_3": "feed_forward.linear_3",
    "norm1_linear": "norm1.linear",
}

_TOP_LEVEL = {
    "x_embedder": "x_embedder",
    "t_embedder_mlp_0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder_1": "time_caption_embed.caption_embedder.1",
    "final_layer_adaLN_modulation_1": "norm_out.linear_1",
    "final_layer_linear": "norm_out.linear_2",
}

LUMINA2 = Family(
    "Lumina 2",
    hint="layers_*_attention_qkv, layers_*_feed_forward_w1, layers_*_adaLN_modulation_1, noise_refiner_*_..., ...",
    blocks=(
        Blocks("layers_{i}_", "layers.{i}.", _BLOCK, _ALIASES),
        Blocks("noise_refiner_{i}_", "noise_refiner.{i}.", _BLOCK, _ALIASES),
        Blocks("context_refiner_{i}_", "context_refiner.{i}.", _BLOCK, _ALIASES),
    ),
    modules=_TOP_LEVEL,
    keep_unknown=True,  # diffusers' own names share the block prefixes: kept for the live model to resolve
    key="lumina2",
    model_classes=("Lumina2Transformer2DModel",),
    # 2304 + 768 + 768 rows over 2304 input features (diffusers' fixed split): a qkv 3x its input is Z-Image's.
    shapes=((r"_attention_qkv$", (5, 3)),),
    # diffusers' names only Lumina 2 has (Z-Image's blocks use attention.to_q and feed_forward.w1); a feed-forward's
    # layers.N.feed_forward.linear_1 alone is any transformer's.
    detect=(
        r"^(layers|noise_refiner|context_refiner)_\d+_attn_(to_q|to_k|to_v|to_out_0)$",
        r"^(layers|noise_refiner)_\d+_norm1_linear$",
        r"^time_caption_embed_(timestep_embedder_linear_[12]|caption_embedder_1)$",
    ),
    # sd-scripts "lumina2" / "lumina-image-2", diffusion-pipe "lumina_2", modelspec "lumina-2/lora".
    header_hints=("lumina2", "lumina-2", "lumina_2", "lumina-image-2", "lumina_image_2"),
)  # fmt: skip
