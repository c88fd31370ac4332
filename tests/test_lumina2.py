"""Lumina-Image 2.0 (``Lumina2Pipeline``, ``Lumina2Transformer2DModel``): every layout its LoRAs come in.

One rank-4 LoRA on the original checkpoint's modules (fused ``attention.qkv`` with 3 query heads to 1 key / value
head as Lumina-Image 2.0 has 24 to 8, ``attention.out``, ``feed_forward.w1..3``, ``adaLN_modulation.1`` in ``layers`` /
``noise_refiner`` and the same without modulation in ``context_refiner``) is written as each producer writes it:
diffusers (``save_lora_weights``), diffusion-pipe / ComfyUI (``diffusion_model.`` + original names, lora_A / lora_B,
no alpha: what diffusers' Lumina 2 converter reads), sd-scripts (``lora_unet_layers_0_attention_qkv`` + ``.alpha``),
ComfyUI's Kohya spelling (``diffusion_model.`` + ``lora_down`` / ``lora_up`` + ``.alpha``), Kohya in diffusers' names,
DiffSynth (``.lora_A.default.weight``), LyCORIS LoKr on the fused qkv. Each is compared with a merge of the file's own
tensors into the weights computed here (W + alpha / r * B @ A, the fused rows cut 3:1:1 by hand), and with
diffusers+peft where diffusers reads the file at the tiny model's widths. diffusers' converter cuts a fused qkv at
Lumina-Image 2.0's fixed widths ([2304, 768, 768]): at those widths lora_loader's split is compared with it directly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import Lumina2Pipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, independent_merge, random_pairs, spell
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped, merged_output, read
from tiny_tail_a import lumina2_output, tiny_lumina2

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

HIDDEN, Q, KV = 24, 24, 8  # the tiny model: 3 heads of 8 rows for q, 1 for k and v
_BLOCKS = ["layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"]
_MODULATED = ["layers.0", "layers.1", "noise_refiner.0"]
_FF = {"w1": "linear_1", "w2": "linear_2", "w3": "linear_3"}
# original name -> the diffusers module whose shape it has (the fused qkv: its rows)
ORIGINAL = {f"{b}.attention.qkv": (Q + 2 * KV, HIDDEN) for b in _BLOCKS} | {
    f"{b}.attention.out": f"{b}.attn.to_out.0" for b in _BLOCKS} | {
    f"{b}.feed_forward.{w}": f"{b}.feed_forward.{leaf}" for b in _BLOCKS for w, leaf in _FF.items()} | {
    f"{b}.adaLN_modulation.1": f"{b}.norm1.linear" for b in _MODULATED}  # fmt: skip


def to_diffusers_path(path: str) -> str:
    for w, leaf in _FF.items():
        path = path.replace(f".feed_forward.{w}", f".feed_forward.{leaf}")
    return path.replace(".attention.out", ".attn.to_out.0").replace(".adaLN_modulation.1", ".norm1.linear")


def original_pairs(seed: int = 1) -> dict:
    return random_pairs(tiny_lumina2(0), ORIGINAL, seed)


def diffusers_pairs(pairs: dict) -> dict:
    """The same LoRA on diffusers' modules: q, k, v share lora_A and take their rows of lora_B (24, 8, 8)."""
    out = {}
    for path, (a, b) in pairs.items():
        if path.endswith(".attention.qkv"):
            block = path[: -len(".attention.qkv")]
            for leaf, rows in (("to_q", slice(0, Q)), ("to_k", slice(Q, Q + KV)), ("to_v", slice(Q + KV, Q + 2 * KV))):
                out[f"{block}.attn.{leaf}"] = (a.clone(), b[rows].clone())
        else:
            out[to_diffusers_path(path)] = (a, b)
    return out


def mangled(path: str) -> str:
    return path.replace(".", "_")


