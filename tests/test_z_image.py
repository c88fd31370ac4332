"""Z-Image (Turbo, Base, Omni: ``ZImageTransformer2DModel``): every layout its LoRAs come in.

One rank-4 LoRA on the original checkpoint's modules (fused ``attention.qkv``, ``attention.out``, ``feed_forward.w*``,
``adaLN_modulation.0`` in ``layers`` / ``noise_refiner`` / ``context_refiner``, ``t_embedder``, ``cap_embedder``) is
written as each producer writes it: diffusers (``save_lora_weights``, alpha in the header), musubi-tuner / Kohya
(``lora_unet_layers_0_attention_qkv`` + ``.alpha``), ComfyUI (``diffusion_model.`` + original names), Anime-Z
(``.lora.down.weight``), ai-toolkit (``diffusion_model.`` + diffusers names, lora_A / lora_B), DiffSynth
(``.lora_A.default.weight``), Kohya suffixes on dotted paths. In diffusers' names the fused LoRA is the same LoRA:
each of q, k, v takes its third of lora_B's rows. Every layout is compared with a merge of the file's own tensors
into the weights computed here (W + alpha / r * B @ A, fused rows cut in thirds by hand), and with diffusers+peft
loading the same file wherever diffusers' Z-Image converter reads it.
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import ZImagePipeline
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import (ALPHA, RANK, assert_close, diffusers_output, independent_merge, kohya_resolver, random_pairs, spell,
                       tiny_z_image, z_image_output)  # fmt: skip
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped, merged_output, read

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_BLOCKS = ["layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"]
# original name -> the diffusers module whose shape it has (a fused qkv: out rows x3)
ORIGINAL = {f"{b}.attention.qkv": (96, 32) for b in _BLOCKS} | {f"{b}.attention.out": f"{b}.attention.to_out.0" for b in _BLOCKS} | {
    f"{b}.feed_forward.{w}": f"{b}.feed_forward.{w}" for b in _BLOCKS for w in ("w1", "w2", "w3")} | {
    f"{b}.adaLN_modulation.0": f"{b}.adaLN_modulation.0" for b in ("layers.0", "layers.1", "noise_refiner.0")} | {
    "t_embedder.mlp.0": "t_embedder.mlp.0", "cap_embedder.1": "cap_embedder.1"}  # fmt: skip


def original_pairs(seed: int = 1) -> dict:
    return random_pairs(tiny_z_image(0), ORIGINAL, seed)


def diffusers_pairs(pairs: dict) -> dict:
    """The same LoRA on diffusers' modules: q, k, v share lora_A and take their third of lora_B's rows."""
    out = {}
    for path, (a, b) in pairs.items():
        if path.endswith(".attention.qkv"):
            block = path[: -len(".qkv")]
            for i, leaf in enumerate(("to_q", "to_k", "to_v")):
                out[f"{block}.{leaf}"] = (a.clone(), b[i * 32:(i + 1) * 32].clone())
        else:
            out[path.replace(".attention.out", ".attention.to_out.0")] = (a, b)
    return out


def mangled(path: str) -> str:
    return path.replace(".", "_")


def write(layout: str, pairs: dict, directory) -> str:
    d = diffusers_pairs(pairs)
    if layout == "diffusers":
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in d.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in d.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(d))
        return save_diffusers_lora(os.fspath(directory), ZImagePipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    writers = {
        "musubi": lambda: spell(pairs, lambda p: "lora_unet_" + mangled(p), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "comfyui": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "anime-z": lambda: spell(pairs, lambda p: p, ".lora.down.weight", ".lora.up.weight", ALPHA),
        "original-dotted-kohya": lambda: spell(pairs, lambda p: p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "ai-toolkit": lambda: spell(d, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "diffsynth": lambda: spell(d, lambda p: p, ".lora_A.default.weight", ".lora_B.default.weight", None),
        "kohya-diffusers-names": lambda: spell(d, lambda p: "lora_unet_" + mangled(p), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "dotted-kohya": lambda: spell(d, lambda p: p, ".lora_down.weight", ".lora_up.weight", ALPHA),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"{layout}.safetensors"))


# layout -> (lora_loader's format, whether diffusers' Z-Image converter reads it)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "musubi": ("kohya", True),
    "comfyui": ("comfyui", False),  # diffusers splits a fused qkv only in .lora.down / lora_unet_ spelling
    "anime-z": ("diffusers", True),
    "original-dotted-kohya": ("diffusers", False),
    "ai-toolkit": ("comfyui", True),
    "diffsynth": ("diffusers", True),
    "kohya-diffusers-names": ("kohya", True),
    "dotted-kohya": ("diffusers", True),
}
RESOLVE = kohya_resolver(tiny_z_image(0), renames={"attention_out": "attention_to_out_0"}, fused={"attention_qkv": ("attention.to_q", "attention.to_k", "attention.to_v")})


def expected(path: str, layout: str, weight: float = 1.0) -> torch.Tensor:
    return merged_output(tiny_z_image, z_image_output, RESOLVE, path, layout == "diffusers", weight)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("z_image")
    pairs = original_pairs()
    return {layout: write(layout, pairs, directory) for layout in LAYOUTS}, z_image_output(tiny_z_image(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_reads = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_reads:
        theirs, _ = diffusers_output(ZImagePipeline, tiny_z_image, z_image_output, paths[layout] if layout == "diffusers" else read(paths[layout])[0])
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_z_image(0))
    report = model.load_lora_weights(paths[layout], adapter_name="z")
    assert report.format == fmt and not report.skipped
    assert_close(z_image_output(model), want, base)
    tensors, metadata = read(paths[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "z-image"


@pytest.mark.parametrize("layout", ["musubi", "comfyui", "dotted-kohya"])
def test_lora_loader_inspect_names_z_image(layout, files, capsys):
    import json

    from lora_loader.cli import main

    assert main(["inspect", files[0][layout], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "z-image"


def test_top_level_original_names_x_embedder_and_final_layer():
    """Beside a block (as a real file has them: a file of these names alone could be Flux's final_layer)."""
    model = tiny_z_image(0)
    pairs = random_pairs(model, {"layers.0.feed_forward.w2": "layers.0.feed_forward.w2", "x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
                                 "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"}, 5)  # fmt: skip
    tensors = spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA)
    renames = {"x_embedder": "all_x_embedder_2-1", "final_layer": "all_final_layer_2-1"}
    want = independent_merge(tiny_z_image, z_image_output, tensors, kohya_resolver(model, renames=renames))
    mine = lora_loader.attach(model)
    mine.load_lora_weights(tensors, adapter_name="top")
    assert_close(z_image_output(mine), want, z_image_output(tiny_z_image(0)))


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(files):
    paths, base = files
    other = write("ai-toolkit", original_pairs(seed=2), os.path.dirname(paths["musubi"]) + "/../")  # a second LoRA
    _, theirs = diffusers_output(ZImagePipeline, tiny_z_image, z_image_output, read(paths["musubi"])[0], adapter="a")
    theirs.load_lora_adapter(ZImagePipeline.lora_state_dict(read(other)[0]), prefix="transformer", adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_z_image(0))
    mine.load_lora_weights(paths["musubi"], adapter_name="a")
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(z_image_output(mine), z_image_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_z_image(0)), paths["comfyui"], z_image_output, base)


