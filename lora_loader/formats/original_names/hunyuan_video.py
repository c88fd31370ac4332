"""HunyuanVideo (1.0, I2V, SkyReels, FramePack) and HunyuanVideo 1.5 in Tencent's module names -> diffusers' transformers.

Tencent's checkpoints (and musubi-tuner's ``lora_unet_*``, diffusion-pipe's ``transformer.*`` and
ComfyUI's ``diffusion_model.*`` files, which keep them) name the dual-stream blocks
``double_blocks_{i}_*`` and the single-stream ones ``single_blocks_{i}_*``, as Flux does, with
their own module names: ``img_mod_linear`` (Flux: ``img_mod_lin``), ``img_mlp_fc1`` (``img_mlp_0``),
``modulation_linear`` (``modulation_lin``), and a text token refiner
(``txt_in_individual_token_refiner_blocks_{i}_*``) Flux has not. Fused projections split by rows:
``img_attn_qkv`` / ``txt_attn_qkv`` / the refiner's ``self_attn_qkv`` into equal thirds,
``single_blocks_{i}_linear1`` into ``[d, d, d, 4d]`` (to_q, to_k, to_v, proj_mlp; MLP ratio 4).
The final layer's adaLN modulation is ``(shift, scale)`` there and ``(scale, shift)`` in
diffusers. Names as diffusers' ``_convert_hunyuan_video_lora_to_diffusers`` maps them; diffusers'
FramePack, I2V and SkyReels transformers have the same module paths (FramePack's extra
``clean_x_embedder`` / ``image_projection`` are diffusers' names in FramePack's own checkpoints).

HunyuanVideo 1.5 has dual-stream blocks only, with separate ``img_attn_q`` / ``_k`` / ``_v``
projections, ``byt5_in``, ``vision_in`` and ``time_in`` on diffusers' ``time_embed`` (not
``time_text_embed``); diffusers has no converter (nor LoRA loader) for it, the names are its
checkpoint converter's (``scripts/convert_hunyuan_video1_5_to_diffusers.py``).

ComfyUI runs both on Flux's block code: its own names (``img_mod_lin``, ``img_mlp_0``,
``modulation_lin``, ``txt_in_t_embedder_in_layer``, a fused ``img_attn_qkv`` in 1.5, as musubi's
``convert_hunyuan_video_1_5_lora_to_comfy`` writes it) are aliases here.
"""

from __future__ import annotations

from .engine import Blocks, Family, fused, swapped

_REFINER = Blocks("txt_in_individual_token_refiner_blocks_{i}_", "context_embedder.token_refiner.refiner_blocks.{i}.", {
    "self_attn_qkv": fused("attn.to_q", "attn.to_k", "attn.to_v"),
    "self_attn_proj": "attn.to_out.0",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "adaLN_modulation_1": "norm_out.linear",  # (gate_msa, gate_mlp): no swap
}, aliases={"mlp_0": "ff.net.0.proj", "mlp_2": "ff.net.2"})  # fmt: skip

