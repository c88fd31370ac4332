"""SANA (and Sprint, SANA-Video), CogView4, AuraFlow, Kandinsky 5, ERNIE-Image, Cosmos Predict 2.5 and Bria Fibo 2:
the families whose diffusers loader converts nothing (ERNIE-Image's strips a ``base_model.model.`` / ``diffusion_model.``
prefix), so every producer writes diffusers' module names and differs only in prefix and suffix spelling.

Per family, one rank-4 LoRA on every ``nn.Linear`` of the tiny transformer (diffusers' test sizes), and on SANA's 1x1
``ff.conv_inverted`` / ``ff.conv_point`` (LoCon), is made by peft (``inject_adapter_in_model`` +
``get_peft_model_state_dict``) and written by the pipeline's ``save_lora_weights`` (the diffusers layout: diffusers'
training scripts, SimpleTuner, finetrainers), then spelled as the other producers write it: PEFT's ``save_pretrained``
(``base_model.model.``), ai-toolkit (``diffusion_model.`` + lora_A / lora_B), ComfyUI (``diffusion_model.`` + lora_down /
lora_up + alpha), OneTrainer (``lora_transformer_`` + mangled names), musubi-tuner / sd-scripts style (``lora_unet_``),
DiffSynth-Studio (``.lora_A.default.weight``), bare dotted paths with ``lora_down`` / ``lora_up`` / ``.alpha``.
Each is compared with a merge of the file's own tensors computed here (no lora_loader), and with diffusers+peft on the
same file wherever the family's ``lora_state_dict`` reads it (the diffusers layout always; ERNIE-Image's prefixes).
"""

from __future__ import annotations

import functools
import json
import os
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from producers import save_state_dict
from tiny_tail_c import MAKERS

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RANK, ALPHA = 4, 2.0  # scale 0.5
FAMILY_KEYS = {  # tiny model -> the family `detect_family` / `lora-loader inspect` names
    "sana": "sana", "sana-video": "sana", "cogview4": "cogview4", "auraflow": "auraflow", "kandinsky5": "kandinsky5",
    "ernie-image": "ernie-image", "cosmos": "cosmos", "bria-fibo2": "bria-fibo2", "amused": "amused",
    "rfd4-proteina": "rfd4-proteina",
}  # fmt: skip
_SANA_CONVS = re.compile(r"\.ff\.conv_(inverted|point)$")  # 1x1 convolutions: LoCon in Kohya files


def targets(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            or (isinstance(m, torch.nn.Conv2d) and _SANA_CONVS.search(name))]  # fmt: skip


def peft_pairs(family: str, seed: int) -> dict:
    """``{module path: (lora_A weight, lora_B weight)}`` as peft's own state dict gives them (conv: 4-D), seeded."""
    make = MAKERS[family][0]
    model = make(0)
    paths = targets(model)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=paths, init_lora_weights=False), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    state = get_peft_model_state_dict(model)
    return {p: (state[f"{p}.lora_A.weight"].clone(), state[f"{p}.lora_B.weight"].clone()) for p in paths}


def _spell(pairs: dict, stem, down: str, up: str, alpha: bool) -> dict:
    """Keyed as a producer writes it: ``stem(path)`` + suffixes; with ``alpha`` a 0-d alpha tensor beside them, else
    no alpha and ``B`` carrying the 0.5 scale (files without alphas are read at scale 1)."""
    out = {}
    for path, (a, b) in pairs.items():
        s = stem(path)
        out[s + down], out[s + up] = a.contiguous(), (b if alpha else b * (ALPHA / RANK)).contiguous()
        if alpha:
            out[s + ".alpha"] = torch.tensor(ALPHA)
    return out


def _mangle(path: str) -> str:
    return path.replace(".", "_")


