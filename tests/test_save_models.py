"""Saving adapters of a plain model (not a pipeline), and loading onto config-only (meta) skeletons."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn

import lora_loader


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def loaded(**config) -> nn.Module:
    model = lora_loader.attach(net())
    cfg = lora_loader.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, **config)
    model.add_adapter(cfg, adapter_name="x")
    return model


def test_a_models_diffusers_file_loads_back_into_the_same_model(tmp_path):
    model = loaded()
    x = torch.randn(5, 4)
    want = model(x)
    path = model.save_lora_weights(tmp_path / "x.safetensors", "x", format="diffusers")
    again = lora_loader.attach(net())
    again.load_lora_weights(path, adapter_name="x")
    torch.testing.assert_close(again(x), want, rtol=0, atol=1e-6)


def test_an_rslora_adapter_keeps_its_strength_in_kohya_layout(tmp_path):
    """Kohya's scale is alpha / r; rsLoRA's is alpha / sqrt(r), so the file must carry alpha * sqrt(r)."""
    model = loaded(use_rslora=True)
    x = torch.randn(5, 4)
    want = model(x)
    path = model.save_lora_weights(tmp_path / "rs.safetensors", "x", format="kohya")
    again = lora_loader.attach(net())
    again.load_lora_weights(path, adapter_name="x")
    assert again[0].lora_adapters["x"].scale == 8 / 4**0.5
    torch.testing.assert_close(again(x), want, rtol=0, atol=1e-6)


def test_loading_onto_a_meta_skeleton_keeps_the_files_values_for_saving(tmp_path):
    sd = {"0.lora_A.weight": torch.arange(8.0).reshape(2, 4), "0.lora_B.weight": torch.ones(6, 2)}
    with init_empty_weights():
        skeleton = net()
    skeleton = lora_loader.attach(skeleton)
    skeleton.load_lora_weights(sd, adapter_name="x")
    assert skeleton[0].lora_adapters["x"].down.device.type == "cpu"
    from safetensors.torch import load_file

    written = load_file(skeleton.save_lora_weights(tmp_path / "m.safetensors", "x", format="diffusers"))
    assert torch.equal(written["0.lora_A.weight"], sd["0.lora_A.weight"])
