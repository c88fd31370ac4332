"""Wan 2.1 / 2.2 in the original checkpoint's module names (Wan-Video's ``WanModel``, as ComfyUI, musubi-tuner,
diffusion-pipe, ai-toolkit and LightX2V write them) -> diffusers' ``WanTransformer3DModel``.

The same table serves the models that keep Wan's transformer: VACE (``vace_blocks``, ``before_proj`` /
``after_proj``, ``vace_patch_embedding``), SkyReels-V2 (``fps_embedding``, ``fps_projection``) and Helios.
Names as diffusers' ``scripts/convert_wan_to_diffusers.py`` renames the checkpoint and as
``_convert_non_diffusers_wan_lora_to_diffusers`` / ``_convert_musubi_wan_lora_to_diffusers`` map LoRAs:

- ``self_attn.{q,k,v,o}`` -> ``attn1.{to_q,to_k,to_v,to_out.0}``, ``cross_attn.*`` -> ``attn2.*`` with the
  I2V image projections ``k_img`` / ``v_img`` -> ``add_k_proj`` / ``add_v_proj`` (and ``norm_k_img`` ->
  ``norm_added_k``); ``ffn.0`` / ``ffn.2`` -> ``ffn.net.0.proj`` / ``ffn.net.2``.
- The norms: the original block runs norm1, norm3 (the cross-attention norm, the only one with weights),
  norm2; diffusers names them in order, so the original ``norm3`` is diffusers' ``norm2``. The original
  ``norm2`` has no weights, so no file has a diff for it: a ``norm2`` in a file is diffusers' (ai-toolkit
  renames only the attention and FFN names back), kept as it is (see below).
- ``modulation`` (a block's, and the head's) is a parameter, diffusers' ``scale_shift_table``: LightX2V's
  ``diff_m`` is its diff (``formats.kohya`` reads it as ``<module>_modulation.diff``).
- Top level: ``patch_embedding`` (a Conv3d), ``text_embedding.{0,2}``, ``time_embedding.{0,2}``,
  ``time_projection.1``, ``head.head`` -> ``proj_out``, the I2V image embedder ``img_emb.proj.{0,1,3,4}``.

Kohya files in diffusers' names (``lora_unet_blocks_0_attn1_to_q``, OneTrainer's ``lora_transformer_``)
share the ``blocks_N_`` prefix with the original names: a name the table lacks is kept (``keep_unknown``)
for the live model to resolve, or to be reported as naming no module.
"""

from __future__ import annotations

from .engine import Blocks, Family

# One attention block's modules: original suffix (Kohya-mangled) -> diffusers path in the block.
_ATTENTION = {
    "self_attn_q": "attn1.to_q",
    "self_attn_k": "attn1.to_k",
    "self_attn_v": "attn1.to_v",
    "self_attn_o": "attn1.to_out.0",
    "self_attn_norm_q": "attn1.norm_q",
    "self_attn_norm_k": "attn1.norm_k",
    "cross_attn_q": "attn2.to_q",
    "cross_attn_k": "attn2.to_k",
    "cross_attn_v": "attn2.to_v",
    "cross_attn_o": "attn2.to_out.0",
    "cross_attn_norm_q": "attn2.norm_q",
    "cross_attn_norm_k": "attn2.norm_k",
    "cross_attn_k_img": "attn2.add_k_proj",  # I2V only: the CLIP image tokens' key / value
    "cross_attn_v_img": "attn2.add_v_proj",
    "cross_attn_norm_k_img": "attn2.norm_added_k",
    "ffn_0": "ffn.net.0.proj",
    "ffn_2": "ffn.net.2",
    "norm3": "norm2",  # the cross-attention norm (see the module docstring)
    "modulation": "scale_shift_table",  # a parameter (LightX2V's diff_m)
}


# Half-renamed spellings ai-toolkit writes: its convert_to_original renames dotted names only, so an old-format
# LyCORIS file (lycoris_blocks_0_self_attn_to_out_0) and an all-layers one keep diffusers' ends.
_ALIASES = {"self_attn_to_out_0": "self_attn_o", "cross_attn_to_out_0": "cross_attn_o", "cross_attn_norm_added_k": "cross_attn_norm_k_img"}


def _block(extra: dict) -> dict:
    return _ATTENTION | extra


def _aliases(modules: dict) -> dict:
    """`_ALIASES` as the engine takes them: each other spelling with the target of the suffix it spells."""
    return {alias: modules[suffix] for alias, suffix in _ALIASES.items()}


_MAIN_BLOCK = _block({})
_VACE_BLOCK = _block({"before_proj": "proj_in", "after_proj": "proj_out"})  # the projections in and out of the main stream


_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding_0": "condition_embedder.text_embedder.linear_1",
    "text_embedding_2": "condition_embedder.text_embedder.linear_2",
    "time_embedding_0": "condition_embedder.time_embedder.linear_1",
    "time_embedding_2": "condition_embedder.time_embedder.linear_2",
    "time_projection_1": "condition_embedder.time_proj",
    "head_head": "proj_out",
    "head_modulation": "scale_shift_table",  # a parameter (LightX2V's head.diff_m)
    "img_emb_proj_0": "condition_embedder.image_embedder.norm1",  # I2V / FLF2V: the CLIP image embedder
    "img_emb_proj_1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb_proj_3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb_proj_4": "condition_embedder.image_embedder.norm2",
    "img_emb_emb_pos": "condition_embedder.image_embedder.pos_embed",  # FLF2V: a parameter
    "vace_patch_embedding": "vace_patch_embedding",  # VACE
    "fps_embedding": "fps_embedding",  # SkyReels-V2
    "fps_projection_0": "fps_projection.net.0.proj",
    "fps_projection_2": "fps_projection.net.2",
}

WAN = Family(
    "Wan",
    hint="blocks_*_self_attn_q, blocks_*_cross_attn_k_img, blocks_*_ffn_0, head_head, time_projection_1, ...",
    blocks=(
        Blocks("blocks_{i}_", "blocks.{i}.", _MAIN_BLOCK, _aliases(_MAIN_BLOCK)),
        Blocks("vace_blocks_{i}_", "vace_blocks.{i}.", _VACE_BLOCK, _aliases(_VACE_BLOCK)),  # VACE's control blocks
    ),
    modules=_TOP_LEVEL,
    keep_unknown=True,  # diffusers' own names share the blocks_N_ prefix: kept for the live model to resolve
    key="wan",
    model_classes=("WanTransformer3DModel", "WanVACETransformer3DModel"),
    # diffusers' names that only Wan's transformer (and SkyReels-V2 / Helios, which share it) has.
    detect=(
        r"^(vace_)?blocks_\d+_ffn_net_(0_proj|2)$",
        r"^(vace_)?blocks_\d+_attn2_(add_[kv]_proj|norm_added_k)$",
        r"^(vace_)?blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0|norm_q|norm_k)$",
        r"^(vace_)?blocks_\d+_scale_shift_table$",
        r"^condition_embedder_(time_proj|time_embedder_linear_[12]|text_embedder_linear_[12]|image_embedder_)",
    ),
    # musubi-tuner: ss_base_model_version "wan", modelspec.architecture "wan2.1/lora"; ai-toolkit "wan_2.1",
    # "wan_2.2_14b"; lora_loader's own header names the transformer's class.
    header_hints=("wan2", "wan_2", "wan-2", "wan21", "wan22", "wantransformer3dmodel", "wanvacetransformer3dmodel",
                  "skyreelsv2transformer3dmodel", "heliostransformer3dmodel"),
)  # fmt: skip