LAYOUTS = {  # layout -> (writer of {path: (A, B)}, lora_loader's format name)
    "peft-save-pretrained": (lambda p: _spell(p, lambda s: "base_model.model." + s, ".lora_A.weight", ".lora_B.weight", False), "peft"),
    "ai-toolkit": (lambda p: _spell(p, lambda s: "diffusion_model." + s, ".lora_A.weight", ".lora_B.weight", False), "comfyui"),
    "comfyui": (lambda p: _spell(p, lambda s: "diffusion_model." + s, ".lora_down.weight", ".lora_up.weight", True), "comfyui"),
    "onetrainer": (lambda p: _spell(p, lambda s: "lora_transformer_" + _mangle(s), ".lora_down.weight", ".lora_up.weight", True), "kohya"),
    "kohya-unet": (lambda p: _spell(p, lambda s: "lora_unet_" + _mangle(s), ".lora_down.weight", ".lora_up.weight", True), "kohya"),
    "diffsynth": (lambda p: _spell(p, lambda s: s, ".lora_A.default.weight", ".lora_B.default.weight", False), "diffusers"),
    "dotted-lora-down": (lambda p: _spell(p, lambda s: s, ".lora_down.weight", ".lora_up.weight", True), "diffusers"),
}  # fmt: skip
# Layouts a family's diffusers loader reads besides its own (ERNIE-Image's loader rewrites these two prefixes).
DIFFUSERS_READS = {"ernie-image": ("peft-save-pretrained", "ai-toolkit")}


def header_scale(family: str) -> float:
    """The scale diffusers reads a diffusers-layout file at: peft's alpha / r from the header, where the family's
    ``save_lora_weights`` writes one (aMUSEd's, the SD mixin's, writes none: alpha = r)."""
    return 1.0 if family == "amused" else ALPHA / RANK


def write_diffusers(family: str, pairs: dict, path: str) -> str:
    """The pipeline's own ``save_lora_weights`` of peft's state dict, with peft's config in the header."""
    pipeline_cls = MAKERS[family][2]
    state = {f"{p}.lora_A.weight": a for p, (a, b) in pairs.items()} | {f"{p}.lora_B.weight": b for p, (a, b) in pairs.items()}
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(pairs))
    directory, name = os.path.split(path)
    header = {"transformer_lora_adapter_metadata": config.to_dict()} if header_scale(family) != 1.0 else {}
    pipeline_cls.save_lora_weights(directory, transformer_lora_layers=state, weight_name=name, **header)
    return path


def read(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


_SUFFIXES = {".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".lora_down.weight": "down",
             ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}  # fmt: skip
_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "lora_transformer_", "lora_unet_")


def independent_merge(family: str, tensors: dict, scale: float | None = None, weights=None) -> torch.Tensor:
    """The output of a fresh model whose weights get ``alpha / r * B @ A`` of each module of the raw file tensors
    (``scale`` overrides alpha / r: diffusers' header alpha); a mangled name found by comparing with the model's
    names with dots as underscores. ``weights``: several files' tensors as ``[(tensors, weight)]``."""
    make, output, _ = MAKERS[family]
    model = make(0)
    modules = dict(model.named_modules())
    mangled = {name.replace(".", "_"): name for name in modules if name}
    with torch.no_grad():
        for file, weight in weights or [(tensors, 1.0)]:
            groups: dict[str, dict] = {}
            for key, tensor in file.items():
                suffix = next(s for s in sorted(_SUFFIXES, key=len, reverse=True) if key.endswith(s))
                groups.setdefault(key[: -len(suffix)], {})[_SUFFIXES[suffix]] = tensor
            for stem, parts in groups.items():
                for prefix in _PREFIXES:
                    stem = stem.removeprefix(prefix)
                target = modules[stem] if stem in modules else modules[mangled[stem]]
                down, up = parts["down"].flatten(1), parts["up"].flatten(1)
                s = scale if scale is not None else (float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0)
                target.weight += weight * s * (up @ down).view(target.weight.shape)
    return output(model)


