"""``save_lora_weights(format="kohya")`` on a DiT writes its original checkpoint names, as its trainers do.

The oracles: a file written as sd-scripts writes it comes back tensor for tensor (the loader
split its fused projections; the writer joins them again), and parts trained apart (a PEFT
file) are joined into the products sd-scripts' own layout for them has (stacked ``lora_down``,
block-diagonal ``lora_up``, built here by `test_flux.kohya_flux_file`). (diffusers' Kohya Flux
converter hard-codes FLUX.1-dev's widths, so it cannot read a tiny model's file.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_flux import ALPHA, RANK, inputs, kohya_flux_file, lycoris_flux_file, peft_factors, tiny_flux

import lora_loader
from lora_loader import LoraError
from lora_loader.delta import LoraDelta
from lora_loader.formats.original_names import FLUX, to_original


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).sample


def test_an_sd_scripts_flux_file_is_written_back_as_it_was_read(tmp_path):
    source = load_file(kohya_flux_file(peft_factors(tiny_flux(), seed=1), tmp_path / "src.safetensors"))
    model = lora_loader.attach(tiny_flux())
    model.load_lora_weights(dict(source), adapter_name="k")
    saved = load_file(model.save_lora_weights(tmp_path / "out.safetensors", "k", format="kohya"))
    assert sorted(saved) == sorted(source)
    for key, tensor in source.items():
        if key.endswith(".alpha"):
            assert abs(float(saved[key]) - float(tensor)) <= 1e-4 * float(tensor), key
        else:
            assert torch.equal(saved[key], tensor), key


def test_lycoris_factors_on_fused_and_swapped_flux_rows_are_written_back_as_they_were_read(tmp_path):
    source, _ = lycoris_flux_file()
    model = lora_loader.attach(tiny_flux())
    model.load_lora_weights(dict(source), adapter_name="ly")
    saved = load_file(model.save_lora_weights(tmp_path / "out.safetensors", "ly", format="kohya"))
    factor_keys = [k for k in source if not k.endswith(".alpha")]
    assert sorted(k for k in saved if not k.endswith(".alpha")) == sorted(factor_keys)
    for key in factor_keys:
        torch.testing.assert_close(saved[key], source[key], rtol=0, atol=1e-6, msg=key)


def dense_products(sd: dict) -> dict[str, torch.Tensor]:
    """Per Kohya module: alpha / rank * up @ down, from the file's tensors alone."""
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[f"{name}.lora_up.weight"].float()
            out[name] = float(sd[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return out


def test_parts_trained_apart_are_joined_into_the_products_sd_scripts_would_write(tmp_path):
    factors = peft_factors(tiny_flux(), seed=2)
    mine = lora_loader.attach(tiny_flux())
    state = {f"transformer.{p}.lora_A.weight": a for p, (a, _) in factors.items()}
    state |= {f"transformer.{p}.lora_B.weight": b for p, (_, b) in factors.items()}
    state_alpha = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    path = tmp_path / "peft.safetensors"
    save_file(state, str(path), metadata=state_alpha)
    mine.load_lora_weights(str(path), adapter_name="d")
    want = output(mine)
    written = load_file(mine.save_lora_weights(tmp_path / "bfl.safetensors", "d", format="kohya"))
    expected = dense_products(load_file(kohya_flux_file(factors, tmp_path / "sd_scripts.safetensors")))
    got = dense_products(written)
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    again = lora_loader.attach(tiny_flux())
    again.load_lora_weights(dict(written), adapter_name="d")
    torch.testing.assert_close(output(again), want, rtol=1e-5, atol=1e-5)


def test_a_fused_part_without_a_lora_gets_zero_rows():
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    parts = {"transformer_blocks.0.attn.to_k": LoraDelta(down, up, 4.0)}
    joined = to_original(FLUX, parts, out_rows=lambda path: 32)["double_blocks_0_img_attn_qkv"]
    dense = joined.up @ joined.down * joined.scale
    assert torch.equal(dense[:32], torch.zeros(32, 32)) and torch.equal(dense[64:], torch.zeros(32, 32))
    torch.testing.assert_close(dense[32:64], up @ down * 2.0)


def test_a_module_the_original_checkpoint_does_not_name_is_refused_by_path():
    parts = {"transformer_blocks.0.attn.norm_q": LoraDelta(torch.randn(2, 16), torch.randn(16, 2))}
    with pytest.raises(LoraError, match=r"transformer_blocks\.0\.attn\.norm_q has no name in Flux's original checkpoint"):
        to_original(FLUX, parts, out_rows=lambda path: 16)


def test_a_sd3_adapter_is_written_in_stabilitys_names_and_loads_back(tmp_path):
    from test_dit_pipelines import assert_close, both, diffusers_file
    from tiny_dit import run

    _, mine = both("sd3")
    base = run(mine)
    mine.load_lora_weights(diffusers_file("sd3", tmp_path), adapter_name="a")
    want = run(mine)
    written = load_file(mine.save_lora_weights(tmp_path / "out.safetensors", "a", format="kohya"))
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in written)
    assert not any(k.startswith("lora_unet_transformer_blocks") for k in written)
    _, again = both("sd3")
    again.load_lora_weights(dict(written), adapter_name="a")
    assert_close(run(again), want, base)


def test_lora_loader_convert_writes_a_flux_file_in_bfl_names_and_back(tmp_path):
    """``lora-loader convert --to kohya --model <Flux folder>``: BFL names, and back to diffusers' layout, to the
    same pipeline outputs."""
    from test_dit_pipelines import assert_close, both, diffusers_file
    from tiny_dit import run, tiny_flux_pipeline

    from lora_loader.cli.convert_cmd import convert_lora

    folder = tmp_path / "flux"
    tiny_flux_pipeline(0).save_pretrained(folder)
    source = diffusers_file("flux", tmp_path)
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"
    convert_lora(source, str(kohya), "kohya", model=str(folder), progress=False)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in load_file(kohya))
    convert_lora(str(kohya), str(back), "diffusers", model=str(folder), progress=False)
    _, pipe = both("flux")
    base = run(pipe)
    pipe.load_lora_weights(source, adapter_name="s")
    want = run(pipe)
    for path in (kohya, back):
        _, again = both("flux")
        again.load_lora_weights(str(path), adapter_name="c")
        assert_close(run(again), want, base)


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_a_fused_file_whose_parts_share_lora_down_saves_in_diffusers_names_too(fmt, tmp_path):
    """Loaded parts of a fused projection share one lora_down tensor; safetensors refuses shared storage, so the
    writer gives each key its own."""
    source = kohya_flux_file(peft_factors(tiny_flux(), seed=1), tmp_path / "src.safetensors")
    model = lora_loader.attach(tiny_flux())
    model.load_lora_weights(source, adapter_name="k")
    want = output(model)
    path = model.save_lora_weights(tmp_path / f"out-{fmt}.safetensors", "k", format=fmt)
    again = lora_loader.attach(tiny_flux())
    again.load_lora_weights(path, adapter_name="k")
    assert torch.equal(output(again), want)


