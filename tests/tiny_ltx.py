"""Tiny LTX-Video and LTX-2 / LTX-2.3 pipelines built from configs with seeded random weights.

The transformer and connector configs are diffusers' own test configs (tests/lora/test_lora_layers_ltx_video.py,
tests/lora/test_lora_layers_ltx2.py: one block, 2-8 wide heads); LTX-2.3 adds what its checkpoint config
turns on (gated attention, cross-attention modulation, prompt AdaLN, per-modality text projections). The
pipelines hold only the LoRA components (``transformer``, and ``connectors`` for LTX-2): diffusers builds
``LTXPipeline`` / ``LTX2Pipeline`` with ``None`` for the VAEs, text encoder, tokenizer, scheduler and
vocoder, and its ``load_lora_weights`` needs nothing else. `outputs` runs the components the LoRA
changes on fixed inputs (a full pipeline run would add a Gemma / T5 encoder and VAEs that no LoRA touches).
"""

from __future__ import annotations

import torch
from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel, LTXPipeline, LTXVideoTransformer3DModel
from diffusers.pipelines.ltx2 import LTX2TextConnectors

from tiny import _randomize

LTXV_TRANSFORMER = {
    "in_channels": 8, "out_channels": 8, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 4,
    "attention_head_dim": 8, "cross_attention_dim": 32, "num_layers": 1, "caption_channels": 32,
}  # fmt: skip
LTX2_TRANSFORMER = {
    "in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
    "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4,
    "audio_num_attention_heads": 2, "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8, "num_layers": 1,
    "qk_norm": "rms_norm_across_heads", "caption_channels": 32, "rope_double_precision": False, "rope_type": "split",
}  # fmt: skip
# LTX-2.3's checkpoint config on top (ostris/ai-toolkit's and diffusers' convert_ltx2_to_diffusers.py, version 2.3).
LTX23_TRANSFORMER = LTX2_TRANSFORMER | {
    "gated_attn": True, "cross_attn_mod": True, "audio_gated_attn": True, "audio_cross_attn_mod": True,
    "use_prompt_embeddings": False, "perturbed_attn": True,
}  # fmt: skip
LTX2_CONNECTORS = {
    "caption_channels": 32, "text_proj_in_factor": 2, "video_connector_num_attention_heads": 4,
    "video_connector_attention_head_dim": 8, "video_connector_num_layers": 1,
    "video_connector_num_learnable_registers": None, "audio_connector_num_attention_heads": 4,
    "audio_connector_attention_head_dim": 8, "audio_connector_num_layers": 1,
    "audio_connector_num_learnable_registers": None, "connector_rope_base_seq_len": 32, "rope_double_precision": False,
    "causal_temporal_positioning": False, "rope_type": "split",
}  # fmt: skip
LTX23_CONNECTORS = LTX2_CONNECTORS | {
    "per_modality_projections": True, "video_hidden_dim": 16, "audio_hidden_dim": 8, "proj_bias": True,
    "video_gated_attn": True, "audio_gated_attn": True, "video_connector_num_attention_heads": 2,
    "audio_connector_num_attention_heads": 2, "audio_connector_attention_head_dim": 4,
}  # fmt: skip

FRAMES, HEIGHT, WIDTH, AUDIO_FRAMES, TEXT = 2, 4, 4, 5, 6


def tiny_ltx_video_pipeline(seed: int = 0) -> LTXPipeline:
    transformer = LTXVideoTransformer3DModel(**LTXV_TRANSFORMER).eval()
    _randomize(transformer, seed)
    return LTXPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def tiny_ltx2_pipeline(seed: int = 0, version: str = "2.0") -> LTX2Pipeline:
    transformer = LTX2VideoTransformer3DModel(**(LTX23_TRANSFORMER if version == "2.3" else LTX2_TRANSFORMER)).eval()
    connectors = LTX2TextConnectors(**(LTX23_CONNECTORS if version == "2.3" else LTX2_CONNECTORS)).eval()
    _randomize(transformer, seed)
    _randomize(connectors, seed + 1)
    return LTX2Pipeline(
        scheduler=None, vae=None, audio_vae=None, text_encoder=None, tokenizer=None,
        connectors=connectors, transformer=transformer, vocoder=None,
    )  # fmt: skip


def _inputs(pipe, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    config = pipe.transformer.config
    inputs = {
        "hidden_states": torch.randn(1, FRAMES * HEIGHT * WIDTH, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT, config.caption_channels, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.bool),
        "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "return_dict": False,
    }  # fmt: skip
    if isinstance(pipe, LTX2Pipeline):
        caption = config.caption_channels
        if not config.use_prompt_embeddings:  # LTX-2.3 takes the connectors' outputs as they are
            inputs["encoder_hidden_states"] = torch.randn(1, TEXT, config.cross_attention_dim, generator=g)
            caption = config.audio_cross_attention_dim
        inputs |= {
            "audio_hidden_states": torch.randn(1, AUDIO_FRAMES, config.audio_in_channels, generator=g),
            "audio_encoder_hidden_states": torch.randn(1, TEXT, caption, generator=g),
            "audio_num_frames": AUDIO_FRAMES, "fps": 25.0, "sigma": torch.tensor([0.5]),
        }  # fmt: skip
    return inputs


@torch.no_grad()
def outputs(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the LoRA components give on fixed inputs: the transformer's (video, and audio for LTX-2) output
    and, for LTX-2, the connectors' video and audio text embeddings."""
    out = pipe.transformer(**_inputs(pipe, seed))
    result = {"video": out[0]}
    if isinstance(pipe, LTX2Pipeline):
        result["audio"] = out[1]
        g = torch.Generator().manual_seed(seed + 200)
        config = pipe.connectors.config
        text = torch.randn(1, TEXT, config.caption_channels * config.text_proj_in_factor, generator=g)
        mask = torch.ones(1, TEXT, dtype=torch.long)
        mask[0, :2] = 0
        video_text, audio_text, _ = pipe.connectors(text, mask)
        result |= {"video_text": video_text, "audio_text": audio_text}
    return result
