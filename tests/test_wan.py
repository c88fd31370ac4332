"""Wan 2.1 / 2.2 (T2V, I2V, both experts), VACE, SkyReels-V2 and Helios: every layout their LoRAs come in.

One LoRA, made by PEFT on diffusers' module names, is written the way each producer writes it:
diffusers (``save_lora_weights``, rank and alpha in the header), ComfyUI / Kijai / LightX2V
(``diffusion_model.<original name>.lora_down.weight`` + ``.alpha``), diffusion-pipe and ai-toolkit
(``diffusion_model.<original name>.lora_A.weight``, alpha = rank), musubi-tuner
(``lora_unet_blocks_0_self_attn_q`` + ``.alpha``), DiffSynth-Studio (bare original names with PEFT's
``.default.``), Kohya files in diffusers' names. The oracle is diffusers+peft loading the same file into
an identical model wherever diffusers reads the layout (its Wan converters), else the diffusers-layout
file of the same factors (PEFT on diffusers' names): outputs agree to 1e-4 and the LoRA moves them.
LightX2V's extracted LoRAs (``diff_b`` on biases, ``diff`` on norms, the patch embedding and the head,
``diff_m`` on the modulations), LoHa, LoKr and DoRA, which diffusers drops or refuses, are compared
with a merge of the file's own tensors into the weights, computed here.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig
from producers import add_peft_adapter, save_diffusers_lora, save_state_dict
from safetensors.torch import save_file
from tiny_wan import DIM, I2V_TARGETS, T2V_TARGETS, original_name, tiny_wan, tiny_wan_pipeline, wan_output

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RANK, ALPHA = 4, 2.0  # scale 0.5: exact in bf16 too, so diffusers' alpha folding loses nothing
TOLERANCE = 1e-4
MOVED = 1e-3
TOP_TARGETS = ["proj_out", "condition_embedder.time_proj", "condition_embedder.time_embedder.linear_1",
               "condition_embedder.time_embedder.linear_2", "condition_embedder.text_embedder.linear_1",
               "condition_embedder.text_embedder.linear_2"]  # fmt: skip
IMAGE_TARGETS = ["condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2"]


def assert_close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE, (got - want).abs().max()


# -- producers: one PEFT LoRA, spelled as each trainer writes it ----------------------------------------------------


def peft_lora(targets=T2V_TARGETS, seed: int = 1, i2v: bool = False) -> tuple[dict, LoraConfig]:
    """PEFT's state dict (``blocks.0.attn1.to_q.lora_A.weight``, ...) of a fresh rank-4, alpha-2 adapter."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    return add_peft_adapter(tiny_wan(0, i2v), config), config


