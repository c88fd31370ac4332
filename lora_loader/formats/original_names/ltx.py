"""LTX-Video 0.9.x and LTX-2 / LTX-2.3 in Lightricks' module names (ComfyUI, the LTX-2 trainer, ai-toolkit,
diffusion-pipe) -> diffusers' ``LTXVideoTransformer3DModel`` / ``LTX2VideoTransformer3DModel`` and LTX-2's
``connectors`` (``LTX2TextConnectors``).

Lightricks' checkpoints keep diffusers' names for almost everything: the blocks are
``transformer_blocks.{i}.{attn1,attn2,ff}`` in both, and LTX-2 adds ``audio_attn1``, ``audio_attn2``,
``audio_ff``, ``audio_to_video_attn`` and ``video_to_audio_attn`` (with ``to_gate_logits`` in 2.3), all
under the same names in diffusers. What diffusers renamed (``scripts/convert_ltx_to_diffusers.py``,
``convert_ltx2_to_diffusers.py``; ``_convert_non_diffusers_ltx2_lora_to_diffusers`` for LoRAs):

- ``patchify_proj`` / ``audio_patchify_proj`` -> ``proj_in`` / ``audio_proj_in``;
- the AdaLN-single modulations: ``adaln_single`` -> ``time_embed``, ``audio_adaln_single`` ->
  ``audio_time_embed``, ``prompt_adaln_single`` -> ``prompt_adaln`` (2.3), the audio-video cross-attention
  ones ``av_ca_{video_scale_shift,audio_scale_shift,a2v_gate,v2a_gate}_adaln_single`` ->
  ``av_cross_attn_{video_scale_shift,audio_scale_shift,video_a2v_gate,audio_v2a_gate}``;
- the attention norms ``q_norm`` / ``k_norm`` -> ``norm_q`` / ``norm_k``;
- LTX-2's text connectors, which the checkpoint keeps in its diffusion model
  (``video_embeddings_connector.transformer_1d_blocks.{i}``, ``audio_embeddings_connector...``) and its
  text projection beside it (``text_embedding_projection.aggregate_embed``; 2.3:
  ``video_aggregate_embed`` / ``audio_aggregate_embed``): diffusers' ``connectors`` component
  (``video_connector.transformer_blocks.{i}``, ``text_proj_in``, ``video_text_proj_in``, ...).
  diffusers' converter sends ``text_embedding_projection.*`` there but the connector blocks to the
  transformer, where peft drops them; here both go to ``connectors``.

LTX-Video's names are LTX-2's video half, so one name table serves both families. Since a file in
diffusers' names uses the same block names, only the names diffusers renamed make a file LTX's
(``claim``); ``adaln_single`` does not, being diffusers' PixArt name too. Every producer writes a PEFT
pair without an alpha (ComfyUI, ltx_core and diffusers then use scale 1); ComfyUI's own files may add one.
"""

from __future__ import annotations

from .engine import Blocks, Family, Target

_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out.0", "to_gate_logits": "to_gate_logits"}
_NORMS = {"q_norm": "norm_q", "k_norm": "norm_k"}
_VIDEO_ATTENTIONS = ("attn1", "attn2")
_AUDIO_ATTENTIONS = ("audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")


def _attention(name: str, norms_first: bool = False) -> dict[str, str]:
    """One attention's modules, original suffix -> diffusers path."""
    projections = {f"{name}_{s}": f"{name}.{p}" for s, p in _PROJECTIONS.items()}
    norms = {f"{name}_{s}": f"{name}.{p}" for s, p in _NORMS.items()}
    return norms | projections if norms_first else projections | norms


def _feed_forward(name: str) -> dict[str, str]:
    return {f"{name}_net_0_proj": f"{name}.net.0.proj", f"{name}_net_2": f"{name}.net.2"}


def _adaln(original: str, diffusers: str) -> dict[str, str]:
    """An AdaLayerNormSingle: its timestep MLP and its modulation projection."""
    return {
        f"{original}_emb_timestep_embedder_linear_1": f"{diffusers}.emb.timestep_embedder.linear_1",
        f"{original}_emb_timestep_embedder_linear_2": f"{diffusers}.emb.timestep_embedder.linear_2",
        f"{original}_linear": f"{diffusers}.linear",
    }


# The transformer blocks. The video attention norms come first: a file in LTX-Video's names is named by them.
_BLOCK = (
    _attention("attn1", norms_first=True) | _attention("attn2") | _feed_forward("ff")
    | {k: v for a in _AUDIO_ATTENTIONS for k, v in _attention(a).items()} | _feed_forward("audio_ff")
)  # fmt: skip
_TRANSFORMER_BLOCKS = Blocks("transformer_blocks_{i}_", "transformer_blocks.{i}.", _BLOCK)
_CONNECTOR_BLOCK = _attention("attn1") | _feed_forward("ff")
_CONNECTOR_BLOCKS = (
    Blocks("video_embeddings_connector_transformer_1d_blocks_{i}_", "video_connector.transformer_blocks.{i}.",
           _CONNECTOR_BLOCK, component="connectors"),
    Blocks("audio_embeddings_connector_transformer_1d_blocks_{i}_", "audio_connector.transformer_blocks.{i}.",
           _CONNECTOR_BLOCK, component="connectors"),
)  # fmt: skip

