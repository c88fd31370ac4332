"""Flux: Kohya / sd-scripts files in Black Forest Labs' naming load into diffusers' Flux transformer.

The reference is peft on the same tiny transformer: a PEFT LoRA on diffusers'
modules (to_q, to_k, to_v, proj_mlp, ...) gives the expected output. The Kohya
file is the same adapter written as sd-scripts writes it for BFL's fused
modules: ``img_attn_qkv`` / ``txt_attn_qkv`` / ``linear1`` hold one LoRA whose
``A`` stacks the parts' ``A`` and whose ``B`` is block-diagonal (its product is
exactly the parts' products stacked by rows), the final layer's modulation
rows in BFL's (shift, scale) order, and alpha scaled with the stacked rank.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

import lora_loader
from lora_loader import LoraError

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0

# BFL name -> the diffusers modules it fuses (one entry: a plain rename), per block index.
DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"], "modulation_lin": ["norm.linear"]}
GLOBAL = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "guidance_in_out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer_linear": ["proj_out"],
    "final_layer_adaLN_modulation_1": ["norm_out.linear"],
}


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()  # fmt: skip


def inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3),
    )  # fmt: skip


def bfl_modules() -> dict[str, list[str]]:
    table = {}
    for i in range(2):
        table.update({f"double_blocks_{i}_{k}": [f"transformer_blocks.{i}.{p}" for p in v] for k, v in DOUBLE.items()})
        table.update({f"single_blocks_{i}_{k}": [f"single_transformer_blocks.{i}.{p}" for p in v] for k, v in SINGLE.items()})
    table.update(GLOBAL)
    return table


def peft_factors(model, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for parts in bfl_modules().values():
        for path in parts:
            layer = modules[path]
            out[path] = (torch.randn(RANK, layer.in_features, generator=g) * 0.3, torch.randn(layer.out_features, RANK, generator=g) * 0.3)
    return out


def peft_output(factors) -> torch.Tensor:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model = tiny_flux()
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(factors)), model)
    sd = {f"{p}.lora_A.weight": a for p, (a, _) in factors.items()} | {f"{p}.lora_B.weight": b for p, (_, b) in factors.items()}
    result = set_peft_model_state_dict(model, sd)
    assert not result.unexpected_keys
    with torch.no_grad():
        return model(**inputs()).sample


def kohya_flux_file(factors, path) -> str:
    """The adapter in sd-scripts' Flux naming: fused modules stack A and block-diagonalise B."""
    sd = {}
    for name, parts in bfl_modules().items():
        downs = [factors[p][0] for p in parts]
        ups = [factors[p][1] for p in parts]
        down, up = torch.cat(downs), torch.block_diag(*ups)
        if name == "final_layer_adaLN_modulation_1":  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = up.chunk(2)
            up = torch.cat([shift, scale])
        sd[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
        sd[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(ALPHA * len(parts))  # the same alpha / rank
    save_file(sd, str(path))
    return str(path)


def test_a_kohya_flux_file_gives_the_output_of_the_same_lora_in_peft(tmp_path):
    factors = peft_factors(tiny_flux(), seed=1)
    expected = peft_output(factors)
    path = kohya_flux_file(factors, tmp_path / "flux_kohya.safetensors")
    model = lora_loader.attach(tiny_flux())
    with torch.no_grad():
        base = model(**inputs()).sample
    model.load_lora_weights(path, adapter_name="k")
    with torch.no_grad():
        got = model(**inputs()).sample
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.disable_lora()
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, base)


def test_a_fused_projection_shares_one_a_between_its_parts(tmp_path):
    factors = peft_factors(tiny_flux(), seed=1)
    path = kohya_flux_file(factors, tmp_path / "flux_kohya.safetensors")
    model = lora_loader.attach(tiny_flux())
    model.load_lora_weights(path, adapter_name="k")
    attn = model.single_transformer_blocks[0].attn
    pointers = {m.lora_adapters["k"].down.data_ptr() for m in (attn.to_q, attn.to_k, attn.to_v, model.single_transformer_blocks[0].proj_mlp)}
    assert len(pointers) == 1


def test_a_fused_up_that_does_not_split_is_refused_by_key(tmp_path):
    factors = peft_factors(tiny_flux(), seed=1)
    path = kohya_flux_file(factors, tmp_path / "flux_kohya.safetensors")
    from safetensors.torch import load_file

    sd = load_file(path)
    key = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    sd[key] = sd[key][:-1]
    model = lora_loader.attach(tiny_flux())
    with pytest.raises(LoraError, match="double_blocks_0_img_attn_qkv"):
        model.load_lora_weights(sd, adapter_name="k")
    assert not any(hasattr(m, "lora_adapters") for m in model.modules())


def lycoris_flux_file() -> tuple[dict, dict]:
    """LyCORIS kinds on fused and reordered Flux rows, and the dense change each diffusers weight must get.

    The dense products come from lycoris-lora's own functional ``diff_weight`` (the scale
    alpha / rank applied once), so lora_loader's rebuild is not its own reference.
    """
    from lycoris.functional import loha, lokr

    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd, changes = {}, {}
    # LoHa on the image qkv of double block 0: rows [q | k | v].
    w = {"hada_w1_a": rand(96, 2), "hada_w1_b": rand(2, 32), "hada_w2_a": rand(96, 2), "hada_w2_b": rand(2, 32)}
    sd |= {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in w.items()}
    sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(1.0)
    d = loha.diff_weight(w["hada_w1_b"], w["hada_w1_a"], w["hada_w2_b"], w["hada_w2_a"], None, None, gamma=1.0) * 0.5
    for part, rows in zip(("to_q", "to_k", "to_v"), d.chunk(3)):
        changes[f"transformer_blocks.0.attn.{part}.weight"] = rows
    # LoKr on single block 0's linear1: rows [q | k | v | mlp] = [32, 32, 32, 128]; the kron's 28-row
    # tiles do not line up with the parts' boundaries.
    w = {"lokr_w1": rand(8, 4), "lokr_w2_a": rand(28, 2), "lokr_w2_b": rand(2, 8)}
    sd |= {f"lora_unet_single_blocks_0_linear1.{k}": v for k, v in w.items()}
    sd["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(3.0)
    # functional.lokr takes gamma = alpha and divides by the rank itself: alpha 3 / rank 2.
    d = lokr.diff_weight(w["lokr_w1"], None, None, None, w["lokr_w2_a"], w["lokr_w2_b"], None, gamma=3.0)
    for part, rows in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), d.split([32, 32, 32, 128])):
        changes[f"single_transformer_blocks.0.{part}.weight"] = rows
    # A full diff (weight and bias) on the text qkv of double block 1.
    diff, diff_b = rand(96, 32), rand(96)
    sd["lora_unet_double_blocks_1_txt_attn_qkv.diff"], sd["lora_unet_double_blocks_1_txt_attn_qkv.diff_b"] = diff, diff_b
    for part, rows, bias in zip(("add_q_proj", "add_k_proj", "add_v_proj"), diff.chunk(3), diff_b.chunk(3)):
        changes[f"transformer_blocks.1.attn.{part}.weight"] = rows
        changes[f"transformer_blocks.1.attn.{part}.bias"] = bias
    # LoHa on the final modulation: BFL's rows are (shift, scale), diffusers' (scale, shift).
    w = {"hada_w1_a": rand(64, 2), "hada_w1_b": rand(2, 32), "hada_w2_a": rand(64, 2), "hada_w2_b": rand(2, 32)}
    sd |= {f"lora_unet_final_layer_adaLN_modulation_1.{k}": v for k, v in w.items()}
    d = loha.diff_weight(w["hada_w1_b"], w["hada_w1_a"], w["hada_w2_b"], w["hada_w2_a"], None, None, gamma=1.0)
    shift, scale = d.chunk(2)
    changes["norm_out.linear.weight"] = torch.cat([scale, shift])
    return sd, changes


