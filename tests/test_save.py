"""save_lora_weights: each layout round-trips, keeps the real alpha, and loads in diffusers+peft."""

from __future__ import annotations

import json

import pytest
import torch
from producers import sd_scripts_sd15_lora, sd_scripts_sdxl_lora
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import outputs, tiny_sd_pipeline, tiny_sdxl_pipeline

import lora_loader
from lora_loader import LoraError

PIPELINES = {"sd": (tiny_sd_pipeline, sd_scripts_sd15_lora), "sdxl": (tiny_sdxl_pipeline, sd_scripts_sdxl_lora)}


def _file_with_varied_alphas(kind):
    """A sd-scripts file whose alphas differ per module, so a writer that forgets them changes the strength."""
    factory, producer = PIPELINES[kind]
    sd = producer(factory(0), 3)
    for i, key in enumerate(k for k in sorted(sd) if k.endswith(".alpha")):
        sd[key] = torch.tensor([1.0, 3.0, 0.5][i % 3])
    return factory, sd


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_a_saved_adapter_loads_back_with_identical_outputs(kind, fmt, tmp_path):
    factory, sd = _file_with_varied_alphas(kind)
    pipe = lora_loader.attach(factory(0))
    pipe.load_lora_weights(sd, adapter_name="x")
    want = outputs(pipe)
    path = pipe.save_lora_weights(tmp_path, "x", format=fmt)
    again = lora_loader.attach(factory(0))
    report = again.load_lora_weights(path, adapter_name="y")
    assert report.format == fmt
    assert _max_diff(outputs(again), want) == 0.0
    assert _max_diff(want, outputs(factory(0))) > 1e-3


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_kohya_file_carries_the_real_alpha_of_every_module(kind, tmp_path):
    factory, sd = _file_with_varied_alphas(kind)
    pipe = lora_loader.attach(factory(0))
    pipe.load_lora_weights(sd, adapter_name="x")
    written = load_file(pipe.save_lora_weights(tmp_path / "k.safetensors", "x", format="kohya"))
    assert sorted(written) == sorted(sd)  # sd-scripts' own names, SGM blocks for SDXL included
    for key in sd:
        if key.endswith(".alpha"):
            assert float(written[key]) == float(sd[key]), key


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_diffusers_file_loads_in_diffusers_with_the_same_outputs(kind, tmp_path):
    factory, sd = _file_with_varied_alphas(kind)
    pipe = lora_loader.attach(factory(0))
    pipe.load_lora_weights(sd, adapter_name="x")
    path = pipe.save_lora_weights(tmp_path, "x", format="diffusers")
    oracle = factory(0)
    oracle.load_lora_weights(path, adapter_name="x")
    assert _max_diff(outputs(oracle), outputs(pipe)) <= 1e-4


def test_the_header_says_what_wrote_the_file(tmp_path):
    pipe = lora_loader.attach(tiny_sdxl_pipeline(0))
    pipe.load_lora_weights(sd_scripts_sdxl_lora(tiny_sdxl_pipeline(0), 3), adapter_name="x")
    with safe_open(pipe.save_lora_weights(tmp_path, "x"), "pt") as f:
        header = f.metadata()
    assert header["lora_loader.format"] == "diffusers" and header["lora_loader.base_model"] == "sdxl"
    config = json.loads(header["lora_adapter_metadata"])
    assert {"unet.r", "unet.lora_alpha", "text_encoder.r", "text_encoder_2.r"} <= set(config)


def test_save_names_an_adapter_when_several_are_loaded_and_rejects_unknown_formats(tmp_path):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    sd = sd_scripts_sd15_lora(tiny_sd_pipeline(0), 3)
    pipe.load_lora_weights(sd, adapter_name="a")
    pipe.load_lora_weights(sd, adapter_name="b")
    with pytest.raises(LoraError, match="adapter_name"):
        pipe.save_lora_weights(tmp_path)
    with pytest.raises(LoraError, match="format"):
        pipe.save_lora_weights(tmp_path, "a", format="ckpt")


def test_the_peft_file_of_a_unet_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    """The UNet part of a format="peft" file is PEFT's own state dict: peft's set_peft_model_state_dict takes it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from tiny import unet_inputs

    factory, sd = _file_with_varied_alphas("sd")
    sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    pipe = lora_loader.attach(factory(0))
    pipe.load_lora_weights(sd, adapter_name="x")
    path = pipe.save_lora_weights(tmp_path / "p.safetensors", "x", format="peft")
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    written = load_file(path)
    assert all(k.startswith("base_model.model.") for k in written)
    oracle = factory(0).unet
    fields = {k: config[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules")}
    inject_adapter_in_model(LoraConfig(**fields), oracle)
    result = set_peft_model_state_dict(oracle, {k[len("base_model.model."):]: v for k, v in written.items()})
    assert not result.unexpected_keys
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        torch.testing.assert_close(oracle(**inputs).sample, pipe.unet(**inputs).sample, rtol=1e-4, atol=1e-4)