_DOUBLE = {
    "img_mlp_fc1": "ff.net.0.proj",
    "img_mlp_fc2": "ff.net.2",
    "img_mod_linear": "norm1.linear",
    "img_attn_proj": "attn.to_out.0",
    "txt_mlp_fc1": "ff_context.net.0.proj",
    "txt_mlp_fc2": "ff_context.net.2",
    "txt_mod_linear": "norm1_context.linear",
    "txt_attn_proj": "attn.to_add_out",
}
_IMG_QKV = fused("attn.to_q", "attn.to_k", "attn.to_v")
_TXT_QKV = fused("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
# ComfyUI's DoubleStreamBlock (Flux's code) names the same modules as Black Forest Labs does.
_DOUBLE_COMFY = {
    "img_mlp_0": "ff.net.0.proj",
    "img_mlp_2": "ff.net.2",
    "img_mod_lin": "norm1.linear",
    "txt_mlp_0": "ff_context.net.0.proj",
    "txt_mlp_2": "ff_context.net.2",
    "txt_mod_lin": "norm1_context.linear",
}

# Top-level modules both versions have.
_TEXT_IN = {
    "img_in_proj": "x_embedder.proj",
    "txt_in_input_embedder": "context_embedder.proj_in",
    "txt_in_t_embedder_mlp_0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in_t_embedder_mlp_2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in_c_embedder_linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in_c_embedder_linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": swapped("norm_out.linear"),
}
_TEXT_IN_COMFY = {  # ComfyUI's TokenRefiner: MLPEmbedder(in_layer, out_layer) for both embedders
    "txt_in_t_embedder_in_layer": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in_t_embedder_out_layer": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in_c_embedder_in_layer": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in_c_embedder_out_layer": "context_embedder.time_text_embed.text_embedder.linear_2",
}

HUNYUAN_VIDEO_15 = Family(
    "HunyuanVideo 1.5",
    hint="double_blocks_*_img_attn_q, double_blocks_*_img_mlp_fc1, txt_in_*, byt5_in_*, ...",
    blocks=(
        Blocks("double_blocks_{i}_", "transformer_blocks.{i}.", {
            "img_attn_q": "attn.to_q",
            "img_attn_k": "attn.to_k",
            "img_attn_v": "attn.to_v",
            "txt_attn_q": "attn.add_q_proj",
            "txt_attn_k": "attn.add_k_proj",
            "txt_attn_v": "attn.add_v_proj",
            **_DOUBLE,
        }, aliases={"img_attn_qkv": _IMG_QKV, "txt_attn_qkv": _TXT_QKV, **_DOUBLE_COMFY}),
        _REFINER,
    ),
    modules={
        **_TEXT_IN,
        "time_in_mlp_0": "time_embed.timestep_embedder.linear_1",
        "time_in_mlp_2": "time_embed.timestep_embedder.linear_2",
        "time_r_in_mlp_0": "time_embed.timestep_embedder_r.linear_1",  # MeanFlow checkpoints
        "time_r_in_mlp_2": "time_embed.timestep_embedder_r.linear_2",
        "byt5_in_fc1": "context_embedder_2.linear_1",
        "byt5_in_fc2": "context_embedder_2.linear_2",
        "byt5_in_fc3": "context_embedder_2.linear_3",
        "vision_in_proj_1": "image_embedder.linear_1",
        "vision_in_proj_3": "image_embedder.linear_2",
    },
    aliases={**_TEXT_IN_COMFY, "time_in_in_layer": "time_embed.timestep_embedder.linear_1",
             "time_in_out_layer": "time_embed.timestep_embedder.linear_2"},
    key="hunyuan-video-1.5",
    model_classes=("HunyuanVideo15Transformer3DModel",),
    # diffusers' names only 1.5 has; its 54 blocks past Mochi's 48 (SD3.5's 38) with a joint block's modules.
    detect=(
        r"^context_embedder_2_linear_[123]$",
        r"^image_embedder_linear_[12]$",
        r"^time_embed_timestep_embedder(_r)?_linear_[12]$",
        r"^transformer_blocks_(4[89]|5[0-3])_"
        r"(norm1_linear|norm1_context_linear|ff_net_0_proj|ff_net_2|ff_context_net_0_proj|ff_context_net_2)$",
    ),
    # musubi-tuner: ss_base_model_version "hunyuan_video_1_5", modelspec.architecture "hunyuan-video-1.5/lora";
    # lora_loader's own saves: lora_loader.base_model "HunyuanVideo15Transformer3DModel"
    header_hints=("hunyuan_video_1_5", "hunyuan-video-1.5", "hunyuanvideo-1.5", "hunyuanvideo1.5", "hunyuanvideo15"),
)  # fmt: skip

HUNYUAN_VIDEO = Family(
    "HunyuanVideo",
    hint="double_blocks_*_img_mlp_fc1, single_blocks_*_linear1, txt_in_individual_token_refiner_*, ...",
    blocks=(
        Blocks("single_blocks_{i}_", "single_transformer_blocks.{i}.", {
            "modulation_linear": "norm.linear",
            "linear1": fused(("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4)),
            "linear2": "proj_out",
        }, aliases={"modulation_lin": "norm.linear"}),
        Blocks("double_blocks_{i}_", "transformer_blocks.{i}.", {
            **_DOUBLE,
            "img_attn_qkv": _IMG_QKV,
            "txt_attn_qkv": _TXT_QKV,
        }, aliases=_DOUBLE_COMFY),
        _REFINER,
    ),
    modules={
        **_TEXT_IN,
        "time_in_mlp_0": "time_text_embed.timestep_embedder.linear_1",
        "time_in_mlp_2": "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in_mlp_0": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_mlp_2": "time_text_embed.guidance_embedder.linear_2",
    },
    aliases={
        **_TEXT_IN_COMFY,
        "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
        "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    },
    key="hunyuan-video",
    model_classes=("HunyuanVideoTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel"),
    # diffusers' names only HunyuanVideo has (1.5's own come first in FAMILIES): the token refiner, the 3-D
    # patch embedding, FramePack's history embedders, and single blocks 38-39 (Flux.1 has 38).
    detect=(
        r"^context_embedder_token_refiner_refiner_blocks_\d+_",
        r"^context_embedder_(proj_in|time_text_embed_(timestep|text)_embedder_linear_[12])$",
        r"^x_embedder_proj$",
        r"^clean_x_embedder_proj(_2x|_4x)?$",
        r"^image_projection_(up|down)$",
        r"^single_transformer_blocks_3[89]_(attn_to_[qkv]|proj_mlp|proj_out|norm_linear)$",
    ),
    # musubi-tuner: "hunyuan_video" / "hunyuan-video/lora", FramePack "framepack" / "framepack/lora"; lora_loader's
    # saves: "HunyuanVideoTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel"
    header_hints=("hunyuan_video", "hunyuan-video", "hunyuanvideo", "framepack"),
)  # fmt: skip
