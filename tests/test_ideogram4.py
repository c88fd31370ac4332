"""Ideogram 4 (``Ideogram4Pipeline``, ``Ideogram4Transformer2DModel``): every layout its LoRAs come in.

One rank-4 LoRA on the original checkpoint's block modules (fused ``attention.qkv``, ``attention.o``,
``feed_forward.w1`` / ``w2`` / ``w3``, ``adaln_modulation``) is written as each producer writes it: diffusers
(``save_lora_weights``: split ``to_q`` / ``to_k`` / ``to_v``, rank and alpha in the header), ai-toolkit
(``diffusion_model.`` + original names, lora_A / lora_B, no alpha; and its LoKr on the fused ``qkv``), Ideogram's
reference trainer (``conditional_transformer.`` + lora_down / lora_up / alpha), ComfyUI (``diffusion_model.`` +
lora_down / lora_up / alpha), Kohya-style (``lora_unet_layers_0_attention_qkv``), bare dotted original names. In
diffusers' names the fused LoRA is the same LoRA: each of q, k, v takes its third of lora_B's rows. Every layout is
compared with a merge of the file's own tensors into the weights computed here (W + alpha / r * B @ A, fused rows cut
in thirds by hand), and with diffusers+peft loading the same file wherever diffusers' Ideogram 4 converter reads it.
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import Ideogram4Pipeline
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, random_pairs, spell
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped, merged_output, read
from tiny_tail_b import ideogram4_output, tiny_ideogram4

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# original name -> the diffusers module whose shape it has (the fused qkv: 3 x 32 rows)
ORIGINAL = {f"layers.{i}.attention.qkv": (96, 32) for i in (0, 1)} | {
    f"layers.{i}.attention.o": f"layers.{i}.attention.to_out.0" for i in (0, 1)} | {
    f"layers.{i}.{m}": f"layers.{i}.{m}" for i in (0, 1) for m in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaln_modulation")}  # fmt: skip
# ai-toolkit with transformer_only: false trains the top-level Linears too (names as diffusers'); diffusers' converter refuses them
TOP_LEVEL = ["input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj", "final_layer.linear",
             "final_layer.adaln_modulation"]  # fmt: skip
_QKV = ("to_q", "to_k", "to_v")


def original_pairs(seed: int = 1, paths=None) -> dict:
    table = ORIGINAL | {p: p for p in TOP_LEVEL}
    return random_pairs(tiny_ideogram4(0), {p: table[p] for p in (paths or ORIGINAL)}, seed)


def diffusers_pairs(pairs: dict) -> dict:
    """The same LoRA on diffusers' modules: q, k, v share lora_A and take their third of lora_B's rows."""
    out = {}
    for path, (a, b) in pairs.items():
        if path.endswith(".attention.qkv"):
            block = path[: -len(".qkv")]
            for i, leaf in enumerate(_QKV):
                out[f"{block}.{leaf}"] = (a.clone(), b[i * 32:(i + 1) * 32].clone())
        else:
            out[path.replace(".attention.o", ".attention.to_out.0")] = (a, b)
    return out


def lokr(pairs: dict, prefix: str) -> dict:
    """ai-toolkit's LoKr: ``<prefix><path>.lokr_w1`` [2, 2], ``lokr_w2_a`` / ``lokr_w2_b`` (rank 4), ``alpha``."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for path, (a, b) in pairs.items():
        out[prefix + path + ".lokr_w1"] = torch.randn(2, 2, generator=g) * 0.3
        out[prefix + path + ".lokr_w2_a"] = torch.randn(b.shape[0] // 2, RANK, generator=g) * 0.3
        out[prefix + path + ".lokr_w2_b"] = torch.randn(RANK, a.shape[1] // 2, generator=g) * 0.3
        out[prefix + path + ".alpha"] = torch.tensor(ALPHA)
    return out


def write(layout: str, pairs: dict, directory) -> str:
    d = diffusers_pairs(pairs)
    if layout == "diffusers":
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in d.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in d.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(d))
        return save_diffusers_lora(os.fspath(directory), Ideogram4Pipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    writers = {
        "ai-toolkit": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "ai-toolkit-lokr": lambda: lokr(pairs, "diffusion_model."),
        "reference": lambda: spell(pairs, lambda p: "conditional_transformer." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "comfyui": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "kohya": lambda: spell(pairs, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "dotted-original": lambda: spell(pairs, lambda p: p, ".lora_A.weight", ".lora_B.weight", None),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"{layout}.safetensors"))


# layout -> (lora_loader's format, whether diffusers' Ideogram 4 converter + peft reads it)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "ai-toolkit": ("comfyui", True),
    "ai-toolkit-lokr": ("comfyui", False),  # diffusers' Ideogram 4 converter reads lora_A / lora_down only
    "reference": ("diffusers", True),
    "comfyui": ("comfyui", True),
    "kohya": ("kohya", False),  # no lora_unet_ handling in diffusers' converter
    "dotted-original": ("diffusers", True),
}


def resolve(stem: str):
    """File stem -> [(diffusers path, rows)], from this file's tables (no lora_loader): a fused qkv's thirds by hand."""
    for prefix in ("diffusion_model.", "conditional_transformer.", "transformer.", "lora_unet_"):
        stem = stem.removeprefix(prefix)
    by_mangled = {p.replace(".", "_"): p for p in list(ORIGINAL) + TOP_LEVEL}
    by_mangled |= {f"layers_{i}_attention_{leaf}": f"layers.{i}.attention.{leaf}" for i in (0, 1) for leaf in _QKV + ("to_out_0",)}
    path = by_mangled[stem.replace(".", "_")]
    if path.endswith(".attention.qkv"):
        block = path[: -len(".qkv")]
        return [(f"{block}.{leaf}", slice(i * 32, (i + 1) * 32)) for i, leaf in enumerate(_QKV)]
    return [(path.replace(".attention.o", ".attention.to_out.0").replace("to_out_0", "to_out.0"), slice(None))]


def expected(path: str, layout: str, weight: float = 1.0) -> torch.Tensor:
    return merged_output(tiny_ideogram4, ideogram4_output, resolve, path, layout == "diffusers", weight)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ideogram4")
    pairs = original_pairs()
    return {layout: write(layout, pairs, directory) for layout in LAYOUTS}, ideogram4_output(tiny_ideogram4(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_reads = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_reads:
        source = paths[layout] if layout == "diffusers" else read(paths[layout])[0]
        theirs, _ = diffusers_output(Ideogram4Pipeline, tiny_ideogram4, ideogram4_output, source)
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_ideogram4(0))
    report = model.load_lora_weights(paths[layout], adapter_name="i")
    assert report.format == fmt and not report.skipped
    assert_close(ideogram4_output(model), want, base)
    tensors, metadata = read(paths[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "ideogram4"


@pytest.mark.parametrize("layout", ["ai-toolkit", "kohya", "diffusers"])
def test_lora_loader_inspect_names_ideogram4(layout, files, capsys):
    import json

    from lora_loader.cli import main

    assert main(["inspect", files[0][layout], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "ideogram4"


@pytest.mark.parametrize("layout", ["ai-toolkit", "kohya"])
def test_ai_toolkits_top_level_modules_load_where_diffusers_refuses_them(layout, tmp_path):
    """ai-toolkit with ``transformer_only: false`` trains every Linear (names as diffusers'); diffusers' converter
    raises on the top-level ones."""
    path = write(layout, original_pairs(5, ["layers.0.attention.qkv", "layers.0.adaln_modulation", *TOP_LEVEL]), tmp_path)
    if layout == "ai-toolkit":
        with pytest.raises(ValueError, match="unsupported Ideogram4 LoRA layout"):
            Ideogram4Pipeline.lora_state_dict(read(path)[0])
    model = lora_loader.attach(tiny_ideogram4(0))
    report = model.load_lora_weights(path, adapter_name="top")
    assert not report.skipped
    assert_close(ideogram4_output(model), expected(path, layout), ideogram4_output(tiny_ideogram4(0)))


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(files, tmp_path):
    paths, base = files
    other = write("reference", original_pairs(seed=2), tmp_path)
    _, theirs = diffusers_output(Ideogram4Pipeline, tiny_ideogram4, ideogram4_output, read(paths["ai-toolkit"])[0], adapter="a")
    theirs.load_lora_adapter(Ideogram4Pipeline.lora_state_dict(read(other)[0]), prefix="transformer", adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_ideogram4(0))
    mine.load_lora_weights(paths["ai-toolkit"], adapter_name="a")
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(ideogram4_output(mine), ideogram4_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_ideogram4(0)), paths["comfyui"], ideogram4_output, base)


def test_a_file_with_layers_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = dict(read(files[0]["ai-toolkit"])[0])
    extra = ["diffusion_model.layers.5.attention.qkv.lora_A.weight", "diffusion_model.layers.5.attention.qkv.lora_B.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 32), torch.ones(96, RANK)
    model = lora_loader.attach(tiny_ideogram4(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, "layers.5.attention.qkv", ideogram4_output, expected(files[0]["ai-toolkit"], "ai-toolkit"), files[1])


def test_a_kohya_save_writes_the_original_names_and_loads_back_the_same(files, tmp_path):
    """``save_lora_weights(format="kohya")`` writes the checkpoint's names (``lora_unet_layers_0_attention_qkv``), as the
    family's trainers do, and the file loads back to the same output."""
    from safetensors.torch import load_file

    paths, base = files
    model = lora_loader.attach(tiny_ideogram4(0))
    model.load_lora_weights(paths["diffusers"], adapter_name="k")
    saved = model.save_lora_weights(tmp_path / "kohya.safetensors", "k", format="kohya")
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in load_file(saved)
    again = lora_loader.attach(tiny_ideogram4(0))
    again.load_lora_weights(saved, adapter_name="k")
    assert_close(ideogram4_output(again), ideogram4_output(model), base)