def test_a_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = dict(read(files[0]["musubi"])[0])
    extra = ["lora_unet_layers_5_attention_qkv.lora_down.weight", "lora_unet_layers_5_attention_qkv.lora_up.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 32), torch.ones(96, RANK)
    model = lora_loader.attach(tiny_z_image(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, "lora_unet_layers_5_attention_qkv", z_image_output, expected(files[0]["musubi"], "musubi"), files[1])


def lokr_file(prefix: str, mangle: bool, seed: int = 4) -> dict:
    """ai-toolkit's LoKr (``diffusion_model.<diffusers path>.lokr_w1`` / ``lokr_w2_a`` / ``lokr_w2_b`` + ``.alpha``), or
    LyCORIS' own wrapper (``lycoris_<mangled path>``): rank 2, alpha 1 (scale 0.5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in ("layers.0.attention.to_q", "noise_refiner.0.attention.to_k", "layers.1.adaLN_modulation.0", "cap_embedder.1"):
        rows, cols = dict(tiny_z_image(0).named_modules())[path].weight.shape
        stem = prefix + (mangled(path) if mangle else path)
        out[f"{stem}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.3
        out[f"{stem}.lokr_w2_a"] = torch.randn(rows // 4, 2, generator=g) * 0.3
        out[f"{stem}.lokr_w2_b"] = torch.randn(2, cols // 4, generator=g) * 0.3
        out[f"{stem}.alpha"] = torch.tensor(1.0)
    return out


@pytest.mark.parametrize("producer", ["ai-toolkit", "lycoris", "dotted"])
def test_lokr_gives_the_merge_of_its_factors(producer):
    prefix, mangle = {"ai-toolkit": ("diffusion_model.", False), "lycoris": ("lycoris_", True), "dotted": ("", False)}[producer]
    tensors = lokr_file(prefix, mangle)
    base = z_image_output(tiny_z_image(0))
    want = independent_merge(tiny_z_image, z_image_output, tensors, kohya_resolver(tiny_z_image(0)))
    if producer == "ai-toolkit":  # diffusers reads ai-toolkit's Z-Image LoKr (peft's LoKr)
        theirs, _ = diffusers_output(ZImagePipeline, tiny_z_image, z_image_output, tensors)
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_z_image(0))
    model.load_lora_weights(tensors, adapter_name="k")
    assert_close(z_image_output(model), want, base)
    assert detect_family(convert(tensors).deltas)[0] == "z-image"
