"""Tiny transformers of the families whose diffusers loader has no converter (SANA, SANA-Video, CogView4, AuraFlow,
Kandinsky 5, ERNIE-Image, Cosmos Predict 2.5, Bria Fibo 2, aMUSEd's U-ViT, RFD4 Proteina), diffusers' own test sizes where its tests have them,
seeded, each with a fixed input: ``MAKERS[family] = (make(seed) -> model, output(model) -> tensor, pipeline class)``.
"""

from __future__ import annotations

import torch

from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    BriaFibo2Pipeline,
    BriaFibo2Transformer2DModel,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    Cosmos2_5_PredictBasePipeline,
    CosmosTransformer3DModel,
    ErnieImagePipeline,
    ErnieImageTransformer2DModel,
    Kandinsky5T2IPipeline,
    Kandinsky5Transformer3DModel,
    RFD4ProteinaPipeline,
    RFD4ProteinaTransformer,
    SanaPipeline,
    SanaTransformer2DModel,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
    UVit2DModel,
)
from diffusers.loaders.lora_pipeline import AmusedLoraLoaderMixin  # the deprecated AmusedPipeline no longer mixes it in


def _noise(*shapes):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(*s, generator=g) for s in shapes]


def _no_zero_weights(model):
    """The model with every all-zero parameter (zero-initialised output layers, adaLN tables) given small seeded
    values, so that a LoRA anywhere moves the output; then ``eval()``."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model.eval()


def tiny_sana(seed: int = 0) -> SanaTransformer2DModel:  # tests/lora/test_lora_layers_sana.py, Sprint's guidance
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=32,
        qk_norm="rms_norm_across_heads", guidance_embeds=True,
    )  # fmt: skip
    return _no_zero_weights(model)


def sana_output(model) -> torch.Tensor:
    x, text = _noise((1, 4, 8, 8), (1, 5, 8))
    with torch.no_grad():
        return model(x, text, torch.tensor([500.0]), guidance=torch.tensor([4.5]), return_dict=False)[0]


def tiny_sana_video(seed: int = 0) -> SanaVideoTransformer3DModel:  # tests/pipelines/sana_video
    torch.manual_seed(seed)
    model = SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2, num_cross_attention_heads=2,
        cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=8, mlp_ratio=2.5, dropout=0.0, attention_bias=False,
        sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip
    return _no_zero_weights(model)


def sana_video_output(model) -> torch.Tensor:
    x, text = _noise((1, 16, 2, 8, 8), (1, 5, 8))
    with torch.no_grad():
        return model(x, text, torch.tensor([500.0]), return_dict=False)[0]


def tiny_cogview4(seed: int = 0) -> CogView4Transformer2DModel:  # tests/lora/test_lora_layers_cogview4.py
    torch.manual_seed(seed)
    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4,
    )  # fmt: skip
    return _no_zero_weights(model)


def cogview4_output(model) -> torch.Tensor:
    x, text = _noise((1, 4, 8, 8), (1, 6, 32))
    size = torch.tensor([[32.0, 32.0]])
    with torch.no_grad():
        return model(x, text, torch.tensor([500]), size, size, torch.zeros(1, 2), return_dict=False)[0]


def tiny_auraflow(seed: int = 0) -> AuraFlowTransformer2DModel:  # tests/lora/test_lora_layers_auraflow.py
    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(
        sample_size=64, patch_size=1, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pos_embed_max_size=64,
    )  # fmt: skip
    return _no_zero_weights(model)


def auraflow_output(model) -> torch.Tensor:
    x, text = _noise((1, 4, 8, 8), (1, 6, 32))
    with torch.no_grad():
        return model(x, text, torch.tensor([0.5]), return_dict=False)[0]


def tiny_kandinsky5(seed: int = 0) -> Kandinsky5Transformer3DModel:  # tests/pipelines/kandinsky5/test_kandinsky5_t2i.py
    torch.manual_seed(seed)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=32, in_text_dim2=32, time_dim=16, out_visual_dim=16, patch_size=(1, 2, 2), model_dim=16,
        ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(1, 1, 2), visual_cond=False, attention_type="regular",
    )  # fmt: skip
    return _no_zero_weights(model)


def kandinsky5_output(model) -> torch.Tensor:
    x, text, pooled = _noise((1, 1, 8, 8, 16), (1, 5, 32), (1, 32))
    rope = [torch.arange(1), torch.arange(4), torch.arange(4)]
    with torch.no_grad():
        return model(x, text, torch.tensor([0.5]), pooled, rope, torch.arange(5), return_dict=False)[0]


def tiny_ernie_image(seed: int = 0) -> ErnieImageTransformer2DModel:  # diffusers' tests have no sizes: the smallest that runs
    torch.manual_seed(seed)
    model = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=48, in_channels=4, out_channels=4, patch_size=1,
        text_in_dim=24, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    return _no_zero_weights(model)


def ernie_image_output(model) -> torch.Tensor:
    x, text = _noise((1, 4, 4, 4), (1, 5, 24))
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, torch.tensor([5]), return_dict=False)[0]


def tiny_cosmos(seed: int = 0) -> CosmosTransformer3DModel:  # tests/pipelines/cosmos/test_cosmos2_5_predict.py
    torch.manual_seed(seed)
    model = CosmosTransformer3DModel(
        in_channels=16 + 1, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",  # True needs torchvision (resizes the mask)
    )  # fmt: skip
    return _no_zero_weights(model)


def cosmos_output(model) -> torch.Tensor:
    x, text = _noise((1, 16, 2, 8, 8), (1, 5, 32))
    with torch.no_grad():
        return model(x, torch.tensor([0.5]), text, condition_mask=torch.zeros(1, 1, 2, 8, 8), return_dict=False)[0]


def tiny_bria_fibo2(seed: int = 0) -> BriaFibo2Transformer2DModel:  # the smallest that runs
    torch.manual_seed(seed)
    model = BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24, injection_layer_ids=(1,),
        perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4,
        gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32),
    )  # fmt: skip
    return _no_zero_weights(model)


def bria_fibo2_output(model) -> torch.Tensor:
    x, text = _noise((1, 4, 8, 8), (1, 2, 6, 24))  # the Perceiver's bundle, then one per injection block
    with torch.no_grad():
        return model(x, torch.tensor([0.5]), text, return_dict=False)[0]


MAKERS = {
    "sana": (tiny_sana, sana_output, SanaPipeline),
    "sana-video": (tiny_sana_video, sana_video_output, SanaVideoPipeline),
    "cogview4": (tiny_cogview4, cogview4_output, CogView4Pipeline),
    "auraflow": (tiny_auraflow, auraflow_output, AuraFlowPipeline),
    "kandinsky5": (tiny_kandinsky5, kandinsky5_output, Kandinsky5T2IPipeline),
    "ernie-image": (tiny_ernie_image, ernie_image_output, ErnieImagePipeline),
    "cosmos": (tiny_cosmos, cosmos_output, Cosmos2_5_PredictBasePipeline),
    "bria-fibo2": (tiny_bria_fibo2, bria_fibo2_output, BriaFibo2Pipeline),
}


def tiny_amused(seed: int = 0) -> UVit2DModel:  # diffusers' old tests/pipelines/amused sizes
    torch.manual_seed(seed)
    model = UVit2DModel(
        hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
        encoder_hidden_size=8, vocab_size=32, codebook_size=8, in_channels=8, block_out_channels=8, num_res_blocks=1,
        downsample=True, upsample=True, block_num_heads=1, num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0,
        intermediate_size=8, layer_norm_eps=1e-06, ln_elementwise_affine=True,
    )  # fmt: skip
    return _no_zero_weights(model)


def amused_output(model) -> torch.Tensor:
    text, pooled = _noise((1, 5, 8), (1, 8))
    ids = torch.randint(0, 8, (1, 4, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids, text, pooled, torch.tensor([[4.0, 4.0, 0.0, 0.0, 6.0]]))


MAKERS["amused"] = (tiny_amused, amused_output, AmusedLoraLoaderMixin)


def tiny_rfd4_proteina(seed: int = 0) -> RFD4ProteinaTransformer:  # diffusers' tests have no sizes: small, few features
    torch.manual_seed(seed)
    model = RFD4ProteinaTransformer(
        nlayers=2, token_dim=16, nheads=2, dim_cond=8, pair_repr_dim=8, latent_dim=4, token_type_emb_dim=4, cath_emb_dim=4,
        t_emb_dim=8, seq_sep_dim=4, xt_pair_dist_dim=4, feats_seq=("xt_bb_ca", "xt_local_latents"),
        feats_cond_seq=("time_emb_bb_ca",), feats_pair_repr=("xt_bb_ca_pair_dists",), feats_pair_cond=("time_emb_bb_ca",),
        tri_mult_c=8, num_sequence_classes=5,
    )  # fmt: skip
    return _no_zero_weights(model)


def rfd4_proteina_output(model) -> torch.Tensor:
    """Every output (velocities, sequence and insertion logits), flattened into one tensor."""
    coords, latents = _noise((1, 6, 3), (1, 6, 4))
    flags = {"is_in_context_conditioning": torch.zeros(1, 6), "supports_local_latent": torch.ones(1, 6)}
    with torch.no_grad():
        out = model(coords, latents, torch.tensor([0.5]), torch.tensor([0.5]), torch.ones(1, 6, dtype=torch.bool),
                    conditioning=flags, return_dict=False)  # fmt: skip
    return torch.cat([o.flatten() for o in out])


MAKERS["rfd4-proteina"] = (tiny_rfd4_proteina, rfd4_proteina_output, RFD4ProteinaPipeline)
