"""Z-Image (Turbo, Base, Omni) in the original checkpoint's module names (Tongyi-MAI's ``ZImageTransformer``,
as ComfyUI, musubi-tuner and other Kohya-style trainers write them) -> diffusers' ``ZImageTransformer2DModel``.

Names as diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers`` renames the checkpoint and as
``_convert_non_diffusers_z_image_lora_to_diffusers`` maps LoRAs:

- ``attention.qkv`` is fused: split into ``attention.to_q`` / ``to_k`` / ``to_v`` by equal thirds of its rows
  (``torch.chunk(3)``, as diffusers cuts the checkpoint and the LoRA);
- ``attention.out`` -> ``attention.to_out.0``;
- ``feed_forward.w1`` / ``w2`` / ``w3`` and ``adaLN_modulation.0`` keep their names, in ``layers``,
  ``noise_refiner`` and ``context_refiner`` blocks alike;
- top level: ``x_embedder`` -> ``all_x_embedder.2-1``, ``final_layer.*`` -> ``all_final_layer.2-1.*``;
  ``t_embedder.mlp.{0,2}`` and ``cap_embedder.1`` keep theirs.

Files in diffusers' names (``layers.0.attention.to_q``) share the block prefixes: a name the table lacks is
kept (``keep_unknown``) for the live model to resolve. Anime-Z's dotted ``attention.to.q`` mangles to the
same Kohya name as diffusers' ``attention.to_q``.
"""

from __future__ import annotations

from .engine import Blocks, Family, fused

_BLOCK = {
    "attention_qkv": fused("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention_out": "attention.to_out.0",
    "attention_q_norm": "attention.norm_q",
    "attention_k_norm": "attention.norm_k",
    "feed_forward_w1": "feed_forward.w1",
    "feed_forward_w2": "feed_forward.w2",
    "feed_forward_w3": "feed_forward.w3",
    "adaLN_modulation_0": "adaLN_modulation.0",
}

# diffusers' own attention names (and Anime-Z's dotted ``to.q``), known so a file of them counts as this table's;
# read, never written (a Kohya save writes the fused qkv, as the checkpoint has it).
_ALIASES = {
    "attention_to_q": "attention.to_q",
    "attention_to_k": "attention.to_k",
    "attention_to_v": "attention.to_v",
    "attention_to_out_0": "attention.to_out.0",
}

_TOP_LEVEL = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer_linear": "all_final_layer.2-1.linear",
    "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder_mlp_0": "t_embedder.mlp.0",
    "t_embedder_mlp_2": "t_embedder.mlp.2",
    "cap_embedder_1": "cap_embedder.1",
}

Z_IMAGE = Family(
    "Z-Image",
    hint="layers_*_attention_qkv, layers_*_attention_out, layers_*_feed_forward_w1, noise_refiner_*_..., x_embedder, ...",
    blocks=(
        Blocks("layers_{i}_", "layers.{i}.", _BLOCK, _ALIASES),
        Blocks("noise_refiner_{i}_", "noise_refiner.{i}.", _BLOCK, _ALIASES),
        Blocks("context_refiner_{i}_", "context_refiner.{i}.", _BLOCK, _ALIASES),
    ),
    modules=_TOP_LEVEL,
    keep_unknown=True,  # diffusers' own names share the block prefixes: kept for the live model to resolve
    key="z-image",
    model_classes=("ZImageTransformer2DModel",),
    # diffusers' names only Z-Image has (Lumina 2's blocks use attn.to_q and feed_forward.linear_1).
    detect=(
        r"^(layers|noise_refiner|context_refiner)_\d+_attention_(to_q|to_k|to_v|to_out_0)$",
        r"^(layers|noise_refiner|context_refiner)_\d+_(feed_forward_w[123]|adaLN_modulation_0)$",
        r"^all_(x_embedder|final_layer)_",
        r"^cap_embedder_1$",
    ),
    # musubi-tuner / ai-toolkit "zimage", "z_image", "z-image", modelspec "z-image-turbo/lora".
    header_hints=("z_image", "z-image", "zimage"),
)  # fmt: skip
