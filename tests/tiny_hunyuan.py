"""Tiny HunyuanVideo-family transformers (1.0 / I2V, FramePack, 1.5) from configs with seeded random weights.

The configs are diffusers' own test configs (``tests/lora/test_lora_layers_hunyuanvideo.py``,
``tests/models/transformers/test_models_transformer_hunyuan_video_framepack.py`` and
``test_models_transformer_hunyuan_1_5.py``, with MeanFlow on): hidden size 20 (2 heads of 10) for 1.0 and FramePack,
16 for 1.5. ``forward`` runs one transformer call on fixed inputs; a pipeline wraps a 1.0
transformer alone (diffusers' ``HunyuanVideoPipeline`` with no text encoders or VAE), which is
all ``load_lora_weights`` needs on either side.
"""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoFramepackTransformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)

from tiny import _randomize

HUNYUAN = {
    "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 1,
    "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1, "guidance_embeds": True,
    "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4),
}  # fmt: skip
FRAMEPACK = HUNYUAN | {"patch_size": 2, "has_image_proj": True, "image_proj_dim": 16, "has_clean_x_embedder": True}
HUNYUAN_15 = {
    "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
    "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16,
    "text_embed_2_dim": 8, "image_embed_dim": 12, "rope_axes_dim": (2, 2, 4), "target_size": 16, "task_type": "t2v",
    "use_meanflow": True,  # the distilled checkpoints' second timestep embedder (time_r_in)
}  # fmt: skip


def tiny_hunyuan(seed: int = 0, **config) -> HunyuanVideoTransformer3DModel:
    """HunyuanVideo 1.0 (``image_condition_type="token_replace"``: HunyuanVideo-I2V's blocks)."""
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**(HUNYUAN | config))
    _randomize(model, seed)
    return model.eval()


def tiny_framepack(seed: int = 0) -> HunyuanVideoFramepackTransformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideoFramepackTransformer3DModel(**FRAMEPACK)
    _randomize(model, seed)
    return model.eval()


def tiny_hunyuan_15(seed: int = 0) -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(**HUNYUAN_15)
    _randomize(model, seed)
    return model.eval()


def tiny_hunyuan_pipeline(seed: int = 0, **config) -> HunyuanVideoPipeline:
    """diffusers' HunyuanVideo pipeline around a tiny transformer: what its LoRA loader (and lora_loader) loads into."""
    return HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=tiny_hunyuan(seed, **config), vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def _inputs(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    cfg = model.config
    if isinstance(model, HunyuanVideo15Transformer3DModel):
        return {
            "hidden_states": torch.randn(1, 4, 1, 4, 4, generator=g), "timestep": torch.tensor([500.0]),
            "timestep_r": torch.tensor([250.0]),
            "encoder_hidden_states": torch.randn(1, 6, cfg.text_embed_dim, generator=g),
            "encoder_attention_mask": torch.ones(1, 6),
            "encoder_hidden_states_2": torch.randn(1, 4, cfg.text_embed_2_dim, generator=g),
            "encoder_attention_mask_2": torch.ones(1, 4),
            "image_embeds": torch.randn(1, 3, cfg.image_embed_dim, generator=g),
        }  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(1, 4, 3 if cfg.image_condition_type is None else 2, 4, 4, generator=g),
        "timestep": torch.tensor([500]), "encoder_hidden_states": torch.randn(1, 5, cfg.text_embed_dim, generator=g),
        "encoder_attention_mask": torch.ones(1, 5), "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "guidance": torch.tensor([3500.0]),
    }  # fmt: skip
    if isinstance(model, HunyuanVideoFramepackTransformer3DModel):
        inputs |= {
            "image_embeds": torch.randn(1, 4, cfg.image_proj_dim, generator=g), "indices_latents": torch.arange(3),
            "latents_clean": torch.randn(1, 4, 2, 4, 4, generator=g), "indices_latents_clean": torch.arange(2),
            "latents_history_2x": torch.randn(1, 4, 2, 4, 4, generator=g), "indices_latents_history_2x": torch.arange(2),
            "latents_history_4x": torch.randn(1, 4, 8, 4, 4, generator=g), "indices_latents_history_4x": torch.arange(8),
        }  # fmt: skip
    return inputs


@torch.no_grad()
def forward(model) -> torch.Tensor:
    """The transformer's output on fixed inputs (a pipeline's transformer, or the model itself)."""
    model = getattr(model, "transformer", model)
    return model(**_inputs(model)).sample