def diffusers_output(family: str, source, adapters=None) -> tuple[torch.Tensor, torch.nn.Module]:
    """diffusers+peft: the pipeline's ``lora_state_dict`` (its converter), then the transformer's ``load_lora_adapter``
    (what ``load_lora_weights`` does for the transformer); ``adapters``: ``[(source, name)]`` blended by weights."""
    make, output, pipeline_cls = MAKERS[family]
    model = make(0)
    for src, name in adapters or [(source, "d")]:
        read = pipeline_cls.lora_state_dict(src if isinstance(src, str) else dict(src), return_lora_metadata=True)
        state, metadata = read[0], read[-1]  # the SD mixin's (aMUSEd's) has the network alphas between
        model.load_lora_adapter(state, prefix="transformer", adapter_name=name, metadata=metadata)
    return output(model), model


def assert_close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, tolerance: float = 1e-4) -> None:
    assert (want - base).abs().max() > 1e-3, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= tolerance, (got - want).abs().max()


_FILES: dict = {}


def files(family: str, directory) -> dict:
    """Every layout of the family's seed-1 LoRA, and its diffusers layout of a seed-2 LoRA: ``{layout: path}``."""
    if family not in _FILES:
        os.makedirs(directory, exist_ok=True)
        pairs = peft_pairs(family, seed=1)
        paths = {"diffusers": write_diffusers(family, pairs, os.path.join(directory, "diffusers.safetensors")),
                 "diffusers-2": write_diffusers(family, peft_pairs(family, seed=2), os.path.join(directory, "second.safetensors"))}  # fmt: skip
        for layout, (writer, _) in LAYOUTS.items():
            paths[layout] = save_state_dict(writer(pairs), os.path.join(directory, f"{layout}.safetensors"))
        _FILES[family] = paths
    return _FILES[family]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tail_c")


