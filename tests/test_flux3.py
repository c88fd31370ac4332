"""Flux 3 (``Flux3ModularPipeline``, ``Flux3Transformer2DModel``): every layout its LoRAs come in.

One rank-4 LoRA on BFL's module names (per-mode blocks ``content_mode_blocks.image`` / ``image_cond`` and
``txt_mode_blocks``, joint ``single_blocks``: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``attn_out`` / ``mlp_in`` /
``mlp_out``) is written as each producer writes it: diffusers (``save_lora_weights``: ``mode_blocks.image.0.attn.to_q``,
rank and alpha in the header), BFL / ComfyUI / ai-toolkit (``diffusion_model.`` + BFL names, lora_A / lora_B; or
lora_down / lora_up / alpha), Kohya-style (``lora_unet_content_mode_blocks_image_0_q_proj``). Every layout is compared
with a merge of the file's own tensors into the weights computed here (W + alpha / r * B @ A), and with diffusers+peft
loading the same file where diffusers' Flux 3 converter reads it. The top-level modules (``emb_in``, ``txt_in``,
``time_in``, the stream modulations, the final layer with its ``(shift, scale)`` halves swapped) are names diffusers'
LoRA converter does not map: checked against the merge only. Flux.1 / Flux.2 files in their own ``single_blocks``
names stay theirs.
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers.loaders.lora_pipeline import Flux3LoraLoaderMixin
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, random_pairs, spell
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped, merged_output, read
from tiny_tail_b import flux3_output, tiny_flux3

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert
from lora_loader.formats.original_names import family_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_LEAF = {"q_proj": "attn.to_q", "k_proj": "attn.to_k", "v_proj": "attn.to_v", "attn_out": "attn.to_out.0",
         "mlp_in": "ff.linear_in", "mlp_out": "ff.linear_out"}  # fmt: skip
_BLOCKS = {"content_mode_blocks.image.0": "mode_blocks.image.0", "content_mode_blocks.image_cond.0": "mode_blocks.image_cond.0",
           "txt_mode_blocks.0": "txt_mode_blocks.0", "single_blocks.0": "single_transformer_blocks.0",
           "single_blocks.1": "single_transformer_blocks.1"}  # fmt: skip
# BFL name -> diffusers' module path, written out by hand
ORIGINAL = {f"{b}.{leaf}": f"{d}.{new}" for b, d in _BLOCKS.items() for leaf, new in _LEAF.items()}
TOP_LEVEL = {"emb_in.image": "x_embedders.image", "emb_in.image_cond": "x_embedders.image_cond", "txt_in": "context_embedder",
             "time_in.in_layer": "timestep_embedder.linear_1", "time_in.out_layer": "timestep_embedder.linear_2",
             "early_stream_modulations.image.lin": "early_stream_modulations.image.linear",
             "single_stream_modulations.txt.lin": "single_stream_modulations.txt.linear",
             "final_layer.image.linear": "proj_out", "final_layer.image.adaLN_modulation.1": "norm_out.linear"}  # fmt: skip
SWAPPED = {"final_layer.image.adaLN_modulation.1"}  # BFL's (shift, scale) is diffusers' (scale, shift)


def original_pairs(seed: int = 1, paths=None) -> dict:
    table = ORIGINAL | TOP_LEVEL
    return random_pairs(tiny_flux3(0), {p: table[p] for p in (paths or ORIGINAL)}, seed)


def write(layout: str, pairs: dict, directory) -> str:
    if layout == "diffusers":
        d = {ORIGINAL[p]: ab for p, ab in pairs.items()}
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in d.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in d.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(d))
        return save_diffusers_lora(os.fspath(directory), Flux3LoraLoaderMixin, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    writers = {
        "bfl": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "comfyui": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "kohya": lambda: spell(pairs, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"{layout}.safetensors"))


# layout -> (lora_loader's format, whether diffusers' Flux 3 converter + peft reads it)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "bfl": ("comfyui", True),
    "comfyui": ("comfyui", False),  # diffusers' converter renames modules only, not lora_down / lora_up
    "kohya": ("kohya", False),  # no lora_unet_ handling in diffusers' converter
}


def resolve(stem: str):
    """File stem -> [(diffusers path, rows)] from this file's tables (no lora_loader): the swapped halves by hand."""
    for prefix in ("diffusion_model.", "transformer.", "lora_unet_"):
        stem = stem.removeprefix(prefix)
    table = ORIGINAL | TOP_LEVEL
    by_mangled = {p.replace(".", "_"): p for p in table} | {d.replace(".", "_"): d for d in ORIGINAL.values()}
    name = by_mangled[stem.replace(".", "_")]
    if name in SWAPPED:
        half = tiny_flux3(0).norm_out.linear.weight.shape[0] // 2
        return [(table[name], torch.cat([torch.arange(half, 2 * half), torch.arange(0, half)]))]
    return [(table.get(name, name), slice(None))]


