"""Tiny Lumina 2, HiDream-I1, Anima (Cosmos-Predict2 DiT + its text conditioner) and Krea 2 models (diffusers' test
sizes or smaller), seeded, each with a fixed input: for tests/test_lumina2.py, test_hidream.py, test_anima_krea2.py."""

from __future__ import annotations

import torch
from diffusers import CosmosTransformer3DModel, HiDreamImageTransformer2DModel, Krea2Transformer2DModel, Lumina2Transformer2DModel
from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner


def tiny_lumina2(seed: int = 0) -> Lumina2Transformer2DModel:
    """3 query heads, 1 key/value head (Lumina-Image 2.0 has 24 and 8: its fused qkv's rows are q:k:v = 3:1:1)."""
    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(32, 32, 32), cap_feat_dim=16,
    ).eval()  # fmt: skip


def lumina2_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 6, 16, generator=g)
    with torch.no_grad():
        return model(hidden, torch.tensor([0.5]), text, torch.ones(1, 6, dtype=torch.bool), return_dict=False)[0]


def tiny_hidream(seed: int = 0) -> HiDreamImageTransformer2DModel:
    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
    ).eval()  # fmt: skip


def hidream_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 4, 8, 8, generator=g)
    t5 = torch.randn(1, 5, 32, generator=g)
    llama = torch.randn(2, 1, 5, 16, generator=g)
    pooled = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return model(hidden_states=hidden, timesteps=torch.tensor([500]), encoder_hidden_states_t5=t5,
                     encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]  # fmt: skip


def tiny_cosmos(seed: int = 0) -> CosmosTransformer3DModel:
    """Anima's denoiser: the Cosmos-Predict2 DiT."""
    torch.manual_seed(seed)
    return CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",  # True needs torchvision
    ).eval()  # fmt: skip


def tiny_anima_conditioner(seed: int = 0) -> AnimaTextConditioner:
    torch.manual_seed(seed)
    return AnimaTextConditioner(source_dim=16, target_dim=16, model_dim=16, num_layers=2, num_attention_heads=2,
                                target_vocab_size=32, min_sequence_length=4).eval()  # fmt: skip


def cosmos_output(model, text: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 4, 1, 8, 8, generator=g)
    default_text = torch.randn(1, 6, 16, generator=g)
    with torch.no_grad():
        return model(hidden, torch.tensor([0.5]), default_text if text is None else text,
                     return_dict=False)[0]  # fmt: skip


def conditioner_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    source = torch.randn(1, 5, 16, generator=g)
    ids = torch.randint(0, 32, (1, 6), generator=g)
    with torch.no_grad():
        return model(source, ids)


def tiny_krea2(seed: int = 0) -> Krea2Transformer2DModel:
    """diffusers' test sizes (tests/lora/test_lora_layers_krea2.py)."""
    torch.manual_seed(seed)
    return Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2), rope_theta=1000.0,
    ).eval()  # fmt: skip


def krea2_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 16, 16, generator=g)
    text = torch.randn(1, 5, 3, 16, generator=g)
    ids = torch.zeros(5 + 16, 3)
    ids[5:, 1] = torch.arange(16) // 4
    ids[5:, 2] = torch.arange(16) % 4
    with torch.no_grad():
        return model(hidden, text, torch.tensor([0.5]), ids, return_dict=False)[0]
