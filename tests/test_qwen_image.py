"""Qwen-Image (Image, Edit, Edit-Plus, Layered, 2.1: ``QwenImageTransformer2DModel``): every layout its LoRAs come in.

Qwen-Image's checkpoint uses diffusers' module names, so producers differ only in prefix and suffix spelling. One
rank-4 LoRA on every linear kind of the transformer (joint attention, both streams' modulations and MLPs, the input,
output and time embedders) is written as diffusers (``save_lora_weights``, alpha in the header), ComfyUI
(``diffusion_model.`` + ``lora_down`` / ``lora_up`` + ``.alpha``), ai-toolkit (``diffusion_model.`` + lora_A / lora_B),
musubi-tuner (``lora_unet_transformer_blocks_0_attn_to_q``), DiffSynth (``.lora_A.default.weight``), the Lightning
LoRAs (bare dotted paths with ``lora_down`` / ``lora_up`` / ``.alpha``), OneTrainer (``lora_transformer_``) write it.
Each is compared with a merge of the file's own tensors into the weights computed here, and with diffusers+peft
loading the same file through ``QwenImageLoraLoaderMixin.lora_state_dict`` wherever that reads it.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import QwenImagePipeline
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, independent_merge, kohya_resolver, qwen_output, random_pairs, spell, tiny_qwen
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_BLOCK = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
          "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
          "txt_mlp.net.2"]  # fmt: skip
TARGETS = [f"transformer_blocks.{i}.{m}" for i in (0, 1) for m in _BLOCK] + [
    "img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2"]  # fmt: skip


def pairs(seed: int = 1) -> dict:
    return random_pairs(tiny_qwen(0), {p: p for p in TARGETS}, seed)


def write(layout: str, lora: dict, directory) -> str:
    directory = os.fspath(directory)
    if layout == "diffusers":
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in lora.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in lora.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(lora))
        return save_diffusers_lora(directory, QwenImagePipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    writers = {
        "comfyui": lambda: spell(lora, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "ai-toolkit": lambda: spell(lora, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "musubi": lambda: spell(lora, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "diffsynth": lambda: spell(lora, lambda p: p, ".lora_A.default.weight", ".lora_B.default.weight", None),
        "lightning": lambda: spell(lora, lambda p: p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "peft-with-alpha": lambda: spell(lora, lambda p: p, ".lora_A.weight", ".lora_B.weight", ALPHA),
        "onetrainer": lambda: spell(lora, lambda p: "lora_transformer_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
    }
    return save_state_dict(writers[layout](), os.path.join(directory, f"{layout}.safetensors"))


# layout -> (lora_loader's format, whether diffusers' Qwen-Image loader reads it)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "comfyui": ("comfyui", True),
    "ai-toolkit": ("comfyui", True),
    "musubi": ("kohya", True),
    "diffsynth": ("diffusers", True),
    "lightning": ("diffusers", True),  # was "not a LoRA file" (issue 20)
    "peft-with-alpha": ("diffusers", True),
    "onetrainer": ("kohya", False),
}
RESOLVE = kohya_resolver(tiny_qwen(0))


def read(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def expected(path: str, layout: str) -> torch.Tensor:
    scale = (lambda stem, rank: ALPHA / RANK) if layout == "diffusers" else None
    return independent_merge(tiny_qwen, qwen_output, read(path), RESOLVE, scale)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    lora = pairs()
    return {layout: write(layout, lora, directory) for layout in LAYOUTS}, qwen_output(tiny_qwen(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_reads = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_reads:
        theirs, _ = diffusers_output(QwenImagePipeline, tiny_qwen, qwen_output, paths[layout] if layout == "diffusers" else read(paths[layout]))
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_qwen(0))
    report = model.load_lora_weights(paths[layout], adapter_name="q")
    assert report.format == fmt and not report.skipped
    assert_close(qwen_output(model), want, base)
    assert detect_family(convert(read(paths[layout])).deltas)[0] == "qwen-image"


@pytest.mark.parametrize("layout", ["musubi", "lightning", "diffsynth"])
def test_lora_loader_inspect_names_qwen_image(layout, files, capsys):
    from lora_loader.cli import main

    assert main(["inspect", files[0][layout], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "qwen-image"


def test_an_attention_only_file_is_qwen_image_by_its_depth_and_flux_below_it():
    """Qwen-Image's joint blocks share Flux's double blocks' names and width (3072); Flux.1 has 19 of them."""
    def deltas(block):
        return {("transformer", f"transformer_blocks.{block}.attn.{m}"): SimpleNamespace(down=torch.zeros(4, 3072))
                for m in ("to_q", "to_k", "add_q_proj")}  # fmt: skip

    assert detect_family(deltas(40))[0] == "qwen-image" and detect_family(deltas(3))[0] == "flux"
    assert detect_family({}, {"ss_base_model_version": "qwen_image"})[0] == "qwen-image"


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(files):
    paths, base = files
    other = read(write("comfyui", pairs(seed=2), os.path.join(os.path.dirname(paths["musubi"]), "..")))
    _, theirs = diffusers_output(QwenImagePipeline, tiny_qwen, qwen_output, read(paths["lightning"]), adapter="a")
    theirs.load_lora_adapter(QwenImagePipeline.lora_state_dict(dict(other)), prefix="transformer", adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_qwen(0))
    mine.load_lora_weights(paths["lightning"], adapter_name="a")
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(qwen_output(mine), qwen_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_qwen(0)), paths["musubi"], qwen_output, base)


def test_a_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = read(files[0]["lightning"])
    extra = ["transformer_blocks.5.attn.to_q.lora_down.weight", "transformer_blocks.5.attn.to_q.lora_up.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 48), torch.ones(48, RANK)
    model = lora_loader.attach(tiny_qwen(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, r"transformer_blocks\.5\.attn\.to_q\.lora_down\.weight", qwen_output, expected(files[0]["lightning"], "lightning"), files[1])


@pytest.mark.parametrize("producer", ["ai-toolkit", "lycoris", "dotted"])
def test_lokr_gives_the_merge_of_its_factors_and_is_named_qwen_image(producer):
    """ai-toolkit's LoKr (``diffusion_model.<path>.lokr_w1`` ...), LyCORIS' wrapper (``lycoris_<mangled path>``), and
    the factors on bare dotted paths: rank 2, alpha 1. diffusers' Qwen-Image loader refuses LoKr keys."""
    prefix, mangle = {"ai-toolkit": ("diffusion_model.", False), "lycoris": ("lycoris_", True), "dotted": ("", False)}[producer]
    g = torch.Generator().manual_seed(4)
    tensors = {}
    modules = dict(tiny_qwen(0).named_modules())
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.img_mod.1"):
        rows, cols = modules[path].weight.shape
        stem = prefix + (path.replace(".", "_") if mangle else path)
        tensors |= {f"{stem}.lokr_w1": torch.randn(4, 4, generator=g) * 0.3, f"{stem}.lokr_w2_a": torch.randn(rows // 4, 2, generator=g) * 0.3,
                    f"{stem}.lokr_w2_b": torch.randn(2, cols // 4, generator=g) * 0.3, f"{stem}.alpha": torch.tensor(1.0)}  # fmt: skip
    want = independent_merge(tiny_qwen, qwen_output, tensors, RESOLVE)
    model = lora_loader.attach(tiny_qwen(0))
    model.load_lora_weights(tensors, adapter_name="k")
    assert_close(qwen_output(model), want, qwen_output(tiny_qwen(0)))
    assert detect_family(convert(tensors).deltas)[0] == "qwen-image"