def patched_output(changes: dict, weight: float = 1.0) -> torch.Tensor:
    model = tiny_flux()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, change in changes.items():
            params[name].add_(weight * change)
        return model(**inputs()).sample


def test_lycoris_kinds_on_fused_and_reordered_flux_rows_match_lycoris_dense_weights(tmp_path):
    sd, changes = lycoris_flux_file()
    model = lora_loader.attach(tiny_flux())
    with torch.no_grad():
        base = model(**inputs()).sample
    model.load_lora_weights(sd, adapter_name="ly")
    expected = patched_output(changes)
    assert (expected - base).abs().max() > 1e-2

    def out():
        with torch.no_grad():
            return model(**inputs()).sample

    torch.testing.assert_close(out(), expected, rtol=1e-4, atol=1e-4)
    model.set_adapters("ly", 0.5)
    torch.testing.assert_close(out(), patched_output(changes, 0.5), rtol=1e-4, atol=1e-4)
    model.set_adapters("ly", 1.0)
    model.disable_lora()
    assert torch.equal(out(), base)
    model.enable_lora()
    model.fuse_lora()
    torch.testing.assert_close(out(), expected, rtol=1e-4, atol=1e-4)
    model.unfuse_lora()
    torch.testing.assert_close(out(), expected, rtol=1e-4, atol=1e-4)
    model.disable_lora()
    assert torch.equal(out(), base), "unfuse gives the base weights back exactly"
    model.enable_lora()
    path = model.save_lora_weights(tmp_path / "ly.safetensors", "ly", format="kohya")
    again = lora_loader.attach(tiny_flux())
    again.load_lora_weights(path, adapter_name="ly")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).sample, out(), rtol=0, atol=1e-6)
    model.unload_lora_weights()
    assert torch.equal(out(), base)


def test_the_parts_of_a_fused_lycoris_module_share_its_factors():
    sd, _ = lycoris_flux_file()
    model = lora_loader.attach(tiny_flux())
    model.load_lora_weights(sd, adapter_name="ly")
    block = model.single_transformer_blocks[0]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    assert [tuple(m.lora_adapters["ly"].dense(torch.float32).shape) for m in parts] == [(32, 32)] * 3 + [(128, 32)]


def test_a_fused_lycoris_module_whose_rows_do_not_split_is_refused_by_key():
    model = lora_loader.attach(tiny_flux())
    g = torch.Generator().manual_seed(0)
    sd = {f"lora_unet_double_blocks_0_img_attn_qkv.hada_{w}": torch.randn(*s, generator=g) for w, s in
          (("w1_a", (95, 2)), ("w1_b", (2, 32)), ("w2_a", (95, 2)), ("w2_b", (2, 32)))}  # fmt: skip
    with pytest.raises(LoraError, match="lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a"):
        model.load_lora_weights(sd, adapter_name="k")
    assert not any(hasattr(m, "lora_adapters") for m in model.modules())
