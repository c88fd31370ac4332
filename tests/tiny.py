"""Tiny SD 1.5- and SDXL-shaped pipelines built from configs with seeded random weights.

Shapes follow the real models' topology (SD 1.5: 1x1-conv proj_in/out,
CLIPTextModel; SDXL: linear proj_in/out, text_time embedding, two text
encoders, the second with projection, three down blocks as in the real
SDXL so Stability's block numbering is exercised), with channels shrunk so
a forward takes milliseconds, as diffusers' own tests do.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_LEN = 8


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


_TOKENIZER_DIR = None


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (514 tokens), built offline."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.mkdtemp(prefix="tiny-clip-tok-")
        units = _bytes_to_unicode()
        vocab = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
        with open(os.path.join(_TOKENIZER_DIR, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(_TOKENIZER_DIR, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(_TOKENIZER_DIR, model_max_length=TEXT_LEN)


def _clip_config(hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        layer_norm_eps=1e-5,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=514,
        max_position_embeddings=TEXT_LEN,
        projection_dim=projection or hidden,
        hidden_act="gelu",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded random values, so zero-initialised layers (conv_out, ...) matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(_clip_config(16))
    _randomize(unet, seed)
    _randomize(text_encoder, seed + 1)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(torch.float32)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 24,
        cross_attention_dim=24,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(_clip_config(8))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, projection=24))
    _randomize(unet, seed)
    _randomize(text_encoder, seed + 1)
    _randomize(text_encoder_2, seed + 2)
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
    )


def unet_inputs(pipe, seed: int = 0, batch: int = 2) -> dict:
    """Fixed random inputs for the pipeline's UNet (with SDXL's added conditions when it needs them)."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    inputs = {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 24, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    if unet.dtype != torch.float32:  # drawn in fp32 (the same numbers for every dtype), given in the UNet's
        inputs = {k: v.to(unet.dtype) if k != "timestep" and torch.is_tensor(v) else v for k, v in inputs.items()}
    return inputs


def text_ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (batch, TEXT_LEN), generator=g)


@torch.no_grad()
def outputs(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
    """The UNet's and each text encoder's output on fixed inputs."""
    out = {"unet": pipe.unet(**unet_inputs(pipe, seed)).sample}
    ids = text_ids(seed)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            result = encoder(ids, output_hidden_states=True)
            out[name] = result.hidden_states[-2]
            if hasattr(result, "text_embeds"):
                out[name + ".text_embeds"] = result.text_embeds
    return out
