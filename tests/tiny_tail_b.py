"""Tiny Ideogram 4, ACE-Step 1.5 and Flux 3 transformers (diffusers' test sizes or smaller), seeded, with a fixed
input each. The layouts, the independent merge and the comparisons are `tiny_qwen`'s (`spell`, `random_pairs`,
`independent_merge`, `kohya_resolver`, `assert_close`, `diffusers_output`)."""

from __future__ import annotations

import torch
from diffusers import Flux3Transformer2DModel, Ideogram4Transformer2DModel
from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel


def tiny_ideogram4(seed: int = 0) -> Ideogram4Transformer2DModel:
    """diffusers' tests/lora/test_lora_layers_ideogram4.py sizes (hidden 32, 2 layers), a 16-wide text feature."""
    torch.manual_seed(seed)
    model = Ideogram4Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32, adaln_dim=16,
        llm_features_dim=16, rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5,
    ).eval()  # fmt: skip
    with torch.no_grad():  # a non-zero indicator embedding and final layer (a zero-initialised one would hide a LoRA)
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.1)
    return model


def ideogram4_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    text, image = 6, 8
    length = text + image
    hidden = torch.randn(1, length, 16, generator=g)
    features = torch.randn(1, length, 16, generator=g)
    indicator = torch.tensor([[3] * text + [2] * image])
    position = torch.stack([torch.arange(length), torch.arange(length) % 4, torch.arange(length) // 4], dim=-1)[None]
    with torch.no_grad():
        return model(
            hidden_states=hidden, timestep=torch.tensor([0.5]), encoder_hidden_states=features, position_ids=position,
            segment_ids=torch.zeros(1, length, dtype=torch.long), indicator=indicator, return_dict=False,
        )[0]  # fmt: skip


def tiny_ace_step(seed: int = 0) -> AceStepTransformer1DModel:
    """diffusers' tests/lora/test_lora_layers_ace_step.py sizes: hidden 32, 2 layers, 4 heads, 2 key/value heads."""
    torch.manual_seed(seed)
    return AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0, sliding_window=16,
    ).eval()  # fmt: skip


def ace_step_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 10, 8, generator=g)
    context = torch.randn(1, 10, 16, generator=g)  # in_channels 24 = context 16 + latents 8
    condition = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(
            hidden_states=hidden, timestep=torch.tensor([0.6]), timestep_r=torch.tensor([0.3]),
            encoder_hidden_states=condition, context_latents=context, return_dict=False,
        )[0]  # fmt: skip


def tiny_flux3(seed: int = 0) -> Flux3Transformer2DModel:
    """Hidden 32 (2 heads of 16), one mode block per mode, two single blocks, RoPE axes 4 x 4."""
    torch.manual_seed(seed)
    return Flux3Transformer2DModel(
        in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=12, timestep_channels=16, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
    ).eval()  # fmt: skip


def flux3_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    image, text, cond = 6, 5, 4
    hidden = torch.randn(1, image, 8, generator=g)
    context = torch.randn(1, text, 12, generator=g)
    reference = torch.randn(1, cond, 8, generator=g)
    ids = lambda n, l: torch.stack([torch.zeros(n), torch.arange(n) // 2, torch.arange(n) % 2, torch.full((n,), l)], -1)  # noqa: E731
    with torch.no_grad():
        return model(
            hidden_states=hidden, encoder_hidden_states=context, timestep=torch.tensor([0.5]), img_ids=ids(image, 0.0),
            txt_ids=ids(text, 0.0), image_cond_hidden_states=reference, image_cond_ids=ids(cond, 1.0), return_dict=False,
        )[0]  # fmt: skip
