"""MiniMax-H3 in its original checkpoint names (ai-toolkit, ComfyUI, the reference ``generate.py``, musubi-tuner,
DiffSynth-Studio) -> diffusers' ``MiniMaxH3Transformer3DModel`` (``transformer`` and ``transformer_ref``).

Every producer but LightX2V trains on the original names: ``blocks.{i}.attn.qkv_proj`` is diffusers'
``transformer_blocks.{i}.attn.to_q``/``to_k``/``to_v`` stacked by rows, ``mlp.fc1`` is ``ff.net.0.proj``
with its two halves swapped (``[gate; value]`` in the original, ``[value; gate]`` in diffusers' SwiGLU),
``token_refiner.blocks`` are ``token_refiner.refiner_blocks``, and the final layer's ``adaln_proj.linear``
is ``norm_out.linear`` in the same ``(shift, scale)`` order. DiffSynth-Studio runs the raw checkpoint,
whose fused ``qkv_proj`` rows interleave per head (``[q k v]`` of head 0, then of head 1, ... each 128 rows:
every released H3 partition has 128-wide heads); the others reorder it to ``[q; k; v]`` at load time, as the
reference does. The two are told apart as diffusers tells them: DiffSynth writes peft's ``.default.`` infix
(``blocks.0.attn.qkv_proj.lora_A.default.weight``). Names as diffusers'
``_convert_non_diffusers_minimax_h3_lora_to_diffusers`` maps them.
"""

from __future__ import annotations

from .engine import Blocks, Family, interleaved, swapped

# DiffSynth-Studio's keys: peft's adapter name "default" left in (diffusers tests for the same infix).
_DIFFSYNTH = r"\.lora_[AB]\.default\.weight$"

_ATTENTION_AND_MLP = {
    "attn_qkv_proj": interleaved("attn.to_q", "attn.to_k", "attn.to_v", head_dim=128, only_if=_DIFFSYNTH),
    "attn_out_proj": "attn.to_out.0",
    "mlp_fc1": swapped("ff.net.0.proj"),
    "mlp_fc2": "ff.net.2",
}

MINIMAX_H3 = Family(
    "MiniMax-H3",
    hint="blocks_*_attn_qkv_proj, blocks_*_mlp_fc1, token_refiner_blocks_*, final_layer_*, ...",
    blocks=(
        Blocks("blocks_{i}_", "transformer_blocks.{i}.", _ATTENTION_AND_MLP | {"adaln_proj_linear": "adaln_proj.linear"}),
        Blocks("token_refiner_blocks_{i}_", "token_refiner.refiner_blocks.{i}.", _ATTENTION_AND_MLP),
    ),
    modules={
        "video_patch_proj": "proj_in",
        "audio_patch_proj": "audio_proj_in",
        "condition_proj": "context_embedder",
        "time_embedder_proj_in": "time_embedder.linear_1",
        "time_embedder_proj_out": "time_embedder.linear_2",
        "final_layer_adaln_proj_linear": "norm_out.linear",
        "final_layer_video_out": "proj_out",
        "final_layer_audio_out": "audio_proj_out",
    },
    key="minimax-h3",
    # diffusers' names no other family has: the per-block AdaLN projection and the top-level text refiner
    # (HunyuanVideo's and HunyuanImage's refiners sit under context_embedder; LTX-2 has audio_proj_in too).
    detect=(
        r"^transformer_blocks_\d+_adaln_proj_linear$",
        r"^token_refiner_refiner_blocks_\d+_",
    ),
    header_hints=("minimax-h3", "minimax_h3"),
    model_classes=("MiniMaxH3Transformer3DModel",),
    metadata_alpha=True,
)  # fmt: skip
