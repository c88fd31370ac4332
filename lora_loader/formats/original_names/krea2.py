"""Krea 2 (``Krea2Pipeline``) in the original checkpoint's module names (``krea-ai/krea-2``, as Krea's reference trainer,
ComfyUI, Kohya-style trainers and ai-toolkit write them) -> diffusers' ``Krea2Transformer2DModel``.

Names as diffusers' ``_convert_non_diffusers_krea2_lora_to_diffusers`` maps LoRAs:

- ``blocks.N.`` -> ``transformer_blocks.N.``; in a block ``attn.wq`` / ``wk`` / ``wv`` / ``wo`` / ``gate`` ->
  ``attn.to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` / ``to_gate``, ``mlp.gate`` / ``up`` / ``down`` -> ``ff.gate`` /
  ``ff.up`` / ``ff.down``; the text fusion's ``txtfusion.layerwise_blocks.N.`` / ``refiner_blocks.N.`` the same under
  ``text_fusion.``;
- top level (ai-toolkit's ``nn.Sequential`` names): ``first`` -> ``img_in``, ``last.linear`` -> ``final_layer.linear``,
  ``tmlp.{0,2}`` -> ``time_embed.linear_{1,2}``, ``tproj.1`` -> ``time_mod_proj``, ``txtmlp.{1,3}`` ->
  ``txt_in.linear_{1,2}``, ``txtfusion.projector`` -> ``text_fusion.projector``.

Kohya files spell these ``lora_unet_blocks_0_attn_wq``; ai-toolkit's ``base_model.model.`` prefix is PEFT's.
"""

from __future__ import annotations

from .engine import Blocks, Family

_BLOCK = {
    "attn_wq": "attn.to_q",
    "attn_wk": "attn.to_k",
    "attn_wv": "attn.to_v",
    "attn_wo": "attn.to_out.0",
    "attn_gate": "attn.to_gate",
    "mlp_gate": "ff.gate",
    "mlp_up": "ff.up",
    "mlp_down": "ff.down",
}

_TOP_LEVEL = {
    "first": "img_in",
    "last_linear": "final_layer.linear",
    "tmlp_0": "time_embed.linear_1",
    "tmlp_2": "time_embed.linear_2",
    "tproj_1": "time_mod_proj",
    "txtmlp_1": "txt_in.linear_1",
    "txtmlp_3": "txt_in.linear_2",
    "txtfusion_projector": "text_fusion.projector",
}

# diffusers' own names, read (never written), so that a Kohya file in them (``lora_unet_transformer_blocks_0_attn_to_q``,
# ``lora_unet_time_embed_linear_1``) is this table's and not ACE-Step's, whose top level shares ``time_embed.linear_1``.
_DIFFUSERS_BLOCK = {path.replace(".", "_"): path for path in _BLOCK.values()}
_DIFFUSERS_TOP_LEVEL = {path.replace(".", "_"): path for path in _TOP_LEVEL.values()}

KREA2 = Family(
    "Krea 2",
    hint="blocks_*_attn_wq, blocks_*_mlp_gate, txtfusion_layerwise_blocks_*_attn_wq, first, last_linear, ...",
    blocks=(
        Blocks("blocks_{i}_", "transformer_blocks.{i}.", _BLOCK),
        Blocks("txtfusion_layerwise_blocks_{i}_", "text_fusion.layerwise_blocks.{i}.", _BLOCK),
        Blocks("txtfusion_refiner_blocks_{i}_", "text_fusion.refiner_blocks.{i}.", _BLOCK),
        Blocks("transformer_blocks_{i}_", "transformer_blocks.{i}.", {}, _DIFFUSERS_BLOCK),
        Blocks("text_fusion_layerwise_blocks_{i}_", "text_fusion.layerwise_blocks.{i}.", {}, _DIFFUSERS_BLOCK),
        Blocks("text_fusion_refiner_blocks_{i}_", "text_fusion.refiner_blocks.{i}.", {}, _DIFFUSERS_BLOCK),
    ),
    modules=_TOP_LEVEL,
    aliases={name: path for name, path in _DIFFUSERS_TOP_LEVEL.items() if name not in _TOP_LEVEL},
    # Only names no other family has claim a file: the original blocks' wq ... / mlp_gate ... (Wan, Anima and MiniMax-H3
    # name blocks_N_ too), the top level, and diffusers' gated attention, gate/up/down feed-forward and text fusion.
    claim=(
        r"^(blocks_\d+|txtfusion_(layerwise|refiner)_blocks_\d+)_(attn_(wq|wk|wv|wo|gate)|mlp_(gate|up|down))$",
        r"^(first|last_linear|tmlp_[02]|tproj_1|txtmlp_[13]|txtfusion_projector)$",
        r"^transformer_blocks_\d+_(attn_to_gate|ff_(gate|up|down))$",
        r"^text_fusion_((layerwise|refiner)_blocks_\d+_|projector$)",
        r"^time_mod_proj$",
    ),
    keep_unknown=True,  # a diffusers name the table lacks is kept for the live model to resolve
    key="krea2",
    model_classes=("Krea2Transformer2DModel",),
    # diffusers' names only Krea 2 has: the gated attention, the text fusion, the gate/up/down feed-forward.
    detect=(
        r"^transformer_blocks_\d+_attn_to_gate$",
        r"^transformer_blocks_\d+_ff_(gate|up|down)$",
        r"^text_fusion_",
        r"^time_mod_proj$",
    ),
    # ai-toolkit "krea2" / "krea_2", modelspec "krea-2/lora".
    header_hints=("krea2", "krea_2", "krea-2"),
)  # fmt: skip
