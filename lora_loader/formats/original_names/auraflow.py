"""AuraFlow (``AuraFlowPipeline``: AuraFlow 0.x, Pony V7) in the original checkpoint's module names (fal's ``MMDiT``, as
ComfyUI names its model: ComfyUI's own LoRA training and its "extract LoRA" node write them) -> diffusers'
``AuraFlowTransformer2DModel``; and what tells ``lora-loader inspect`` the family.

diffusers' ``AuraFlowLoraLoaderMixin`` converts nothing: SimpleTuner, diffusion-pipe (``save_lora_weights``) and
diffusers' scripts write diffusers' names, which load by module path. The checkpoint's names, as diffusers'
``convert_aura_flow_to_diffusers.py`` and ComfyUI's ``auraflow_to_diffusers`` map them (renames only):

- ``double_layers.N.`` -> ``joint_transformer_blocks.N.``: the image stream is ``w2`` (``attn.w2q`` -> ``attn.to_q``,
  ``w2o`` -> ``to_out.0``), the text stream ``w1`` (``attn.w1q`` -> ``attn.add_q_proj``, ``w1o`` -> ``to_add_out``);
  ``mlpX`` / ``mlpC`` ``.c_fc1`` / ``c_fc2`` / ``c_proj`` -> ``ff`` / ``ff_context`` ``.linear_1`` / ``linear_2`` /
  ``out_projection``; ``modX.1`` / ``modC.1`` -> ``norm1.linear`` / ``norm1_context.linear``;
- ``single_layers.N.`` (counted from 0 after the double layers) -> ``single_transformer_blocks.N.``: ``attn.w1q`` ->
  ``attn.to_q``, ``mlp.*`` -> ``ff.*``, ``modCX.1`` -> ``norm1.linear``;
- top level: ``cond_seq_linear`` -> ``context_embedder``, ``init_x_linear`` -> ``pos_embed.proj``,
  ``t_embedder.mlp.{0,2}`` -> ``time_step_proj.linear_{1,2}``, ``final_linear`` -> ``proj_out``, and ``modF.1`` ->
  ``norm_out.linear`` with its (shift, scale) halves swapped.
"""

from __future__ import annotations

from .engine import Blocks, Family, swapped

_FF = {"c_fc1": "linear_1", "c_fc2": "linear_2", "c_proj": "out_projection"}

_DOUBLE = {
    "attn_w2q": "attn.to_q", "attn_w2k": "attn.to_k", "attn_w2v": "attn.to_v", "attn_w2o": "attn.to_out.0",
    "attn_w1q": "attn.add_q_proj", "attn_w1k": "attn.add_k_proj", "attn_w1v": "attn.add_v_proj", "attn_w1o": "attn.to_add_out",
    "modX_1": "norm1.linear", "modC_1": "norm1_context.linear",
} | {f"mlpX_{o}": f"ff.{d}" for o, d in _FF.items()} | {f"mlpC_{o}": f"ff_context.{d}" for o, d in _FF.items()}  # fmt: skip

_SINGLE = {
    "attn_w1q": "attn.to_q", "attn_w1k": "attn.to_k", "attn_w1v": "attn.to_v", "attn_w1o": "attn.to_out.0",
    "modCX_1": "norm1.linear",
} | {f"mlp_{o}": f"ff.{d}" for o, d in _FF.items()}  # fmt: skip

AURAFLOW = Family(
    "AuraFlow",
    hint="double_layers_*_attn_w2q, double_layers_*_mlpX_c_fc1, single_layers_*_attn_w1q, cond_seq_linear, modF_1, ...",
    blocks=(
        Blocks("double_layers_{i}_", "joint_transformer_blocks.{i}.", _DOUBLE),
        Blocks("single_layers_{i}_", "single_transformer_blocks.{i}.", _SINGLE),
    ),
    modules={
        "cond_seq_linear": "context_embedder",
        "init_x_linear": "pos_embed.proj",
        "t_embedder_mlp_0": "time_step_proj.linear_1",
        "t_embedder_mlp_2": "time_step_proj.linear_2",
        "final_linear": "proj_out",
        "modF_1": swapped("norm_out.linear"),
    },
    key="auraflow",
    # diffusers' names only AuraFlow has (its single blocks' attention is named as Flux's diffusers single blocks).
    detect=(
        r"^joint_transformer_blocks_\d+_",
        r"^single_transformer_blocks_\d+_ff_(linear_[12]|out_projection)$",
        r"^time_step_proj_linear_[12]$",
    ),
    # SimpleTuner / diffusion-pipe "auraflow", modelspec "auraflow/lora", Pony V7.
    header_hints=("auraflow", "aura_flow", "aura-flow", "pony-v7", "pony_v7", "ponyv7"),
)  # fmt: skip
