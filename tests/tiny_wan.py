"""Tiny Wan-shaped transformers and pipelines (Wan 2.1 T2V / I2V, Wan 2.2 with two experts, VACE, SkyReels-V2,
Helios), built from configs with seeded random weights, and the trainers' names for their modules.

The sizes are diffusers' own pipeline tests' (tests/pipelines/wan/test_wan_22.py: two blocks, 2 heads of 12,
FFN 32, text width 32); the I2V model adds the CLIP image embedder and the image key / value projections as
Wan 2.1 I2V has them (``image_dim``, ``added_kv_proj_dim``). Every parameter gets seeded random values, the
norms' and modulations' included, so a change anywhere shows in the output. Pipelines are built without text
encoder, tokenizer and VAE (diffusers allows it): a LoRA reaches only the transformers, whose outputs the
tests compare on fixed inputs.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

DIM = 24  # 2 heads x 12
IMAGE_DIM = 20  # the CLIP image features' width of the tiny I2V model
FFN = 32
LAYERS = 2
WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=256, ffn_dim=FFN, num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)  # fmt: skip


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_wan(seed: int = 0, i2v: bool = False) -> WanTransformer3DModel:
    """Wan 2.1 T2V (or, with ``i2v``, I2V: image embedder and ``attn2.add_k_proj`` / ``add_v_proj``)."""
    extra = {"image_dim": IMAGE_DIM, "added_kv_proj_dim": DIM} if i2v else {}
    torch.manual_seed(seed)
    return randomize(WanTransformer3DModel(**WAN_CONFIG, **extra), seed)


def tiny_wan_pipeline(two_experts: bool = True, i2v: bool = False) -> WanPipeline:
    """A ``WanPipeline`` with the transformer(s) only: Wan 2.2 A14B's two experts, or Wan 2.1's one."""
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=tiny_wan(0, i2v), transformer_2=tiny_wan(1, i2v) if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_inputs(i2v: bool = False, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
    )  # fmt: skip
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 3, IMAGE_DIM, generator=g)
    return inputs


@torch.no_grad()
def wan_output(model, i2v: bool = False, **extra) -> torch.Tensor:
    return model(**wan_inputs(i2v), **extra).sample


# The original checkpoint's names (Wan-Video's WanModel) of diffusers' modules, as every trainer but diffusers
# writes them: transcribed from diffusers' scripts/convert_wan_to_diffusers.py, independently of lora_loader.
BLOCK_ORIGINAL = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k", "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k", "attn2.norm_added_k": "cross_attn.norm_k_img", "norm2": "norm3",
    "scale_shift_table": "modulation",
}  # fmt: skip
TOP_ORIGINAL = {
    "patch_embedding": "patch_embedding", "proj_out": "head.head", "scale_shift_table": "head.modulation",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0", "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0", "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0", "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3", "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
}  # fmt: skip
# What musubi-tuner, diffusion-pipe and the Wan LoRAs on the Hub train: every linear of the attention blocks.
T2V_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]  # fmt: skip
I2V_TARGETS = T2V_TARGETS + ["attn2.add_k_proj", "attn2.add_v_proj"]


def original_name(path: str) -> str:
    """diffusers' module path -> the original checkpoint's (``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q``)."""
    if path.startswith("blocks."):
        _, index, rest = path.split(".", 2)
        return f"blocks.{index}.{BLOCK_ORIGINAL[rest]}"
    return TOP_ORIGINAL[path]
