"""Flux 3 (``Flux3ModularPipeline`` / ``Flux3DistilledModularPipeline``) in Black Forest Labs' module names ->
diffusers' ``Flux3Transformer2DModel``.

Flux 3 has per-mode blocks (``content_mode_blocks.image`` / ``image_cond``, ``txt_mode_blocks``) and joint
``single_blocks`` whose attention is split already (``q_proj`` / ``k_proj`` / ``v_proj``, ``attn_out``) with a
SwiGLU MLP (``mlp_in`` / ``mlp_out``): renames only, no fused projection. Names as diffusers'
``_convert_non_diffusers_flux3_lora_to_diffusers`` maps the blocks and ``convert_flux3_transformer_checkpoint_to_diffusers``
the rest:

- ``content_mode_blocks.{image,image_cond}.{i}.`` -> ``mode_blocks.{image,image_cond}.{i}.``, ``txt_mode_blocks.{i}.``
  keeps its name, ``single_blocks.{i}.`` -> ``single_transformer_blocks.{i}.``; in each ``q_proj`` -> ``attn.to_q``
  (``k``, ``v`` alike), ``attn_out`` -> ``attn.to_out.0``, ``mlp_in`` / ``mlp_out`` -> ``ff.linear_in`` / ``linear_out``;
- ``emb_in.{image,image_cond}`` -> ``x_embedders.*``, ``txt_in`` -> ``context_embedder``, ``time_in.in_layer`` /
  ``out_layer`` -> ``timestep_embedder.linear_1`` / ``linear_2`` (``ref_time_in``: the distilled models'
  ``target_timestep_embedder``), ``{early,single}_stream_modulations.*.lin`` -> ``.linear``,
  ``final_layer.image.linear`` -> ``proj_out``, ``final_layer.image.adaLN_modulation.1`` -> ``norm_out.linear`` with
  its ``(shift, scale)`` halves swapped to diffusers' ``(scale, shift)``.

``single_blocks_N_`` is Flux.1's and Flux.2's block prefix too; their module names there (``linear1``,
``linear2``, ``modulation_lin``) are not Flux 3's, so the table that knows a file's names reads it.
"""

from __future__ import annotations

from .engine import Blocks, Family, swapped

_BLOCK = {
    "q_proj": "attn.to_q",
    "k_proj": "attn.to_k",
    "v_proj": "attn.to_v",
    "attn_out": "attn.to_out.0",
    "mlp_in": "ff.linear_in",
    "mlp_out": "ff.linear_out",
}
# diffusers' own names under the blocks whose prefix is the original's (txt_mode_blocks): read, never written.
_ALIASES = {path.replace(".", "_"): path for path in _BLOCK.values()}

_TOP_LEVEL = {
    "emb_in_image": "x_embedders.image",
    "emb_in_image_cond": "x_embedders.image_cond",
    "txt_in": "context_embedder",
    "time_in_in_layer": "timestep_embedder.linear_1",
    "time_in_out_layer": "timestep_embedder.linear_2",
    "ref_time_in_in_layer": "target_timestep_embedder.linear_1",
    "ref_time_in_out_layer": "target_timestep_embedder.linear_2",
    "final_layer_image_linear": "proj_out",
    "final_layer_image_adaLN_modulation_1": swapped("norm_out.linear"),
} | {f"{stream}_stream_modulations_{mode}_lin": f"{stream}_stream_modulations.{mode}.linear"
     for stream in ("early", "single") for mode in ("image", "image_cond", "txt")}

FLUX3 = Family(
    "Flux 3",
    hint="content_mode_blocks_image_*_q_proj, txt_mode_blocks_*_attn_out, single_blocks_*_mlp_in, emb_in_image, ...",
    blocks=(
        Blocks("content_mode_blocks_image_{i}_", "mode_blocks.image.{i}.", _BLOCK),
        Blocks("content_mode_blocks_image_cond_{i}_", "mode_blocks.image_cond.{i}.", _BLOCK),
        Blocks("txt_mode_blocks_{i}_", "txt_mode_blocks.{i}.", _BLOCK, _ALIASES),
        Blocks("single_blocks_{i}_", "single_transformer_blocks.{i}.", _BLOCK),
    ),
    modules=_TOP_LEVEL,
    key="flux3",
    model_classes=("Flux3Transformer2DModel",),
    # Flux 3's own block names, and its modulations (top-level, no other family's): not single_blocks_N_ alone,
    # which Flux.1 and Flux.2 name too.
    claim=(r"(content_mode_blocks_image(_cond)?|txt_mode_blocks)_\d+_",
           r"single_blocks_\d+_(q_proj|k_proj|v_proj|attn_out|mlp_in|mlp_out)$",
           r"(early|single)_stream_modulations_(image|image_cond|txt)_lin$", r"emb_in_image(_cond)?$"),
    # diffusers' Flux 3 paths no other family has (Flux.1's single blocks have no to_out, Flux.2's no ff).
    detect=(r"^(txt_)?mode_blocks_", r"^single_transformer_blocks_\d+_(attn_to_out_0|ff_linear_(in|out))$",
            r"^(early|single)_stream_modulations_", r"^x_embedders_", r"^target_timestep_embedder_"),
    header_hints=("flux-3", "flux.3", "flux3", "flux_3"),
)  # fmt: skip