@functools.cache
def base_output(family: str) -> torch.Tensor:
    make, output, _ = MAKERS[family]
    return output(make(0))


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_the_diffusers_layout_gives_what_diffusers_and_peft_give(family, root):
    path = files(family, root / family)["diffusers"]
    theirs, _ = diffusers_output(family, path)
    want = independent_merge(family, read(path), scale=header_scale(family))
    base = base_output(family)
    assert_close(theirs, want, base)  # the merge computed here is what diffusers+peft run
    model = lora_loader.attach(MAKERS[family][0](0))
    report = model.load_lora_weights(path, adapter_name="a")
    assert report.format == "diffusers" and not report.skipped
    assert_close(MAKERS[family][1](model), theirs, base)
    assert detect_family(convert(read(path)).deltas)[0] == FAMILY_KEYS[family]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_each_trainer_layout_gives_the_merge_of_its_own_tensors(family, layout, root):
    path = files(family, root / family)[layout]
    tensors = read(path)
    want = independent_merge(family, tensors)
    base = base_output(family)
    if layout in DIFFUSERS_READS.get(family, ()):
        assert_close(diffusers_output(family, tensors)[0], want, base)
    model = lora_loader.attach(MAKERS[family][0](0))
    report = model.load_lora_weights(path, adapter_name="a")
    assert report.format == LAYOUTS[layout][1] and not report.skipped
    assert_close(MAKERS[family][1](model), want, base)
    assert detect_family(convert(tensors).deltas)[0] == FAMILY_KEYS[family]


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_blend_disable_fuse_unfuse_and_unload(family, root):
    paths = files(family, root / family)
    make, output, _ = MAKERS[family]
    base = base_output(family)
    _, theirs = diffusers_output(family, None, adapters=[(paths["diffusers"], "a"), (paths["diffusers-2"], "b")])
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    model = lora_loader.attach(make(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_weights(paths["diffusers"], adapter_name="a")
    model.load_lora_weights(paths["onetrainer"] if family != "ernie-image" else paths["ai-toolkit"], adapter_name="b_own")
    model.delete_adapters("b_own")
    model.load_lora_weights(paths["diffusers-2"], adapter_name="b")
    model.set_adapters(["a", "b"], [0.7, 0.3])
    blended = output(model)
    assert_close(blended, output(theirs), base)
    model.disable_lora()
    assert torch.equal(output(model), base)
    model.enable_lora()
    model.fuse_lora()
    assert_close(output(model), blended, base)
    model.unfuse_lora()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.unload_lora_weights()
    assert torch.equal(output(model), base) and model.get_list_adapters() == {}


def _missing_block(path: str) -> str:
    """``path`` in a block index no tiny model has."""
    return re.sub(r"\.\d+\.", ".9.", path, count=1)


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_a_file_with_modules_the_model_lacks_is_refused_and_changes_nothing(family, root):
    path = files(family, root / family)["ai-toolkit"]
    tensors = read(path)
    block = next(k for k in tensors if re.search(r"\.\d+\.", k) and k.endswith(".lora_A.weight"))
    extra = [_missing_block(block), _missing_block(block).replace(".lora_A.", ".lora_B.")]
    tensors[extra[0]], tensors[extra[1]] = tensors[block].clone(), tensors[block.replace(".lora_A.", ".lora_B.")].clone()
    make, output, _ = MAKERS[family]
    model = lora_loader.attach(make(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match=re.escape(extra[0])):
        model.load_lora_weights(tensors, adapter_name="x")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.get_list_adapters() == {}
    with pytest.warns(lora_loader.LoraWarning):
        report = model.load_lora_weights(tensors, adapter_name="x", strict=False)
    assert sorted(report.skipped) == sorted(extra)
    assert_close(output(model), independent_merge(family, read(path)), base_output(family))


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_lora_loader_inspect_names_the_family(family, root, capsys):
    from lora_loader.cli import main

    for layout in ("diffusers", "onetrainer"):
        assert main(["inspect", files(family, root / family)[layout], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == FAMILY_KEYS[family], layout


@pytest.mark.parametrize("producer", ["lycoris", "ai-toolkit"])
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_lokr_gives_the_kronecker_merge_of_its_factors(family, producer):
    """LoKr as LyCORIS' wrapper writes it (``lycoris_<mangled path>.lokr_w1`` / ``lokr_w2_a`` / ``lokr_w2_b`` + alpha:
    SimpleTuner's LyCORIS option) and as ai-toolkit does (``diffusion_model.<path>.*``), on three linear modules:
    W + alpha / r * kron(w1, w2_a @ w2_b), computed here."""
    make, output, _ = MAKERS[family]
    modules = {n: m for n, m in make(0).named_modules() if isinstance(m, torch.nn.Linear) and min(m.weight.shape) % 4 == 0}
    chosen = [n for n in modules if re.search(r"\.\d+\.", n)][:3]
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for path in chosen:
        rows, cols = modules[path].weight.shape
        stem = "lycoris_" + _mangle(path) if producer == "lycoris" else "diffusion_model." + path
        tensors |= {f"{stem}.lokr_w1": torch.randn(4, 4, generator=g) * 0.3, f"{stem}.lokr_w2_a": torch.randn(rows // 4, 2, generator=g) * 0.3,
                    f"{stem}.lokr_w2_b": torch.randn(2, cols // 4, generator=g) * 0.3, f"{stem}.alpha": torch.tensor(1.0)}  # fmt: skip
    model = make(0)
    with torch.no_grad():
        weights = dict(model.named_modules())
        for path in chosen:
            stem = "lycoris_" + _mangle(path) if producer == "lycoris" else "diffusion_model." + path
            w1, w2a, w2b = (tensors[f"{stem}.{k}"] for k in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))
            weights[path].weight += 1.0 / 2 * torch.kron(w1, w2a @ w2b)
    want = output(model)
    mine = lora_loader.attach(make(0))
    report = mine.load_lora_weights(tensors, adapter_name="k")
    assert not report.skipped
    assert_close(output(mine), want, base_output(family))


# AuraFlow's checkpoint names (ComfyUI's model: ComfyUI's LoRA training and LoRA extraction write them), written here
# from ComfyUI's ``auraflow_to_diffusers``: diffusers path -> original name; the image stream of a double layer is w2.
_AURAFLOW_ORIGINAL = {
    "joint_transformer_blocks.0.attn.to_q": "double_layers.0.attn.w2q", "joint_transformer_blocks.0.attn.to_k": "double_layers.0.attn.w2k",
    "joint_transformer_blocks.0.attn.to_v": "double_layers.0.attn.w2v", "joint_transformer_blocks.0.attn.to_out.0": "double_layers.0.attn.w2o",
    "joint_transformer_blocks.0.attn.add_q_proj": "double_layers.0.attn.w1q", "joint_transformer_blocks.0.attn.add_k_proj": "double_layers.0.attn.w1k",
    "joint_transformer_blocks.0.attn.add_v_proj": "double_layers.0.attn.w1v", "joint_transformer_blocks.0.attn.to_add_out": "double_layers.0.attn.w1o",
    "joint_transformer_blocks.0.ff.linear_1": "double_layers.0.mlpX.c_fc1", "joint_transformer_blocks.0.ff.linear_2": "double_layers.0.mlpX.c_fc2",
    "joint_transformer_blocks.0.ff.out_projection": "double_layers.0.mlpX.c_proj",
    "joint_transformer_blocks.0.ff_context.linear_1": "double_layers.0.mlpC.c_fc1",
    "joint_transformer_blocks.0.ff_context.linear_2": "double_layers.0.mlpC.c_fc2",
    "joint_transformer_blocks.0.ff_context.out_projection": "double_layers.0.mlpC.c_proj",
    "joint_transformer_blocks.0.norm1.linear": "double_layers.0.modX.1", "joint_transformer_blocks.0.norm1_context.linear": "double_layers.0.modC.1",
    "single_transformer_blocks.0.attn.to_q": "single_layers.0.attn.w1q", "single_transformer_blocks.0.attn.to_k": "single_layers.0.attn.w1k",
    "single_transformer_blocks.0.attn.to_v": "single_layers.0.attn.w1v", "single_transformer_blocks.0.attn.to_out.0": "single_layers.0.attn.w1o",
    "single_transformer_blocks.0.ff.linear_1": "single_layers.0.mlp.c_fc1", "single_transformer_blocks.0.ff.linear_2": "single_layers.0.mlp.c_fc2",
    "single_transformer_blocks.0.ff.out_projection": "single_layers.0.mlp.c_proj", "single_transformer_blocks.0.norm1.linear": "single_layers.0.modCX.1",
    "context_embedder": "cond_seq_linear", "pos_embed.proj": "init_x_linear", "time_step_proj.linear_1": "t_embedder.mlp.0",
    "time_step_proj.linear_2": "t_embedder.mlp.2", "proj_out": "final_linear", "norm_out.linear": "modF.1",
}  # fmt: skip


@pytest.mark.parametrize("producer", ["comfyui", "kohya"])
def test_auraflow_in_its_checkpoint_names_gives_the_merge_of_its_own_tensors(producer):
    """Every linear of the tiny AuraFlow in the checkpoint's names, as ComfyUI saves them (``diffusion_model.`` +
    lora_up / lora_down + alpha) and as a Kohya-style tool would (``lora_unet_`` + the mangled names); modF.1's
    (shift, scale) halves are diffusers' norm_out.linear's (scale, shift)."""
    pairs = peft_pairs("auraflow", seed=3)
    assert sorted(pairs) == sorted(_AURAFLOW_ORIGINAL)  # the map names every linear of the model
    if producer == "comfyui":
        tensors = _spell({_AURAFLOW_ORIGINAL[p]: ab for p, ab in pairs.items()}, lambda s: "diffusion_model." + s, ".lora_down.weight", ".lora_up.weight", True)
    else:
        tensors = _spell({_AURAFLOW_ORIGINAL[p]: ab for p, ab in pairs.items()}, lambda s: "lora_unet_" + _mangle(s), ".lora_down.weight", ".lora_up.weight", True)
    make, output, _ = MAKERS["auraflow"]
    model = make(0)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for path, (a, b) in pairs.items():
            delta = ALPHA / RANK * b @ a
            if path == "norm_out.linear":
                half = delta.shape[0] // 2
                delta = torch.cat([delta[half:], delta[:half]])
            modules[path].weight += delta
    want = output(model)
    mine = lora_loader.attach(make(0))
    report = mine.load_lora_weights(tensors, adapter_name="c")
    assert not report.skipped
    assert_close(output(mine), want, base_output("auraflow"))
    assert detect_family(convert(tensors).deltas)[0] == "auraflow"


def test_a_onetrainer_sana_file_with_its_gemma_text_encoder_loads_into_both_components():
    """OneTrainer trains SANA's text encoder (Gemma 2) beside the transformer and saves both as Kohya keys
    (``lora_te_layers_0_self_attn_q_proj`` / ``lora_transformer_transformer_blocks_0_attn1_to_q`` + alpha); diffusers'
    SANA loader loads the transformer only. Each component's output is the merge of the file's tensors computed here."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    def gemma():
        torch.manual_seed(0)
        config = Gemma2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=4)  # fmt: skip
        return Gemma2Model(config).eval()

    def gemma_output(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor([[1, 5, 9, 3]])).last_hidden_state

    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1], downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )  # fmt: skip
    make, output, _ = MAKERS["sana"]
    pipe = lora_loader.attach(SanaPipeline(tokenizer=None, text_encoder=gemma(), vae=vae, transformer=make(0),
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)))  # fmt: skip
    g = torch.Generator().manual_seed(6)
    te_pairs = {n: (torch.randn(RANK, m.in_features, generator=g) * 0.2, torch.randn(m.out_features, RANK, generator=g) * 0.2)
                for n, m in gemma().named_modules() if isinstance(m, torch.nn.Linear)}  # fmt: skip
    tr_pairs = {p: ab for p, ab in peft_pairs("sana", seed=5).items() if ".attn" in p}
    tensors = _spell(te_pairs, lambda s: "lora_te_" + _mangle(s), ".lora_down.weight", ".lora_up.weight", True) | _spell(
        tr_pairs, lambda s: "lora_transformer_" + _mangle(s), ".lora_down.weight", ".lora_up.weight", True)
    report = pipe.load_lora_weights(tensors, adapter_name="ot")
    assert report.format == "kohya" and not report.skipped
    merged = gemma()
    with torch.no_grad():
        modules = dict(merged.named_modules())
        for path, (a, b) in te_pairs.items():
            modules[path].weight += ALPHA / RANK * b @ a
    assert_close(gemma_output(pipe.text_encoder), gemma_output(merged), gemma_output(gemma()))
    transformer_only = {k: v for k, v in tensors.items() if k.startswith("lora_transformer_")}
    assert_close(output(pipe.transformer), independent_merge("sana", transformer_only), base_output("sana"))


def test_an_attention_only_file_is_named_by_its_width_where_names_are_shared():
    """The training scripts' default LoRA (to_q, to_k, to_v, to_out.0) names only attn1 / attn2, as LTX-Video,
    CogVideoX and LTX-2 do: SANA's self-attention is 1152 or 2240 wide, CogView4's 4096 (and it has no attn2)."""
    def attention(width, attn2=True):
        from types import SimpleNamespace

        attns = ("attn1", "attn2") if attn2 else ("attn1",)
        return {("transformer", f"transformer_blocks.3.{a}.{m}"): SimpleNamespace(down=torch.zeros(4, width))
                for a in attns for m in ("to_q", "to_k", "to_v", "to_out.0")}  # fmt: skip

    assert detect_family(attention(2240))[0] == "sana" and detect_family(attention(1152))[0] == "sana"
    assert detect_family(attention(2048))[0] == "ltx-video"  # LTX-Video 0.9's width
    assert detect_family(attention(4096, attn2=False))[0] == "cogview4"
    assert detect_family(attention(4096))[0] != "cogview4"  # LTX-2's attn1 is 4096 wide too, beside an attn2
    assert detect_family(attention(3072, attn2=False))[0] == "cogvideox"