def write(layout: str, pairs: dict, directory) -> str:
    d = diffusers_pairs(pairs)
    if layout == "diffusers":
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in d.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in d.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(d))
        return save_diffusers_lora(os.fspath(directory), Lumina2Pipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    writers = {
        "diffusion-pipe": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "sd-scripts": lambda: spell(pairs, lambda p: "lora_unet_" + mangled(p), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "comfyui-kohya": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "kohya-diffusers-names": lambda: spell(d, lambda p: "lora_unet_" + mangled(p), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "diffsynth": lambda: spell(d, lambda p: p, ".lora_A.default.weight", ".lora_B.default.weight", None),
        "ai-toolkit": lambda: spell(d, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"{layout}.safetensors"))


# layout -> (lora_loader's format, whether diffusers' Lumina 2 loader reads it at the tiny model's widths)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "diffusion-pipe": ("comfyui", False),  # diffusers' converter: fixed [2304, 768, 768] qkv split (checked below)
    "sd-scripts": ("kohya", False),  # diffusers' Lumina 2 loader converts diffusion_model. files only
    "comfyui-kohya": ("comfyui", False),
    "kohya-diffusers-names": ("kohya", False),
    "diffsynth": ("diffusers", False),
    "ai-toolkit": ("comfyui", False),  # diffusion_model. + diffusers names: diffusers' converter wants qkv
}


_MODULES = {name.replace(".", "_"): name for name, _ in tiny_lumina2(0).named_modules() if name}


def resolve(stem: str):
    """An original or diffusers module name (any prefix, dots or underscores) -> [(diffusers path, rows)]."""
    for prefix in ("diffusion_model.", "transformer.", "lora_unet_", "lycoris_"):
        stem = stem.removeprefix(prefix)
    modules = _MODULES
    name = stem.replace(".", "_")
    if name.endswith("_attention_qkv"):
        block = modules[name[: -len("_attention_qkv")]]
        return [(f"{block}.attn.to_q", slice(0, Q)), (f"{block}.attn.to_k", slice(Q, Q + KV)), (f"{block}.attn.to_v", slice(Q + KV, None))]
    originals = {mangled(o): to_diffusers_path(o) for o in ORIGINAL if not o.endswith("qkv")}
    return [(originals.get(name) or modules[name], slice(None))]


def expected(path: str, layout: str) -> torch.Tensor:
    return merged_output(tiny_lumina2, lumina2_output, resolve, path, layout == "diffusers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lumina2")
    pairs = original_pairs()
    return {layout: write(layout, pairs, directory) for layout in LAYOUTS}, lumina2_output(tiny_lumina2(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_reads = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_reads:
        theirs, _ = diffusers_output(Lumina2Pipeline, tiny_lumina2, lumina2_output, paths[layout])
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_lumina2(0))
    report = model.load_lora_weights(paths[layout], adapter_name="l")
    assert report.format == fmt and not report.skipped
    assert_close(lumina2_output(model), want, base)
    tensors, metadata = read(paths[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "lumina2"


def test_the_fused_qkv_splits_as_diffusers_converter_splits_it_at_lumina_image_2_widths():
    """diffusers' converter at Lumina-Image 2.0's widths (2304 in, 2304 + 768 + 768 out), one full block."""
    g = torch.Generator().manual_seed(3)
    widths = {"attention.qkv": (3840, 2304), "attention.out": (2304, 2304), "feed_forward.w1": (16, 2304),
              "feed_forward.w2": (2304, 16), "feed_forward.w3": (16, 2304), "adaLN_modulation.1": (16, 8)}  # fmt: skip
    sd = {}
    for name, (rows, cols) in widths.items():
        sd[f"diffusion_model.layers.0.{name}.lora_A.weight"] = torch.randn(RANK, cols, generator=g)
        sd[f"diffusion_model.layers.0.{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=g)
    theirs = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(sd))
    mine = convert(sd).deltas
    assert len(mine) == len(theirs) // 2 == 8
    for (component, path), delta in mine.items():
        assert component == "denoiser"  # diffusion_model.: the pipeline's denoiser, its transformer
        assert torch.equal(delta.down, theirs[f"transformer.{path}.lora_A.weight"])
        assert torch.equal(delta.up, theirs[f"transformer.{path}.lora_B.weight"])


def test_top_level_original_names(files):
    """sd-scripts' embedders and final layer (``x_embedder``, ``t_embedder.mlp.0``, ``cap_embedder.1``, ``final_layer``)."""
    model = tiny_lumina2(0)
    top = {"layers.0.adaLN_modulation.1": "layers.0.norm1.linear", "x_embedder": "x_embedder",
           "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
           "cap_embedder.1": "time_caption_embed.caption_embedder.1", "final_layer.adaLN_modulation.1": "norm_out.linear_1",
           "final_layer.linear": "norm_out.linear_2"}  # fmt: skip
    pairs = random_pairs(model, top, 5)
    tensors = spell(pairs, lambda p: "lora_unet_" + mangled(p), ".lora_down.weight", ".lora_up.weight", ALPHA)
    modules = {mangled(o): t for o, t in top.items()}
    want = independent_merge(tiny_lumina2, lumina2_output, tensors, lambda stem: [(modules[stem.removeprefix("lora_unet_")], slice(None))])
    mine = lora_loader.attach(model)
    report = mine.load_lora_weights(tensors, adapter_name="top")
    assert not report.skipped
    assert_close(lumina2_output(mine), want, lumina2_output(tiny_lumina2(0)))


def test_a_file_z_image_would_also_read_loads_as_lumina_2_into_a_lumina_2_model():
    """Attention and feed-forward only (names Z-Image's table has too, with other targets): the live model decides."""
    pairs = {p: v for p, v in original_pairs(seed=6).items() if ".attention.out" in p or ".feed_forward." in p}
    tensors = spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA)
    want = independent_merge(tiny_lumina2, lumina2_output, tensors, resolve)
    model = lora_loader.attach(tiny_lumina2(0))
    assert not model.load_lora_weights(tensors, adapter_name="ff").skipped
    assert_close(lumina2_output(model), want, lumina2_output(tiny_lumina2(0)))


def test_lora_loader_inspect_names_lumina2(files, capsys):
    from lora_loader.cli import main

    for layout in ("sd-scripts", "diffusion-pipe", "diffusers"):
        assert main(["inspect", files[0][layout], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == "lumina2"


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(files, tmp_path):
    paths, base = files
    other = write("diffusers", original_pairs(seed=2), tmp_path)  # a second LoRA
    _, theirs = diffusers_output(Lumina2Pipeline, tiny_lumina2, lumina2_output, paths["diffusers"], adapter="a")
    state, metadata = Lumina2Pipeline.lora_state_dict(other, return_lora_metadata=True)
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="b", metadata=metadata)
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_lumina2(0))
    mine.load_lora_weights(paths["sd-scripts"], adapter_name="a")  # the same LoRA as the diffusers file, Kohya-named
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(lumina2_output(mine), lumina2_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_lumina2(0)), paths["diffusion-pipe"], lumina2_output, base)


def test_a_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = dict(read(files[0]["sd-scripts"])[0])
    extra = ["lora_unet_layers_5_attention_qkv.lora_down.weight", "lora_unet_layers_5_attention_qkv.lora_up.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, HIDDEN), torch.ones(Q + 2 * KV, RANK)
    model = lora_loader.attach(tiny_lumina2(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, "lora_unet_layers_5_attention_qkv", lumina2_output, expected(files[0]["sd-scripts"], "sd-scripts"), files[1])


@pytest.mark.parametrize("producer", ["lycoris", "comfyui"])
def test_lokr_on_the_fused_qkv_gives_the_merge_of_its_factors(producer):
    """LyCORIS' LoKr on the original modules (``lycoris_layers_0_attention_qkv.lokr_w1``, or ``diffusion_model.``):
    the dense kron product's rows go 3:1:1 to q, k, v."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for path, (rows, cols) in {"layers.0.attention.qkv": (Q + 2 * KV, HIDDEN), "noise_refiner.0.feed_forward.w2": (HIDDEN, None)}.items():
        cols = cols or dict(tiny_lumina2(0).named_modules())["noise_refiner.0.feed_forward.linear_2"].weight.shape[1]
        stem = "lycoris_" + mangled(path) if producer == "lycoris" else "diffusion_model." + path
        tensors[f"{stem}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.3
        tensors[f"{stem}.lokr_w2_a"] = torch.randn(rows // 4, 2, generator=g) * 0.3
        tensors[f"{stem}.lokr_w2_b"] = torch.randn(2, cols // 4, generator=g) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    want = independent_merge(tiny_lumina2, lumina2_output, tensors, resolve)
    model = lora_loader.attach(tiny_lumina2(0))
    assert not model.load_lora_weights(tensors, adapter_name="k").skipped
    assert_close(lumina2_output(model), want, lumina2_output(tiny_lumina2(0)))


def test_a_kohya_save_writes_the_fused_qkv_and_reads_back(files, tmp_path):
    """Saved as Kohya, a Lumina 2 adapter is in sd-scripts' names (the q, k, v LoRAs joined into ``attention_qkv``)."""
    from safetensors.torch import load_file

    model = lora_loader.attach(tiny_lumina2(0))
    model.load_lora_weights(files[0]["diffusers"], adapter_name="a")
    path = model.save_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="a", format="kohya")
    keys = load_file(path)
    assert "lora_unet_layers_0_attention_qkv.lora_up.weight" in keys and not any("attn_to_q" in k for k in keys)
    assert keys["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape[0] == Q + 2 * KV
    again = lora_loader.attach(tiny_lumina2(0))
    again.load_lora_weights(path, adapter_name="b")
    assert_close(lumina2_output(again), lumina2_output(model), files[1])