def expected(path: str, layout: str, weight: float = 1.0) -> torch.Tensor:
    return merged_output(tiny_flux3, flux3_output, resolve, path, layout == "diffusers", weight)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("flux3")
    pairs = original_pairs()
    return {layout: write(layout, pairs, directory) for layout in LAYOUTS}, flux3_output(tiny_flux3(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_reads = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_reads:
        source = paths[layout] if layout == "diffusers" else read(paths[layout])[0]
        theirs, _ = diffusers_output(Flux3LoraLoaderMixin, tiny_flux3, flux3_output, source)
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_flux3(0))
    report = model.load_lora_weights(paths[layout], adapter_name="f")
    assert report.format == fmt and not report.skipped
    assert_close(flux3_output(model), want, base)
    tensors, metadata = read(paths[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "flux3"


@pytest.mark.parametrize("layout", ["bfl", "kohya", "diffusers"])
def test_lora_loader_inspect_names_flux3(layout, files, capsys):
    import json

    from lora_loader.cli import main

    assert main(["inspect", files[0][layout], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "flux3"


@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
def test_top_level_bfl_names_and_the_swapped_final_modulation(layout, tmp_path):
    path = write(layout, original_pairs(5, ["single_blocks.0.q_proj", *TOP_LEVEL]), tmp_path)
    model = lora_loader.attach(tiny_flux3(0))
    report = model.load_lora_weights(path, adapter_name="top")
    assert not report.skipped
    assert_close(flux3_output(model), expected(path, layout), flux3_output(tiny_flux3(0)))


def test_flux1_and_flux2_single_block_names_stay_theirs():
    """``single_blocks_N_`` is Flux.1's and Flux.2's prefix too: their module names there are not Flux 3's."""
    assert family_of(["single_blocks_0_linear1", "single_blocks_0_modulation_lin"]).name == "Flux"
    assert family_of(["double_blocks_0_img_attn_qkv", "single_blocks_0_linear2"]).name == "Flux"
    assert family_of(["single_blocks_0_q_proj", "single_blocks_0_mlp_in"]).name == "Flux 3"


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(files, tmp_path):
    paths, base = files
    other = write("diffusers", original_pairs(seed=2), tmp_path)
    _, theirs = diffusers_output(Flux3LoraLoaderMixin, tiny_flux3, flux3_output, read(paths["bfl"])[0], adapter="a")
    state, metadata = Flux3LoraLoaderMixin.lora_state_dict(other, return_lora_metadata=True)
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="b", metadata=metadata)
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_flux3(0))
    mine.load_lora_weights(paths["bfl"], adapter_name="a")
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(flux3_output(mine), flux3_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_flux3(0)), paths["kohya"], flux3_output, base)


def test_a_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = dict(read(files[0]["bfl"])[0])
    extra = ["diffusion_model.single_blocks.7.q_proj.lora_A.weight", "diffusion_model.single_blocks.7.q_proj.lora_B.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 32), torch.ones(32, RANK)
    model = lora_loader.attach(tiny_flux3(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, "single_blocks.7.q_proj", flux3_output, expected(files[0]["bfl"], "bfl"), files[1])


def test_a_kohya_save_writes_the_original_names_and_loads_back_the_same(files, tmp_path):
    """``save_lora_weights(format="kohya")`` writes the checkpoint's names (``lora_unet_content_mode_blocks_image_0_q_proj``), as the
    family's trainers do, and the file loads back to the same output."""
    from safetensors.torch import load_file

    paths, base = files
    model = lora_loader.attach(tiny_flux3(0))
    model.load_lora_weights(paths["diffusers"], adapter_name="k")
    saved = model.save_lora_weights(tmp_path / "kohya.safetensors", "k", format="kohya")
    assert "lora_unet_content_mode_blocks_image_0_q_proj.lora_down.weight" in load_file(saved)
    again = lora_loader.attach(tiny_flux3(0))
    again.load_lora_weights(saved, adapter_name="k")
    assert_close(flux3_output(again), flux3_output(model), base)
