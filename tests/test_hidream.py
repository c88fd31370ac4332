"""HiDream-I1 (``HiDreamImagePipeline``, ``HiDreamImageTransformer2DModel``): every layout its LoRAs come in.

HiDream's checkpoint names its modules as diffusers does, so a producer differs only in prefix and suffix spelling.
One rank-4 LoRA on the dual-stream block's attention (image and text: ``to_q`` ... ``to_out_t``), its MoE
feed-forward (shared expert, routed experts, the text stream's ``ff_t``), the single-stream block, the modulations,
a caption projection and the final layer is written as each producer writes it: diffusers (``save_lora_weights``),
diffusion-pipe / ComfyUI / ai-toolkit (``diffusion_model.`` + lora_A / lora_B: what diffusers' HiDream converter
reads), ComfyUI's Kohya spelling (``diffusion_model.`` + ``lora_down`` / ``lora_up`` + ``.alpha``), Kohya
(``lora_unet_double_stream_blocks_0_block_attn1_to_q``), DiffSynth (``.lora_A.default.weight``), LyCORIS LoKr.
Each is compared with diffusers+peft where diffusers reads it, and always with a merge of the file's own tensors
into the weights computed here (W + alpha / r * B @ A).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import HiDreamImagePipeline
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, independent_merge, random_pairs, spell
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped, merged_output, read
from tiny_tail_a import hidream_output, tiny_hidream

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_D, _S = "double_stream_blocks.0.block", "single_stream_blocks.0.block"
PATHS = [f"{_D}.attn1.{leaf}" for leaf in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")] + [
    f"{_D}.ff_i.shared_experts.w1", f"{_D}.ff_i.experts.1.w2", f"{_D}.ff_i.experts.0.w3", f"{_D}.ff_t.w1", f"{_D}.ff_t.w2",
    f"{_D}.adaLN_modulation.1", f"{_S}.attn1.to_q", f"{_S}.attn1.to_v", f"{_S}.attn1.to_out", f"{_S}.ff_i.shared_experts.w2",
    f"{_S}.adaLN_modulation.1", "caption_projection.0.linear", "final_layer.linear", "final_layer.adaLN_modulation.1",
]  # fmt: skip
_MODULES = {name.replace(".", "_"): name for name, _ in tiny_hidream(0).named_modules() if name}


def pairs_for(seed: int = 1) -> dict:
    return random_pairs(tiny_hidream(0), {p: p for p in PATHS}, seed)


def mangled(path: str) -> str:
    return path.replace(".", "_")


def write(layout: str, pairs: dict, directory) -> str:
    if layout == "diffusers":
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in pairs.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in pairs.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(pairs))
        return save_diffusers_lora(os.fspath(directory), HiDreamImagePipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    writers = {
        "diffusion-pipe": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "comfyui-kohya": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "kohya": lambda: spell(pairs, lambda p: "lora_unet_" + mangled(p), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "diffsynth": lambda: spell(pairs, lambda p: p, ".lora_A.default.weight", ".lora_B.default.weight", None),
        "peft-transformer": lambda: spell(pairs, lambda p: "transformer." + p, ".lora_A.weight", ".lora_B.weight", None),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"{layout}.safetensors"))


# layout -> (lora_loader's format, whether diffusers' HiDream loader reads it)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "diffusion-pipe": ("comfyui", True),
    "comfyui-kohya": ("comfyui", False),
    "kohya": ("kohya", False),
    "diffsynth": ("diffusers", False),
    "peft-transformer": ("diffusers", True),
}


def resolve(stem: str):
    for prefix in ("diffusion_model.", "transformer.", "lora_unet_", "lycoris_"):
        stem = stem.removeprefix(prefix)
    return [(_MODULES[stem.replace(".", "_")], slice(None))]


def expected(path: str, layout: str) -> torch.Tensor:
    return merged_output(tiny_hidream, hidream_output, resolve, path, layout == "diffusers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hidream")
    pairs = pairs_for()
    return {layout: write(layout, pairs, directory) for layout in LAYOUTS}, hidream_output(tiny_hidream(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_reads = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_reads:
        theirs, _ = diffusers_output(HiDreamImagePipeline, tiny_hidream, hidream_output, paths[layout] if layout == "diffusers" else read(paths[layout])[0])
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_hidream(0))
    report = model.load_lora_weights(paths[layout], adapter_name="h")
    assert report.format == fmt and not report.skipped
    assert_close(hidream_output(model), want, base)
    tensors, metadata = read(paths[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "hidream"


def test_lora_loader_inspect_names_hidream(files, capsys):
    from lora_loader.cli import main

    for layout in ("kohya", "diffusion-pipe", "diffusers"):
        assert main(["inspect", files[0][layout], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == "hidream"


def test_a_blend_of_two_gives_what_diffusers_gives(files, tmp_path):
    paths, base = files
    other = read(write("diffusion-pipe", pairs_for(seed=2), tmp_path))[0]
    _, theirs = diffusers_output(HiDreamImagePipeline, tiny_hidream, hidream_output, paths["diffusers"], adapter="a")
    theirs.load_lora_adapter(HiDreamImagePipeline.lora_state_dict(dict(other)), prefix="transformer", adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_hidream(0))
    mine.load_lora_weights(paths["kohya"], adapter_name="a")  # the same LoRA as the diffusers file, Kohya-named
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(hidream_output(mine), hidream_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_hidream(0)), paths["diffusion-pipe"], hidream_output, base)


def test_a_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = dict(read(files[0]["diffusion-pipe"])[0])
    extra = ["diffusion_model.double_stream_blocks.3.block.attn1.to_q.lora_A.weight",
             "diffusion_model.double_stream_blocks.3.block.attn1.to_q.lora_B.weight"]  # fmt: skip
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 32), torch.ones(32, RANK)
    model = lora_loader.attach(tiny_hidream(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, r"double_stream_blocks.3.block.attn1.to_q", hidream_output, expected(files[0]["diffusion-pipe"], "diffusion-pipe"), files[1])


@pytest.mark.parametrize("prefix", ["lycoris_", "diffusion_model."])
def test_lokr_gives_the_merge_of_its_factors(prefix):
    g = torch.Generator().manual_seed(4)
    modules = dict(tiny_hidream(0).named_modules())
    tensors = {}
    for path in (f"{_D}.attn1.to_q", f"{_D}.ff_i.shared_experts.w1", f"{_S}.attn1.to_out"):
        rows, cols = modules[path].weight.shape
        stem = prefix + (mangled(path) if prefix == "lycoris_" else path)
        tensors[f"{stem}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.3
        tensors[f"{stem}.lokr_w2_a"] = torch.randn(rows // 4, 2, generator=g) * 0.3
        tensors[f"{stem}.lokr_w2_b"] = torch.randn(2, cols // 4, generator=g) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    want = independent_merge(tiny_hidream, hidream_output, tensors, resolve)
    model = lora_loader.attach(tiny_hidream(0))
    assert not model.load_lora_weights(tensors, adapter_name="k").skipped
    assert_close(hidream_output(model), want, hidream_output(tiny_hidream(0)))
    assert detect_family(convert(tensors).deltas)[0] == "hidream"
