"""ACE-Step 1.5 (audio; ``AceStepPipeline``) in the original checkpoint's module names -> diffusers'
``AceStepTransformer1DModel``.

The original DiT (the checkpoint's ``decoder.``, a Qwen3-style stack) names its attention projections as
transformers does; diffusers renames them. Names as diffusers' ``_convert_non_diffusers_ace_step_lora_to_diffusers``
maps them, plus the patchify convolutions as ``scripts/convert_ace_step_to_diffusers.py`` renames them:

- ``layers.{i}.{self_attn,cross_attn}.{q,k,v}_proj`` -> ``to_q`` / ``to_k`` / ``to_v``, ``o_proj`` -> ``to_out.0``;
- ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``, ``time_embed(_r).linear_1`` / ``linear_2`` / ``time_proj`` and
  ``condition_embedder`` keep their names; ``proj_in.1`` -> ``proj_in_conv``, ``proj_out.1`` -> ``proj_out_conv``.

Producers: ACE-Step's own trainer (PEFT on the decoder: ``base_model.model.layers.0.self_attn.q_proj.lora_A.weight``
with ``adapter_config.json``, or LyCORIS LoKr ``lycoris_layers_0_cross_attn_q_proj.lokr_w1``), ComfyUI
(``diffusion_model.decoder.layers.0...``, whose ``decoder.`` is read as ``prefix_aliases``), DiffSynth-Studio
(``layers.0.self_attn.q_proj.lora_A.default.weight``), Kohya-style trainers (``lora_unet_layers_0_self_attn_q_proj``).

These are a causal LM's names too (``layers.0.self_attn.q_proj``, ``mlp.gate_proj``): only the names an LM has not
claim a file (``cross_attn``, the DiT's top-level modules), so an LM adapter in the same spelling is left alone; a
file without them (self-attention only) is read by this table only when loaded into an ``AceStepTransformer1DModel``
(`original_names.add_unclaimed`).
"""

from __future__ import annotations

from .engine import Blocks, Family

_ATTENTION = {f"{attn}_{old}": f"{attn}.{new}" for attn in ("self_attn", "cross_attn")
              for old, new in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("o_proj", "to_out.0"))}
_BLOCK = _ATTENTION | {f"mlp_{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
# diffusers' own attention names: known so a file of them counts as this table's; read, never written.
_ALIASES = {f"{attn}_{new.replace('.', '_')}": f"{attn}.{new}" for attn in ("self_attn", "cross_attn")
            for new in ("to_q", "to_k", "to_v", "to_out.0")}
_TOP_LEVEL = {f"{embed}_{leaf}": f"{embed}.{leaf}" for embed in ("time_embed", "time_embed_r")
              for leaf in ("linear_1", "linear_2", "time_proj")} | {
    "condition_embedder": "condition_embedder", "proj_in_1": "proj_in_conv", "proj_out_1": "proj_out_conv"}

ACE_STEP = Family(
    "ACE-Step",
    hint="layers_*_self_attn_q_proj, layers_*_cross_attn_o_proj, layers_*_mlp_gate_proj, condition_embedder, ...",
    blocks=(Blocks("layers_{i}_", "layers.{i}.", _BLOCK, _ALIASES),),
    modules=_TOP_LEVEL,
    aliases={"proj_in_conv": "proj_in_conv", "proj_out_conv": "proj_out_conv"},  # diffusers' names, read, never written
    # ComfyUI keeps the checkpoint's ``decoder.`` (``diffusion_model.decoder.layers.0.self_attn.q_proj``).
    prefix_aliases={"decoder_": ""},
    key="ace-step",
    model_classes=("AceStepTransformer1DModel",),
    claim=(r"(decoder_)?layers_\d+_cross_attn_",
           r"(decoder_)?(time_embed(_r)?_(linear_[12]|time_proj)|condition_embedder|proj_(in|out)_1|proj_(in|out)_conv)$"),
    # diffusers' names no other family has: the cross-attention's to_q ... (LMs: q_proj), the embedders.
    detect=(r"^layers_\d+_(self_attn|cross_attn)_(to_q|to_k|to_v|to_out_0)$", r"^time_embed(_r)?_time_proj$",
            r"^proj_(in|out)_conv$"),
    # ACE-Step writes no header; lora_loader's own saves name the model class.
    header_hints=("ace-step", "ace_step", "acestep"),
)  # fmt: skip