def test_a_wan_adapter_saved_as_kohya_is_musubi_tuners_layout_which_diffusers_reads(tmp_path):
    """Wan in Kohya layout: musubi-tuner's ``lora_unet_blocks_0_self_attn_q`` names, read by diffusers' own
    ``_convert_musubi_wan_lora_to_diffusers`` + peft to the outputs of the adapter it was saved from."""
    from test_wan import T2V_TARGETS, peft_lora
    from tiny_wan import tiny_wan_pipeline, wan_output

    sd, config = peft_lora(T2V_TARGETS, seed=5)
    mine = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    base = wan_output(mine.transformer)
    mine.load_lora_weights({f"transformer.{k}": v for k, v in sd.items()}, adapter_name="w",
                           _adapter_config={"r": config.r, "lora_alpha": config.lora_alpha})
    want = wan_output(mine.transformer)
    path = mine.save_lora_weights(tmp_path / "musubi.safetensors", "w", format="kohya")
    written = load_file(path)
    assert any(k.startswith("lora_unet_blocks_0_self_attn_q.") for k in written)
    assert any(k.startswith("lora_unet_blocks_1_ffn_0.") for k in written)
    assert not any("attn1" in k or "to_q" in k for k in written), "every module in Wan's original names"
    reference = tiny_wan_pipeline(two_experts=False)
    reference.load_lora_weights(path, adapter_name="w")  # diffusers + peft
    got = wan_output(reference.transformer)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