def factors(sd: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{diffusers path: (lora_A, lora_B)}``."""
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {p: (sd[f"{p}.lora_A.weight"], sd[f"{p}.lora_B.weight"]) for p in paths}


def comfyui_alpha(sd: dict, prefix: str = "diffusion_model.") -> dict:
    """ComfyUI / Kijai / LightX2V: original names, lora_down / lora_up and the alpha as a tensor."""
    out = {}
    for path, (a, b) in factors(sd).items():
        stem = prefix + original_name(path)
        out |= {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": torch.tensor(ALPHA)}
    return out


def peft_original(sd: dict, prefix: str = "diffusion_model.", infix: str = "") -> dict:
    """diffusion-pipe / ai-toolkit / musubi's converter (``diffusion_model.``), DiffSynth (no prefix, ``.default``):
    PEFT keys on the original names, no alpha (alpha = rank): lora_B carries the scale."""
    out = {}
    for path, (a, b) in factors(sd).items():
        stem = prefix + original_name(path)
        out |= {f"{stem}.lora_A{infix}.weight": a, f"{stem}.lora_B{infix}.weight": b * (ALPHA / RANK)}
    return out


def musubi(sd: dict) -> dict:
    """musubi-tuner's networks/lora.py: ``lora_unet_`` + the original name underscored, alpha a 0-d tensor."""
    out = {}
    for path, (a, b) in factors(sd).items():
        stem = "lora_unet_" + original_name(path).replace(".", "_")
        out |= {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": torch.tensor(ALPHA)}
    return out


def kohya_diffusers_names(sd: dict, prefix: str) -> dict:
    """diffusers' convert_state_dict_to_kohya (``lora_unet_``) / OneTrainer (``lora_transformer_``): diffusers' names."""
    out = {}
    for path, (a, b) in factors(sd).items():
        stem = prefix + path.replace(".", "_")
        out |= {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": torch.tensor(ALPHA)}
    return out


MUSUBI_HEADER = {"ss_base_model_version": "wan", "modelspec.architecture": "wan2.1/lora", "ss_network_dim": "4"}


def write(layout: str, sd: dict, config: LoraConfig, directory) -> str:
    """The file (or folder) ``layout``'s producer writes for the PEFT adapter ``sd``."""
    directory = os.fspath(directory)
    if layout == "diffusers":
        from diffusers import WanPipeline

        return save_diffusers_lora(directory, WanPipeline, {"transformer": sd}, {"transformer": config}, "diffusers.safetensors")
    if layout == "diffusion-pipe":  # a folder: adapter_config.json (alpha = rank) + adapter_model.safetensors
        folder = os.path.join(directory, "diffusion-pipe")
        os.makedirs(folder)
        targets = sorted({original_name(p) for p in factors(sd)})
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets).save_pretrained(folder)
        save_file(peft_original(sd), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        return folder
    writers = {
        "comfyui": comfyui_alpha,
        "ai-toolkit": peft_original,
        "transformer-prefix": lambda s: peft_original(s, prefix="transformer."),
        "diffsynth": lambda s: peft_original(s, prefix="", infix=".default"),
        "peft-original": lambda s: peft_original(s, prefix="base_model.model."),
        "musubi": musubi,
        "videox-fun": lambda s: {k.replace("lora_unet_", "lora_unet__"): v for k, v in musubi(s).items()},
        "kohya-diffusers-names": lambda s: kohya_diffusers_names(s, "lora_unet_"),
        "onetrainer": lambda s: kohya_diffusers_names(s, "lora_transformer_"),
    }
    path = os.path.join(directory, f"{layout}.safetensors")
    save_file({k: v.contiguous() for k, v in writers[layout](sd).items()}, path, metadata=MUSUBI_HEADER if layout == "musubi" else None)
    return path


# layout -> (lora_loader's format name, whether diffusers' Wan loader reads it)
LAYOUTS = {
    "diffusers": ("diffusers", True),
    "comfyui": ("comfyui", True),
    "ai-toolkit": ("comfyui", True),
    "diffusion-pipe": ("comfyui", True),
    "musubi": ("kohya", True),
    "videox-fun": ("kohya", False),  # lora_unet__blocks_0_...: the doubled separator VideoX-Fun writes
    "transformer-prefix": ("diffusers", False),
    "diffsynth": ("diffusers", False),
    "peft-original": ("peft", False),  # PEFT's own save of the original model (base_model.model.blocks.0.self_attn.q)
    "kohya-diffusers-names": ("kohya", False),
    "onetrainer": ("kohya", False),
}


def diffusers_load(pipe, source, **kwargs):
    """diffusers' own load_lora_weights (a folder is diffusion-pipe's, whose file has its own name)."""
    if os.path.isdir(source):
        kwargs["weight_name"] = "adapter_model.safetensors"
    pipe.load_lora_weights(source, **kwargs)


def read_tensors(source) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = os.path.join(source, "adapter_model.safetensors") if os.path.isdir(source) else source
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


# -- every layout of one LoRA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2v_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wan")
    sd, config = peft_lora()
    files = {layout: write(layout, sd, config, directory) for layout in LAYOUTS}
    ref = tiny_wan_pipeline(two_experts=False)
    base = wan_output(ref.transformer)
    ref.load_lora_weights(files["diffusers"], adapter_name="d")
    return files, base, wan_output(ref.transformer)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_gives_the_output_of_the_same_lora_in_diffusers_and_peft(layout, t2v_files):
    files, base, expected = t2v_files
    fmt, diffusers_reads = LAYOUTS[layout]
    if diffusers_reads:  # the file is spelled as diffusers' own converter expects that producer's files
        theirs = tiny_wan_pipeline(two_experts=False)
        diffusers_load(theirs, files[layout], adapter_name="t")
        assert_close(wan_output(theirs.transformer), expected, base)
    pipe = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    report = pipe.load_lora_weights(files[layout], adapter_name="w")
    assert report.format == fmt and report.modules == {"transformer": 2 * len(T2V_TARGETS)} and not report.skipped
    assert_close(wan_output(pipe.transformer), expected, base)
    tensors, metadata = read_tensors(files[layout])
    assert detect_family(convert(tensors, metadata).deltas, metadata)[0] == "wan"


@pytest.mark.parametrize("layout", ["musubi", "comfyui"])
def test_lora_loader_inspect_names_wan(layout, t2v_files, capsys):
    from lora_loader.cli import main

    assert main(["inspect", t2v_files[0][layout], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "wan" and info["unknown_keys"] == {}, info


def test_the_header_names_wan_when_the_names_cannot():
    from lora_loader.families import family_from_metadata

    for header in (MUSUBI_HEADER, {"modelspec.architecture": "wan2.1/lora"}, {"ss_base_model_version": "wan_2.2_14b"},
                   {"lora_loader.base_model": "WanTransformer3DModel"}):
        assert family_from_metadata(header) == "wan", header


# -- I2V: the image projections, and a T2V LoRA on an I2V model ---------------------------------------------------


def test_an_i2v_lora_in_original_names_gives_what_diffusers_gives(tmp_path):
    """k_img / v_img, the image embedder and the top-level linears, as diffusion-pipe / ai-toolkit write them."""
    sd, _ = peft_lora(I2V_TARGETS + TOP_TARGETS + IMAGE_TARGETS, seed=2, i2v=True)
    path = save_state_dict(peft_original(sd), tmp_path / "i2v.safetensors")
    theirs = tiny_wan_pipeline(two_experts=False, i2v=True)
    base = wan_output(theirs.transformer, i2v=True)
    theirs.load_lora_weights(path, adapter_name="t")
    mine = lora_loader.attach(tiny_wan_pipeline(two_experts=False, i2v=True))
    report = mine.load_lora_weights(path, adapter_name="i")
    assert report.modules == {"transformer": len(factors(sd))} and not report.skipped
    assert_close(wan_output(mine.transformer, i2v=True), wan_output(theirs.transformer, i2v=True), base)


def test_a_t2v_lora_on_an_i2v_model_loads_as_diffusers_zero_padded_one_does(t2v_files):
    """diffusers pads add_k_proj / add_v_proj with zero LoRAs: the same output as leaving them alone."""
    files, _, _ = t2v_files
    theirs = tiny_wan_pipeline(two_experts=False, i2v=True)
    base = wan_output(theirs.transformer, i2v=True)
    theirs.load_lora_weights(files["comfyui"], adapter_name="t")
    assert any("add_k_proj.lora_A" in n for n, _ in theirs.transformer.named_parameters())  # the zero padding
    mine = lora_loader.attach(tiny_wan_pipeline(two_experts=False, i2v=True))
    assert mine.load_lora_weights(files["comfyui"], adapter_name="m").modules == {"transformer": 2 * len(T2V_TARGETS)}
    assert_close(wan_output(mine.transformer, i2v=True), wan_output(theirs.transformer, i2v=True), base)


def test_i2v_keys_on_a_t2v_model_are_an_error_naming_them_or_the_report_of_strict_false(tmp_path):
    sd, _ = peft_lora(I2V_TARGETS, seed=3, i2v=True)
    path = save_state_dict(comfyui_alpha(sd), tmp_path / "i2v.safetensors")
    image_keys = sorted(k for k in comfyui_alpha(sd) if "_img." in k)
    pipe = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base = wan_output(pipe.transformer)
    with pytest.raises(LoraError, match=r"diffusion_model\.blocks\.0\.cross_attn\.k_img\.lora_down\.weight") as err:
        pipe.load_lora_weights(path, adapter_name="x")
    assert "add_k_proj" in str(err.value)
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert pipe.get_list_adapters() == {} and torch.equal(wan_output(pipe.transformer), base)
    with pytest.warns(lora_loader.LoraWarning, match="cross_attn.v_img"):
        report = pipe.load_lora_weights(path, adapter_name="x", strict=False)
    assert sorted(report.skipped) == image_keys and report.modules == {"transformer": 2 * len(T2V_TARGETS)}
    theirs = tiny_wan_pipeline(two_experts=False)  # diffusers loads the rest too (and drops the image keys)
    theirs.load_lora_weights(path, adapter_name="t")
    assert_close(wan_output(pipe.transformer), wan_output(theirs.transformer), base)


def test_a_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(t2v_files):
    tensors, _ = read_tensors(t2v_files[0]["musubi"])
    tensors = dict(tensors)
    tensors["lora_unet_blocks_7_self_attn_q.lora_down.weight"] = torch.ones(RANK, DIM)
    tensors["lora_unet_blocks_7_self_attn_q.lora_up.weight"] = torch.ones(DIM, RANK)
    model = lora_loader.attach(tiny_wan())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match="lora_unet_blocks_7_self_attn_q.lora_down.weight"):
        model.load_lora_weights(tensors, adapter_name="x")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before) and model.get_list_adapters() == {}
    with pytest.warns(lora_loader.LoraWarning):
        report = model.load_lora_weights(tensors, adapter_name="x", strict=False)
    assert sorted(report.skipped) == ["lora_unet_blocks_7_self_attn_q.lora_down.weight", "lora_unet_blocks_7_self_attn_q.lora_up.weight"]


# -- Wan 2.2: two experts ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    """A high-noise and a low-noise LoRA, as the Lightning / ai-toolkit Wan 2.2 pairs come (two ComfyUI files)."""
    directory = tmp_path_factory.mktemp("experts")
    return [save_state_dict(comfyui_alpha(peft_lora(seed=seed)[0]), directory / f"{name}.safetensors")
            for seed, name in ((4, "high_noise"), (5, "low_noise"))]  # fmt: skip


def outputs(pipe) -> list[torch.Tensor]:
    return [wan_output(pipe.transformer), wan_output(pipe.transformer_2)]


def test_each_expert_gets_its_own_file_as_with_diffusers(expert_files):
    high, low = expert_files
    theirs = tiny_wan_pipeline()
    base = outputs(theirs)
    theirs.load_lora_weights(high, adapter_name="hi")
    theirs.load_lora_weights(low, adapter_name="lo", load_into_transformer_2=True)
    mine = lora_loader.attach(tiny_wan_pipeline())
    assert mine.load_lora_weights(high, adapter_name="hi").modules == {"transformer": 20}
    assert mine.load_lora_weights(low, adapter_name="lo", load_into_transformer_2=True).modules == {"transformer_2": 20}
    assert mine.get_list_adapters() == {"transformer": ["hi"], "transformer_2": ["lo"]}
    for got, want, b in zip(outputs(mine), outputs(theirs), base):
        assert_close(got, want, b)


def test_one_adapter_in_both_experts_takes_a_weight_per_expert(expert_files):
    high, low = expert_files
    theirs = tiny_wan_pipeline()
    base = outputs(theirs)
    theirs.load_lora_weights(high, adapter_name="x")
    theirs.load_lora_weights(low, adapter_name="x", load_into_transformer_2=True)
    theirs.set_adapters("x", {"transformer": 1.0, "transformer_2": 0.5})
    mine = lora_loader.attach(tiny_wan_pipeline())
    mine.load_lora_weights(high, adapter_name="x")
    mine.load_lora_weights(low, adapter_name="x", load_into_transformer_2=True)
    mine.set_adapters("x", {"transformer": 1.0, "transformer_2": 0.5})
    for got, want, b in zip(outputs(mine), outputs(theirs), base):
        assert_close(got, want, b)
    full = lora_loader.attach(tiny_wan_pipeline())  # the 0.5 reaches transformer_2 only
    full.load_lora_weights(low, adapter_name="x", load_into_transformer_2=True)
    assert (wan_output(full.transformer_2) - outputs(mine)[1]).abs().max() > MOVED


def test_load_into_transformer_2_on_wan_2_1_is_an_error(expert_files):
    pipe = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    with pytest.raises(LoraError, match="transformer_2"):
        pipe.load_lora_weights(expert_files[1], adapter_name="lo", load_into_transformer_2=True)
    assert pipe.get_list_adapters() == {}


# -- blends, disable, fuse ------------------------------------------------------------------------------------------


def test_a_blend_of_two_layouts_gives_what_diffusers_gives(t2v_files, expert_files):
    files, _, _ = t2v_files
    theirs = tiny_wan_pipeline(two_experts=False)
    base = wan_output(theirs.transformer)
    mine = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    for pipe in (theirs, mine):
        diffusers_load(pipe, files["diffusion-pipe"], adapter_name="a")
        pipe.load_lora_weights(expert_files[0], adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(wan_output(mine.transformer), wan_output(theirs.transformer), base)


def test_disable_is_exact_and_fuse_unfuse_restores_every_weight(t2v_files, expert_files):
    pipe = lora_loader.attach(tiny_wan_pipeline())
    weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in (pipe.transformer, pipe.transformer_2)]
    base = outputs(pipe)
    pipe.load_lora_weights(t2v_files[0]["musubi"], adapter_name="a")
    pipe.load_lora_weights(expert_files[1], adapter_name="a", load_into_transformer_2=True)
    pipe.set_adapters("a", {"transformer": 0.8, "transformer_2": 0.6})
    unfused = outputs(pipe)
    pipe.disable_lora()
    assert all(torch.equal(got, want) for got, want in zip(outputs(pipe), base))
    pipe.enable_lora()
    pipe.fuse_lora(components=["transformer", "transformer_2"])
    for got, want, b in zip(outputs(pipe), unfused, base):
        assert_close(got, want, b)
    pipe.unfuse_lora(components=["transformer", "transformer_2"])
    for model, before in zip((pipe.transformer, pipe.transformer_2), weights):
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    pipe.unload_lora_weights()
    assert all(torch.equal(got, want) for got, want in zip(outputs(pipe), base))


# -- LightX2V / Lightning: diff_b, diff, diff_m -----------------------------------------------------------------------


def lightx2v_lora(sd: dict, model, full: bool) -> dict:
    """A LoRA as LightX2V's tools/extract/lora_extractor.py writes it: big weights as lora_down / lora_up (Kijai's
    copies add ``.alpha``), every bias as ``diff_b``, small weights (the head) as ``diff``; with ``full``, also what
    diffusers drops: the norms' ``diff`` / ``diff_b``, the patch embedding's, and ``diff_m`` for the modulations."""
    g = torch.Generator().manual_seed(11)
    params = dict(model.named_parameters())

    def rnd(shape):
        return torch.randn(shape, generator=g) * 0.1

    out = comfyui_alpha({k: v for k, v in sd.items() if k.startswith("blocks.")})
    for path, (down, up) in factors(sd).items():  # LightX2V's own files have no alpha (diffusers reads none up here)
        if not path.startswith("blocks."):
            stem = "diffusion_model." + original_name(path)
            out |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up * (ALPHA / RANK)}
    for path in factors(sd):
        out[f"diffusion_model.{original_name(path)}.diff_b"] = rnd(params[f"{path}.bias"].shape)
    out["diffusion_model.head.head.diff"] = rnd(params["proj_out.weight"].shape)
    out["diffusion_model.head.head.diff_b"] = rnd(params["proj_out.bias"].shape)
    if full:
        for name, p in params.items():
            owner, _, kind = name.rpartition(".")
            is_norm = any(n in owner for n in ("norm2", "norm_q", "norm_k", "norm_added_k", "image_embedder.norm"))
            if kind == "scale_shift_table":
                stem = owner or "head"  # blocks.N.modulation -> blocks.N.diff_m; head.modulation -> head.diff_m
                out[f"diffusion_model.{stem}.diff_m"] = rnd(p.shape)
            elif owner == "patch_embedding" or is_norm:
                out[f"diffusion_model.{original_name(owner)}.{'diff' if kind == 'weight' else 'diff_b'}"] = rnd(p.shape)
    return out


def merged_model(tensors: dict, i2v: bool, weight: float = 1.0):
    """The base model with the file's tensors merged into its weights: W + w (alpha / r) up @ down, b + w diff_b,
    W + w diff, modulation + w diff_m. Independent of lora_loader: names by tiny_wan's transcription."""
    model = tiny_wan(0, i2v)
    params = dict(model.named_parameters())
    modules = {name.rpartition(".")[0] for name in params if name.endswith((".weight", ".bias"))}
    by_original = {original_name(m): m for m in modules if _has_original(m)}
    with torch.no_grad():
        for key, tensor in tensors.items():
            key = key.removeprefix("diffusion_model.")
            if key.endswith(".lora_down.weight"):
                stem = key.removesuffix(".lora_down.weight")
                up = tensors[f"diffusion_model.{stem}.lora_up.weight"]
                alpha = float(tensors.get(f"diffusion_model.{stem}.alpha", RANK))
                params[by_original[stem] + ".weight"] += weight * alpha / RANK * up @ tensor
            elif key.endswith(".diff_m"):
                stem = key.removesuffix(".diff_m")
                params["scale_shift_table" if stem == "head" else f"{stem}.scale_shift_table"] += weight * tensor
            elif key.endswith(".diff"):
                params[by_original[key.removesuffix(".diff")] + ".weight"] += weight * tensor
            elif key.endswith(".diff_b"):
                params[by_original[key.removesuffix(".diff_b")] + ".bias"] += weight * tensor
    return model


def _has_original(path: str) -> bool:
    try:
        original_name(path)
    except KeyError:
        return False
    return True


def test_lora_with_diff_b_and_a_head_diff_gives_what_diffusers_gives(tmp_path):
    """diffusers converts diff_b to lora_B.bias and head.head.diff to a LoRA with an identity up: both applied."""
    sd, _ = peft_lora(T2V_TARGETS + ["condition_embedder.time_proj"], seed=6)
    path = save_state_dict(lightx2v_lora(sd, tiny_wan(), full=False), tmp_path / "lightx2v.safetensors")
    theirs = tiny_wan_pipeline(two_experts=False)
    base = wan_output(theirs.transformer)
    theirs.load_lora_weights(path, adapter_name="t")
    mine = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    mine.load_lora_weights(path, adapter_name="l")
    assert_close(wan_output(mine.transformer), wan_output(theirs.transformer), base)


def test_a_lightx2v_extract_applies_every_tensor_diffusers_drops(tmp_path):
    """Norm diffs (LayerNorm, RMSNorm), the Conv3d patch embedding, diff_m on the modulations: each one applied,
    at the blend weight too, disabled exactly, fused and unfused bit for bit."""
    sd, _ = peft_lora(I2V_TARGETS + ["condition_embedder.time_proj"] + IMAGE_TARGETS, seed=7, i2v=True)
    tensors = lightx2v_lora(sd, tiny_wan(0, i2v=True), full=True)
    assert {"diffusion_model.blocks.1.diff_m", "diffusion_model.head.diff_m", "diffusion_model.patch_embedding.diff",
            "diffusion_model.blocks.0.norm3.diff_b", "diffusion_model.blocks.0.self_attn.norm_q.diff",
            "diffusion_model.blocks.0.cross_attn.norm_k_img.diff", "diffusion_model.img_emb.proj.4.diff_b"} <= tensors.keys()
    path = save_state_dict(tensors, tmp_path / "lightx2v.safetensors")
    model = lora_loader.attach(tiny_wan(0, i2v=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = wan_output(model, i2v=True)
    report = model.load_lora_weights(path, adapter_name="x")
    assert not report.skipped and report.format == "comfyui"
    assert_close(wan_output(model, i2v=True), wan_output(merged_model(tensors, True), i2v=True), base)
    model.set_adapters("x", 0.5)
    half = wan_output(model, i2v=True)
    assert_close(half, wan_output(merged_model(tensors, True, 0.5), i2v=True), base)
    model.disable_lora()
    assert torch.equal(wan_output(model, i2v=True), base)
    model.enable_lora()
    model.fuse_lora()
    assert_close(wan_output(model, i2v=True), half, base)
    model.unfuse_lora()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    model.unload_lora_weights()
    assert torch.equal(wan_output(model, i2v=True), base)
    assert type(model.blocks[0]).__name__ == "WanTransformerBlock" and not hasattr(model.blocks[0], "lora_params")


def test_diff_m_takes_block_weights_by_path_and_a_mixed_batch_refuses_it():
    sd, _ = peft_lora(seed=8)
    tensors = {k: v for k, v in lightx2v_lora(sd, tiny_wan(), full=True).items() if k.endswith("diff_m")}
    assert len(tensors) == 3  # two blocks and the head
    pipe = lora_loader.attach(tiny_wan_pipeline(two_experts=False))
    base = wan_output(pipe.transformer)
    assert pipe.load_lora_weights(tensors, adapter_name="m").modules == {"transformer": 3}
    pipe.set_adapters("m", {"transformer": {"blocks.1": 0.0}})  # block 0's and the head's modulation diffs
    kept = {k: v for k, v in tensors.items() if ".blocks.1." not in k}
    assert_close(wan_output(pipe.transformer), wan_output(merged_model(kept, False)), base)
    with pytest.raises(LoraError, match="diff_m"):
        wan_output(pipe.transformer, adapter_names=["m"])


# -- LyCORIS kinds: musubi's LoHa and LoKr, ai-toolkit's LoKr and DoRA, LyCORIS' dora_scale ---------------------------


def _shape(model, path: str) -> tuple[int, int]:
    return tuple(dict(model.named_modules())[path].weight.shape)


def _halves(n: int) -> tuple[int, int]:
    """musubi's / LyCORIS' factorization of a width into two factors (4 x 6 for 24, 4 x 8 for 32)."""
    return (4, n // 4)


def lycoris_file(kind: str, model, g) -> tuple[dict, dict]:
    """``(file, {diffusers path: dense delta at weight 1})`` of a LoHa / LoKr / DoRA on every T2V target."""
    sd, deltas = {}, {}
    for i in range(2):
        for target in T2V_TARGETS:
            path = f"blocks.{i}.{target}"
            out_f, in_f = _shape(model, path)
            r = 2

            def rnd(*shape):
                return torch.randn(*shape, generator=g) * 0.3

            if kind == "musubi-loha":  # lora_unet_<original>.hada_w1_a ... + alpha: scale alpha / r
                stem = "lora_unet_" + original_name(path).replace(".", "_")
                f = {"hada_w1_a": rnd(out_f, r), "hada_w1_b": rnd(r, in_f), "hada_w2_a": rnd(out_f, r), "hada_w2_b": rnd(r, in_f)}
                deltas[path] = ALPHA / r * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
            elif kind == "musubi-lokr":  # lokr_w1 full, lokr_w2 low-rank: scale alpha / r
                stem = "lora_unet_" + original_name(path).replace(".", "_")
                (out_l, out_k), (in_m, in_n) = _halves(out_f), _halves(in_f)
                f = {"lokr_w1": rnd(out_l, in_m), "lokr_w2_a": rnd(out_k, r), "lokr_w2_b": rnd(r, in_n)}
                deltas[path] = ALPHA / r * torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])
            elif kind in ("ai-toolkit-lokr", "ai-toolkit-old-lokr"):  # both factors full: scale 1 (ai-toolkit writes rank)
                stem = "diffusion_model." + original_name(path)
                if kind == "ai-toolkit-old-lokr":  # lycoris_ + its convert_to_original on an underscored name
                    stem = "lycoris_" + path.replace(".", "_").replace("attn1", "self_attn").replace("attn2", "cross_attn")
                    stem = stem.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                (out_l, out_k), (in_m, in_n) = _halves(out_f), _halves(in_f)
                f = {"lokr_w1": rnd(out_l, in_m), "lokr_w2": rnd(out_k, in_n)}
                deltas[path] = torch.kron(f["lokr_w1"], f["lokr_w2"])
            else:  # "dora-scale": LyCORIS' DoRA on a LoRA pair (ComfyUI names): rows rescaled to dora_scale
                stem = "diffusion_model." + original_name(path)
                f = {"lora_down.weight": rnd(r, in_f), "lora_up.weight": rnd(out_f, r), "dora_scale": 1 + rnd(out_f, 1)}
                weight = dict(model.named_modules())[path].weight.detach()
                combined = weight + ALPHA / r * f["lora_up.weight"] @ f["lora_down.weight"]
                norm = combined.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
                deltas[path] = combined * (f["dora_scale"] / norm) - weight
            sd |= {f"{stem}.{k}": v for k, v in f.items()} | {f"{stem}.alpha": torch.tensor(float(r) if "ai-toolkit" in kind else ALPHA)}
    return sd, deltas


@pytest.mark.parametrize("kind", ["musubi-loha", "musubi-lokr", "ai-toolkit-lokr", "ai-toolkit-old-lokr", "dora-scale"])
def test_lycoris_kinds_in_wan_names_give_their_merged_weights(kind):
    model = lora_loader.attach(tiny_wan())
    sd, deltas = lycoris_file(kind, model, torch.Generator().manual_seed(12))
    merged = tiny_wan()
    with torch.no_grad():
        for path, delta in deltas.items():
            dict(merged.named_modules())[path].weight += delta
    base = wan_output(model)
    report = model.load_lora_weights(sd, adapter_name="l")
    assert report.modules == {"model": len(deltas)} and not report.skipped
    assert_close(wan_output(model), wan_output(merged), base)
    assert detect_family(convert(sd).deltas)[0] == "wan"


def test_ai_toolkits_dora_gives_peft_doras_output():
    """ai-toolkit's DoRA in Wan's names: lora_A / lora_B (alpha = rank) and PEFT's per-row ``.magnitude``."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=T2V_TARGETS, use_dora=True, init_lora_weights=False)
    torch.manual_seed(13)
    ref = tiny_wan()
    base = wan_output(ref)
    add_peft_adapter(ref, config)
    with torch.no_grad():  # PEFT starts the magnitude at ||W + sBA||: move it, or DoRA changes nothing
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape))
    from peft.utils import get_peft_model_state_dict

    peft_sd = get_peft_model_state_dict(ref)
    sd = {}
    for path in sorted({k.rsplit(".lora_", 1)[0] for k in peft_sd}):
        stem = "diffusion_model." + original_name(path)
        sd[f"{stem}.lora_A.weight"] = peft_sd[f"{path}.lora_A.weight"]
        sd[f"{stem}.lora_B.weight"] = peft_sd[f"{path}.lora_B.weight"] * (ALPHA / RANK)
        sd[f"{stem}.magnitude"] = peft_sd[f"{path}.lora_magnitude_vector"]
    model = lora_loader.attach(tiny_wan())
    assert model.load_lora_weights(sd, adapter_name="d").modules == {"model": 2 * len(T2V_TARGETS)}
    assert_close(wan_output(model), wan_output(ref), base)


# -- the pipelines that share Wan's transformer ---------------------------------------------------------------------


def _skyreels():
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel
    from tiny_wan import WAN_CONFIG, randomize

    cfg = dict(WAN_CONFIG, in_channels=4, out_channels=4, text_dim=16)
    inputs = lambda g: dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=g), timestep=torch.tensor([500]),  # noqa: E731
                            encoder_hidden_states=torch.randn(1, 12, 16, generator=g))  # fmt: skip
    return SkyReelsV2Pipeline, lambda: randomize(SkyReelsV2Transformer3DModel(**cfg), 0), inputs


def _helios():
    from diffusers import HeliosPipeline, HeliosTransformer3DModel
    from tiny_wan import WAN_CONFIG, randomize

    cfg = {k: v for k, v in WAN_CONFIG.items() if k != "rope_max_seq_len"} | dict(
        in_channels=4, out_channels=4, text_dim=16, rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
        guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False,
    )  # fmt: skip

    def inputs(g):
        history = {n: torch.randn(1, 4, f, 16, 16, generator=g) for n, f in (("short", 1), ("mid", 1), ("long", 4))}
        return dict(
            hidden_states=torch.randn(1, 4, 2, 16, 16, generator=g), timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 12, 16, generator=g), indices_hidden_states=torch.ones(1, 2),
            indices_latents_history_short=torch.ones(1, 1), indices_latents_history_mid=torch.ones(1, 1),
            indices_latents_history_long=torch.ones(1, 4),
            **{f"latents_history_{n}": t for n, t in history.items()},
        )  # fmt: skip

    return HeliosPipeline, lambda: randomize(HeliosTransformer3DModel(**cfg), 0), inputs


@pytest.mark.parametrize("family", ["skyreels-v2", "helios"])
def test_wan_derived_transformers_load_original_names_as_their_diffusers_loader_does(family, tmp_path):
    pipeline_cls, make, make_inputs = {"skyreels-v2": _skyreels, "helios": _helios}[family]()

    def output(model):
        with torch.no_grad():
            return model(**make_inputs(torch.Generator().manual_seed(3))).sample

    torch.manual_seed(14)
    sd = add_peft_adapter(make(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=T2V_TARGETS, init_lora_weights=False))
    path = save_state_dict(comfyui_alpha(sd), tmp_path / f"{family}.safetensors")
    ref = make()
    base = output(ref)
    pipeline_cls.load_lora_into_transformer(pipeline_cls.lora_state_dict(path), transformer=ref, adapter_name="t")
    model = lora_loader.attach(make())
    assert model.load_lora_weights(path, adapter_name="s").modules == {"model": 2 * len(T2V_TARGETS)}
    assert_close(output(model), output(ref), base)


def test_vace_control_blocks_in_original_names_give_peft_output(tmp_path):
    """VACE's vace_blocks (before_proj / after_proj and a full block each), which diffusers' converter refuses."""
    from diffusers import WanVACETransformer3DModel
    from tiny_wan import WAN_CONFIG, randomize

    def make():
        return randomize(WanVACETransformer3DModel(**dict(WAN_CONFIG, num_layers=4), vace_layers=[0, 2], vace_in_channels=48), 0)

    def output(model):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return model(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
                         encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                         control_hidden_states=torch.randn(1, 48, 2, 4, 4, generator=g)).sample  # fmt: skip

    targets = [f"vace_blocks.{i}.{t}" for i in range(2) for t in T2V_TARGETS] + ["vace_blocks.0.proj_in", "vace_blocks.0.proj_out",
               "vace_blocks.1.proj_out", "blocks.3.attn1.to_q"]  # fmt: skip
    ref = make()
    base = output(ref)
    torch.manual_seed(15)
    sd = add_peft_adapter(ref, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False))
    vace = {"proj_in": "before_proj", "proj_out": "after_proj"}
    tensors = {}
    for path, (a, b) in factors(sd).items():
        if path.startswith("vace_blocks."):
            _, i, rest = path.split(".", 2)
            name = f"vace_blocks.{i}.{vace.get(rest) or original_name('blocks.0.' + rest).split('.', 2)[2]}"
        else:
            name = original_name(path)
        tensors |= {f"diffusion_model.{name}.lora_down.weight": a, f"diffusion_model.{name}.lora_up.weight": b,
                    f"diffusion_model.{name}.alpha": torch.tensor(ALPHA)}  # fmt: skip
    assert "diffusion_model.vace_blocks.0.before_proj.alpha" in tensors and "diffusion_model.vace_blocks.1.cross_attn.o.alpha" in tensors
    model = lora_loader.attach(make())
    assert model.load_lora_weights(tensors, adapter_name="v").modules == {"model": len(targets)}
    assert_close(output(model), output(ref), base)


def test_a_diffusion_pipe_lokr_folder_gives_peft_lokrs_output(tmp_path):
    """diffusion-pipe's LoKr: PEFT's LoKrConfig (alpha = rank, as diffusion-pipe forces) saved beside
    ``diffusion_model.<original name>.lokr_w1`` / ``lokr_w2``, ``.default`` dropped."""
    import peft
    from peft.utils import get_peft_model_state_dict

    ref = tiny_wan()
    base = wan_output(ref)
    torch.manual_seed(16)
    peft.inject_adapter_in_model(peft.LoKrConfig(r=RANK, alpha=RANK, target_modules=T2V_TARGETS, init_weights=False), ref)
    sd = get_peft_model_state_dict(ref)
    tensors = {}
    for key, tensor in sd.items():
        path, _, factor = key.partition(".lokr_")
        tensors[f"diffusion_model.{original_name(path)}.lokr_{factor}"] = tensor
    targets = sorted({original_name(k.partition(".lokr_")[0]) for k in sd})
    peft.LoKrConfig(r=RANK, alpha=RANK, target_modules=targets).save_pretrained(tmp_path)
    save_file(tensors, os.fspath(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = lora_loader.attach(tiny_wan())
    assert model.load_lora_weights(os.fspath(tmp_path), adapter_name="k").modules == {"model": 2 * len(T2V_TARGETS)}
    assert_close(wan_output(model), wan_output(ref), base)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"alpha": 2 * RANK}))  # a scale the keys cannot say
    with pytest.raises(LoraError, match="alpha=8"):
        lora_loader.attach(tiny_wan()).load_lora_weights(os.fspath(tmp_path), adapter_name="k")


def test_a_diff_m_that_does_not_fit_its_modulation_is_refused_and_changes_nothing():
    model = lora_loader.attach(tiny_wan())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"diffusion_model.blocks.0.diff_m": torch.ones(1, 6, DIM + 1), "diffusion_model.blocks.1.diff_m": torch.ones(1, 6, DIM)}
    with pytest.raises(LoraError, match=r"diffusion_model\.blocks\.0\.diff_m.*\[1, 6, 25\]"):
        model.load_lora_weights(bad, adapter_name="x")
    lora_on_a_parameter = {"diffusion_model.blocks.0.modulation.lora_down.weight": torch.ones(RANK, DIM),
                           "diffusion_model.blocks.0.modulation.lora_up.weight": torch.ones(DIM, RANK)}  # fmt: skip
    with pytest.raises(LoraError, match="only a full diff"):
        model.load_lora_weights(lora_on_a_parameter, adapter_name="x")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before) and model.get_list_adapters() == {}
    assert type(model.blocks[0]).__name__ == "WanTransformerBlock" and not hasattr(model.blocks[0], "lora_params")
