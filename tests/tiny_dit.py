"""Tiny SD3- and Flux-shaped pipelines built from configs with seeded random weights.

The shapes follow diffusers' own pipeline tests (one or two joint blocks, 32-wide
text encoders); the T5 encoders are built from a config instead of a Hub
checkpoint, and every tokenizer is the offline byte-level CLIP tokenizer of
`tiny.py` (the T5 vocabulary is made wide enough for its ids).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tiny import _clip_config, _randomize, tiny_tokenizer

PROMPT = "red"


def _t5(seed: int) -> T5EncoderModel:
    config = T5Config(vocab_size=520, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()  # built from a config it is in train mode, with dropout on


def _vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip
    text_encoder = CLIPTextModel(_clip_config(32, projection=32))
    text_encoder_2 = _t5(seed + 2)
    _randomize(transformer, seed)
    _randomize(text_encoder, seed + 1)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(1),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )  # fmt: skip
    text_encoder = CLIPTextModelWithProjection(_clip_config(32, projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(32, projection=32))
    _randomize(transformer, seed)
    _randomize(text_encoder, seed + 1)
    _randomize(text_encoder_2, seed + 3)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(seed + 4) if with_t5 else None,
        tokenizer_3=tiny_tokenizer() if with_t5 else None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    """Two denoising steps to latents, from a fixed generator: the pipeline end to end."""
    kwargs.setdefault("max_sequence_length", 8)
    return pipe(
        PROMPT, num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="latent",
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images  # fmt: skip
