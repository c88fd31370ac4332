"""Hotswap: load_lora_weights(..., hotswap=True) replaces a loaded adapter in place, and a
torch.compile'd model does not recompile (counted with torch._dynamo's own counters)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from tiny import tiny_sd_pipeline, unet_inputs

import lora_loader
from lora_loader import LoraError

TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
    "down_blocks.0.resnets.0.conv1",
)


def kohya(unet, seed: int, rank: int, alpha: float, targets=TARGETS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in targets:
        out_f, in_f, *kernel = unet.get_submodule(path).weight.shape
        key = "lora_unet_" + path.replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.randn(rank, in_f, *kernel, generator=g) * 0.2
        sd[key + ".lora_up.weight"] = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g) * 0.2
        sd[key + ".alpha"] = torch.tensor(alpha)
    return sd


@torch.no_grad()
def test_ten_swaps_of_different_ranks_alphas_and_layer_subsets_never_recompile_and_match_a_fresh_load():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya(pipe.unet, 0, rank=4, alpha=4.0), adapter_name="x")
    lora_loader.prepare_hotswap(pipe, max_rank=8)
    inputs = unet_inputs(pipe)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(pipe.unet, backend="eager")
    compiled(**inputs)
    frames_after_compile = counters["frames"]["total"]
    graphs_after_compile = counters["stats"]["unique_graphs"]
    assert frames_after_compile > 0 and graphs_after_compile > 0
    for i in range(10):
        rank, alpha = (2, 4, 8)[i % 3], float(i + 1)
        targets = TARGETS if i % 2 == 0 else TARGETS[:2]  # a subset of the first adapter's layers
        sd = kohya(pipe.unet, i + 1, rank, alpha, targets)
        pipe.load_lora_weights(sd, adapter_name="x", hotswap=True)
        got = compiled(**inputs).sample
        fresh = lora_loader.attach(tiny_sd_pipeline(0))
        fresh.load_lora_weights(sd, adapter_name="x")
        torch.testing.assert_close(got, fresh.unet(**inputs).sample, atol=1e-5, rtol=1e-5)
    assert counters["frames"]["total"] == frames_after_compile, "a swap made dynamo compile again"
    assert counters["stats"]["unique_graphs"] == graphs_after_compile
    torch._dynamo.reset()


def test_a_swap_that_does_not_fit_changes_nothing():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya(pipe.unet, 0, rank=4, alpha=4.0, targets=TARGETS[:2]), adapter_name="x")
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(**inputs).sample
    with pytest.raises(LoraError, match="does not"):  # a layer the loaded adapter does not have
        pipe.load_lora_weights(kohya(pipe.unet, 1, 4, 1.0), adapter_name="x", hotswap=True)
    with pytest.raises(LoraError, match="prepare_hotswap"):  # rank above what was allocated
        pipe.load_lora_weights(kohya(pipe.unet, 1, 8, 1.0, TARGETS[:2]), adapter_name="x", hotswap=True)
    with pytest.raises(LoraError, match="not loaded"):
        pipe.load_lora_weights(kohya(pipe.unet, 1, 4, 1.0, TARGETS[:2]), adapter_name="y", hotswap=True)
    with torch.no_grad():
        assert torch.equal(pipe.unet(**inputs).sample, before)


def test_a_swapped_adapter_saves_as_the_new_file(tmp_path):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya(pipe.unet, 0, rank=4, alpha=4.0), adapter_name="x")
    lora_loader.prepare_hotswap(pipe, max_rank=8)
    new = kohya(pipe.unet, 5, rank=2, alpha=3.0)
    pipe.load_lora_weights(new, adapter_name="x", hotswap=True)
    from safetensors.torch import load_file

    written = load_file(pipe.save_lora_weights(tmp_path / "x.safetensors", "x", format="kohya"))
    assert sorted(written) == sorted(new)
    assert all(torch.equal(written[k], new[k].float()) for k in new)
