"""ACE-Step 1.5 (audio: ``AceStepPipeline``, ``AceStepTransformer1DModel``): every layout its LoRAs come in.

One rank-4 LoRA on the original DiT's modules (``layers.N.{self_attn,cross_attn}.{q,k,v,o}_proj``, GQA: k / v are
half as wide as q; ``mlp.up_proj``, ``condition_embedder``) is written as each producer writes it: ACE-Step's own
trainer (PEFT ``save_pretrained`` of the decoder: ``base_model.model.layers.0.self_attn.q_proj.lora_A.weight`` and
``adapter_config.json``), diffusers (``save_lora_weights``: ``transformer.layers.0.self_attn.to_q``, rank and alpha in
the header), ComfyUI (``diffusion_model.decoder.layers.0...`` with lora_down / lora_up / alpha, or lora_A / lora_B),
DiffSynth-Studio (``layers.0.self_attn.q_proj.lora_A.default.weight``), Kohya-style (``lora_unet_layers_0_...``), and
ACE-Step's LyCORIS LoKr (``lycoris_layers_0_cross_attn_q_proj.lokr_w1``). Every layout is compared with a merge of the
file's own tensors into the weights computed here (W + alpha / r * B @ A), and with diffusers+peft loading the same
file where diffusers' ACE-Step converter reads it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers.pipelines.ace_step import AceStepPipeline
from peft import LoraConfig
from producers import save_diffusers_lora, save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, independent_merge, random_pairs, spell
from tiny_qwen import check_disable_fuse_unfuse_unload, check_refused_unchanged_then_skipped
from tiny_tail_b import ace_step_output, tiny_ace_step

import lora_loader
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_RENAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0"}
# original (checkpoint) name -> diffusers' module path, written out by hand
ORIGINAL = {f"layers.{i}.{attn}.{old}": f"layers.{i}.{attn}.{new}" for i in (0, 1) for attn in ("self_attn", "cross_attn")
            for old, new in _RENAMES.items()} | {"layers.0.mlp.up_proj": "layers.0.mlp.up_proj",
                                                 "condition_embedder": "condition_embedder"}  # fmt: skip
ATTENTION_ONLY = [p for p in ORIGINAL if "_attn." in p]  # what ACE-Step's trainer targets (q, k, v, o)


def original_pairs(seed: int = 1, paths=None) -> dict:
    return random_pairs(tiny_ace_step(0), {p: ORIGINAL[p] for p in (paths or ORIGINAL)}, seed)


def write(layout: str, pairs: dict, directory) -> str:
    directory = os.fspath(directory)
    d = {ORIGINAL[p]: ab for p, ab in pairs.items()}
    if layout == "diffusers":
        sd = {f"{p}.lora_A.weight": a for p, (a, b) in d.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in d.items()}
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(d))
        return save_diffusers_lora(directory, AceStepPipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    if layout == "ace-step":  # PeftModel.save_pretrained of the decoder: a folder
        folder = os.path.join(directory, "ace-step-adapter")
        os.makedirs(folder, exist_ok=True)
        sd = spell(pairs, lambda p: "base_model.model." + p, ".lora_A.weight", ".lora_B.weight", ALPHA)
        sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
        save_state_dict(sd, os.path.join(folder, "adapter_model.safetensors"))
        targets = sorted({p.rsplit(".", 1)[-1] for p in pairs})
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, task_type="FEATURE_EXTRACTION").to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        config["peft_type"] = "LORA"
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, default=str)
        return folder
    writers = {
        "comfyui": lambda: spell(pairs, lambda p: "diffusion_model.decoder." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "comfyui-peft": lambda: spell(pairs, lambda p: "diffusion_model.decoder." + p, ".lora_A.weight", ".lora_B.weight", None),
        "diffsynth": lambda: spell(pairs, lambda p: p, ".lora_A.default.weight", ".lora_B.default.weight", None),
        "kohya": lambda: spell(pairs, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "lycoris-lokr": lambda: lokr(pairs),
        "lycoris-lora": lambda: spell(pairs, lambda p: "lycoris_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
    }
    return save_state_dict(writers[layout](), os.path.join(directory, f"{layout}.safetensors"))


def lokr(pairs: dict) -> dict:
    """LyCORIS' LoKr as ACE-Step's trainer writes it: ``lycoris_<path>.lokr_w1`` [2, 2], ``lokr_w2_a`` / ``lokr_w2_b``
    (rank 4) and ``alpha``; the weight is ``alpha / r * kron(w1, w2_a @ w2_b)``."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for path, (a, b) in pairs.items():
        stem = "lycoris_" + path.replace(".", "_")
        out[stem + ".lokr_w1"] = torch.randn(2, 2, generator=g) * 0.3
        out[stem + ".lokr_w2_a"] = torch.randn(b.shape[0] // 2, RANK, generator=g) * 0.3
        out[stem + ".lokr_w2_b"] = torch.randn(RANK, a.shape[1] // 2, generator=g) * 0.3
        out[stem + ".alpha"] = torch.tensor(ALPHA)
    return out


# layout -> (lora_loader's format, whether diffusers' ACE-Step converter + peft reads it)
LAYOUTS = {
    "ace-step": ("peft", True),
    "diffusers": ("diffusers", True),
    "comfyui": ("comfyui", False),  # diffusers strips only base_model.model.
    "comfyui-peft": ("comfyui", False),
    "diffsynth": ("diffusers", False),  # diffusers keeps the .default. infix, which peft does not read
    "kohya": ("kohya", False),
    "lycoris-lokr": ("kohya", False),
    "lycoris-lora": ("kohya", False),  # ACE-Step's trainer with LyCORIS' algo="lora"
}


def resolve(stem: str):
    """File stem -> [(diffusers path, all rows)], from this file's ORIGINAL table (no lora_loader)."""
    for prefix in ("base_model.model.", "diffusion_model.decoder.", "transformer.", "lora_unet_", "lycoris_"):
        stem = stem.removeprefix(prefix)
    by_mangled = {p.replace(".", "_"): d for p, d in ORIGINAL.items()} | {d.replace(".", "_"): d for d in ORIGINAL.values()}
    return [(by_mangled[stem.replace(".", "_")], slice(None))]


def read(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def expected(path: str, layout: str, weight: float = 1.0) -> torch.Tensor:
    tensors, _ = read(path)
    header_scale = (lambda stem, rank: ALPHA / RANK) if layout in ("diffusers", "ace-step") else None
    return independent_merge(tiny_ace_step, ace_step_output, tensors, resolve, header_scale, weight)


def diffusers_reads(path: str, layout: str, adapter: str = "d"):
    """diffusers+peft on the file: ACE-Step's PEFT folder with its config as the adapter's metadata."""
    if layout != "ace-step":
        return diffusers_output(AceStepPipeline, tiny_ace_step, ace_step_output, path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    model = tiny_ace_step(0)
    state = AceStepPipeline.lora_state_dict(read(path)[0])
    # the folder's r and alpha, on the modules diffusers' converter renamed the file's keys to
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state})
    metadata = {"transformer.r": config["r"], "transformer.lora_alpha": config["lora_alpha"], "transformer.target_modules": targets}
    model.load_lora_adapter(state, prefix="transformer", adapter_name=adapter, metadata=metadata)
    return ace_step_output(model), model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ace_step")
    pairs = original_pairs()
    return {layout: write(layout, pairs, directory) for layout in LAYOUTS}, ace_step_output(tiny_ace_step(0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_merge_of_its_own_tensors_and_what_diffusers_gives(layout, files):
    paths, base = files
    fmt, diffusers_can = LAYOUTS[layout]
    want = expected(paths[layout], layout)
    if diffusers_can:
        theirs, _ = diffusers_reads(paths[layout], layout)
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_ace_step(0))
    report = model.load_lora_weights(paths[layout], adapter_name="a")
    assert report.format == fmt and not report.skipped
    assert_close(ace_step_output(model), want, base)
    tensors, metadata = read(paths[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "ace-step"


@pytest.mark.parametrize("layout", ["ace-step", "comfyui", "lycoris-lokr"])
def test_lora_loader_inspect_names_ace_step(layout, files, capsys):
    from lora_loader.cli import main

    path = paths if os.path.isfile(paths := files[0][layout]) else os.path.join(paths, "adapter_model.safetensors")
    assert main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "ace-step"


def test_the_trainers_default_q_k_v_o_file_through_pipeline_classes(tmp_path):
    """ACE-Step's default targets (q, k, v, o of both attentions), as its trainer saves them, loaded with the
    pipeline's own call on an attached AceStepPipeline-like holder (the transformer component)."""
    path = write("ace-step", original_pairs(3, ATTENTION_ONLY), tmp_path)
    theirs, _ = diffusers_reads(path, "ace-step")
    base = ace_step_output(tiny_ace_step(0))
    assert_close(theirs, expected(path, "ace-step"), base)
    model = lora_loader.attach(tiny_ace_step(0))
    model.load_lora_weights(path, adapter_name="a")
    assert_close(ace_step_output(model), theirs, base)


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(files, tmp_path):
    paths, base = files
    other = write("diffusers", original_pairs(seed=2), tmp_path)
    _, theirs = diffusers_reads(paths["ace-step"], "ace-step", adapter="a")
    state, metadata = AceStepPipeline.lora_state_dict(other, return_lora_metadata=True)
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="b", metadata=metadata)
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    mine = lora_loader.attach(tiny_ace_step(0))
    mine.load_lora_weights(paths["ace-step"], adapter_name="a")
    mine.load_lora_weights(other, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(ace_step_output(mine), ace_step_output(theirs), base)


def test_disable_is_exact_fuse_unfuse_restores_every_weight_and_unload_is_exact(files):
    paths, base = files
    check_disable_fuse_unfuse_unload(lora_loader.attach(tiny_ace_step(0)), paths["comfyui"], ace_step_output, base)


def test_a_file_with_layers_the_model_lacks_is_refused_and_changes_nothing(files):
    tensors = dict(read(files[0]["kohya"])[0])
    extra = ["lora_unet_layers_5_cross_attn_q_proj.lora_down.weight", "lora_unet_layers_5_cross_attn_q_proj.lora_up.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 32), torch.ones(32, RANK)
    model = lora_loader.attach(tiny_ace_step(0))
    check_refused_unchanged_then_skipped(model, tensors, extra, "lora_unet_layers_5_cross_attn_q_proj", ace_step_output, expected(files[0]["kohya"], "kohya"), files[1])


def test_a_causal_lm_adapter_in_the_same_spelling_is_not_renamed():
    """A PEFT adapter of a bare Qwen3-style model (``base_model.model.layers.0.self_attn.q_proj``, no cross_attn)
    keeps its names: only ACE-Step's own names (cross_attn, its embedders) make a file ACE-Step's."""
    pairs = random_pairs(tiny_ace_step(0), {"layers.0.self_attn.q_proj": "layers.0.self_attn.to_q",
                                            "layers.0.mlp.gate_proj": "layers.0.mlp.gate_proj"}, 4)  # fmt: skip
    tensors = spell(pairs, lambda p: "base_model.model." + p, ".lora_A.weight", ".lora_B.weight", None)
    modules = {module for _, module in convert(tensors, {}).deltas}
    assert modules == {"layers.0.self_attn.q_proj", "layers.0.mlp.gate_proj"}


@pytest.mark.parametrize("layout", ["ace-step", "kohya"])
def test_a_self_attention_only_file_loads_into_ace_step_by_the_model_class(layout, tmp_path):
    """Without cross_attn the names are a causal LM's too: no table claims the file, and the live
    AceStepTransformer1DModel decides that ACE-Step's table reads it (diffusers' converter renames any q_proj)."""
    paths = [p for p in ATTENTION_ONLY if "self_attn" in p]
    path = write(layout, original_pairs(6, paths), tmp_path)
    base = ace_step_output(tiny_ace_step(0))
    want = expected(path, layout)
    if layout == "ace-step":
        assert_close(diffusers_reads(path, layout)[0], want, base)
    model = lora_loader.attach(tiny_ace_step(0))
    report = model.load_lora_weights(path, adapter_name="s")
    assert not report.skipped
    assert_close(ace_step_output(model), want, base)


def test_a_kohya_save_writes_the_original_names_and_loads_back_the_same(files, tmp_path):
    """``save_lora_weights(format="kohya")`` writes the checkpoint's names (``lora_unet_layers_0_cross_attn_q_proj``), as the
    family's trainers do, and the file loads back to the same output."""
    from safetensors.torch import load_file

    paths, base = files
    model = lora_loader.attach(tiny_ace_step(0))
    model.load_lora_weights(paths["diffusers"], adapter_name="k")
    saved = model.save_lora_weights(tmp_path / "kohya.safetensors", "k", format="kohya")
    assert "lora_unet_layers_0_cross_attn_q_proj.lora_down.weight" in load_file(saved)
    again = lora_loader.attach(tiny_ace_step(0))
    again.load_lora_weights(saved, adapter_name="k")
    assert_close(ace_step_output(again), ace_step_output(model), base)