_MODULES = (
    {
        "patchify_proj": "proj_in",
        "audio_patchify_proj": "audio_proj_in",
        "caption_projection_linear_1": "caption_projection.linear_1",
        "caption_projection_linear_2": "caption_projection.linear_2",
        "audio_caption_projection_linear_1": "audio_caption_projection.linear_1",
        "audio_caption_projection_linear_2": "audio_caption_projection.linear_2",
        "proj_out": "proj_out",
        "audio_proj_out": "audio_proj_out",
    }
    | _adaln("adaln_single", "time_embed")
    | _adaln("audio_adaln_single", "audio_time_embed")
    | _adaln("prompt_adaln_single", "prompt_adaln")
    | _adaln("audio_prompt_adaln_single", "audio_prompt_adaln")
    | _adaln("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift")
    | _adaln("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift")
    | _adaln("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate")
    | _adaln("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate")
    | {  # the Gemma feature extractor's projection (2.0) or per-modality projections (2.3), outside the DiT
        "text_embedding_projection_aggregate_embed": Target(("text_proj_in",), component="connectors"),
        "text_embedding_projection_video_aggregate_embed": Target(("video_text_proj_in",), component="connectors"),
        "text_embedding_projection_audio_aggregate_embed": Target(("audio_text_proj_in",), component="connectors"),
    }
)  # fmt: skip

_HINT = "transformer_blocks_*, patchify_proj, adaln_single_*, av_ca_*, video_embeddings_connector_*, ..."

# Names only an LTX-2 checkpoint has, and that diffusers renamed (so a diffusers-named file never claims).
_LTX2_CLAIM = (
    r"(audio_)?patchify_proj$",
    r"audio_adaln_single_",
    r"(audio_)?prompt_adaln_single_",
    r"av_ca_",
    rf"transformer_blocks_\d+_({'|'.join(_AUDIO_ATTENTIONS)})_[qk]_norm$",
    r"(video|audio)_embeddings_connector_",
    r"text_embedding_projection_",
)

LTX2 = Family(
    "LTX-2",
    hint=_HINT,
    blocks=(*_CONNECTOR_BLOCKS, _TRANSFORMER_BLOCKS),
    modules=_MODULES,
    key="ltx2",
    model_classes=("LTX2VideoTransformer3DModel",),
    detect=(
        r"^transformer_blocks_\d+_(audio_attn[12]|audio_ff|audio_to_video_attn|video_to_audio_attn)_",
        r"^audio_proj_(in|out)$",
        r"^audio_time_embed_",
        r"^av_cross_attn_(video|audio)_",
        r"^audio_caption_projection_",
        r"^(audio_)?prompt_adaln_",
    ),
    header_hints=("ltx2", "ltx-2", "ltx_2", "ltxav", "ltxv2", "ltx-av"),
    claim=_LTX2_CLAIM,
    # ai-toolkit's convert_lora_diffusers_to_original renames ``audio_prompt_adaln`` and then the ``prompt_adaln``
    # inside the result (LTX-2.3, with ``transformer_only: false``); diffusers' converter reads it back the same way.
    prefix_aliases={"audio_prompt_adaln_single_single_": "audio_prompt_adaln_single_"},
)

LTX_VIDEO = Family(
    "LTX-Video",
    hint=_HINT,
    blocks=(_TRANSFORMER_BLOCKS, *_CONNECTOR_BLOCKS),
    modules=_MODULES,
    key="ltx-video",
    model_classes=("LTXVideoTransformer3DModel",),
    # Names only: an LTX-2 file with no audio module reads as LTX-Video; CogVideoX and Mochi use attn1 too.
    detect=(r"^transformer_blocks_\d+_attn1_",),
    # attn1 names LTX-Video shares with DiTs it is not: Anima / Cosmos (norm1.linear_1 adaLN-LoRA layers), SANA
    # (ff.conv_inverted / conv_depth / conv_point), PixArt / SANA's caption_projection beside no LTX name.
    detect_unless=(r"^transformer_blocks_\d+_norm[123]_linear_[12]$", r"^transformer_blocks_\d+_ff_conv_"),
    header_hints=("ltx-video", "ltx_video", "ltxvideo", "ltxv"),
    claim=(r"patchify_proj$", rf"transformer_blocks_\d+_({'|'.join(_VIDEO_ATTENTIONS)})_[qk]_norm$"),
)
