"""Anima (``AnimaModularPipeline``: ``transformer`` a Cosmos-Predict2 DiT, ``text_conditioner`` its LLM adapter) and
Krea 2 (``Krea2Pipeline``, ``Krea2Transformer2DModel``): every layout their LoRAs come in.

Anima: one rank-4 LoRA on the original checkpoint's DiT modules (``blocks.N.self_attn.q_proj``, ``output_proj``,
``cross_attn.*``, ``mlp.layer1`` / ``layer2``, the adaLN-LoRA ``adaln_modulation_*.{1,2}``, ``x_embedder.proj.1``,
``t_embedder.1.linear_1``, ``final_layer.*``) and on the LLM adapter (``llm_adapter.blocks.N.self_attn.q_proj``,
``cross_attn.o_proj``, ``mlp.0``, ``out_proj``) written as ComfyUI / diffusion-pipe / ai-toolkit write it
(``diffusion_model.`` + lora_A / lora_B: what diffusers' Anima converter reads, the LLM adapter to
``text_conditioner``), as sd-scripts writes it (``lora_unet_blocks_0_self_attn_q_proj`` + ``.alpha``), as its
``convert_anima_lora_to_comfy.py`` writes that (``diffusion_model.`` + lora_A / lora_B + ``.alpha``), and in diffusers'
own names (``transformer.`` / ``text_conditioner.``).

Krea 2: one LoRA on ``blocks.N.attn.{wq,wk,wv,wo,gate}``, ``blocks.N.mlp.{gate,up,down}``, the text fusion's blocks
and ai-toolkit's top-level names (``first``, ``tmlp.0``, ``txtmlp.1``, ``last.linear``, ...), written as Krea's trainer /
ComfyUI (``diffusion_model.``), ai-toolkit (``base_model.model.``), Kohya (``lora_unet_blocks_0_attn_wq``: the file
the issue reports refused) write it, and in diffusers' names.

Each layout is compared with a merge of the file's own tensors into the weights computed here (W + alpha / r * B @ A)
and with diffusers+peft wherever diffusers' converter reads it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import Krea2Pipeline
from producers import save_state_dict
from tiny_qwen import ALPHA, RANK, assert_close, diffusers_output, random_pairs, spell
from tiny_tail_a import conditioner_output, cosmos_output, krea2_output, tiny_anima_conditioner, tiny_cosmos, tiny_krea2

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def read(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def merge_into(model, tensors: dict, resolve) -> None:
    """``W += alpha / r * B @ A`` for each module of the raw file (scale 1 without an alpha), computed here."""
    groups: dict[str, dict] = {}
    roles = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
    for key, tensor in tensors.items():
        suffix = next(s for s in roles if key.endswith(s))
        groups.setdefault(key[: -len(suffix)], {})[roles[suffix]] = tensor
    modules = dict(model.named_modules())
    with torch.no_grad():
        for stem, parts in groups.items():
            path = resolve(stem)
            if path is None:
                continue
            scale = float(parts["alpha"]) / parts["down"].shape[0] if "alpha" in parts else 1.0
            modules[path].weight += scale * parts["up"] @ parts["down"]


# -- Anima ------------------------------------------------------------------------------------------------------------

_ANIMA_BLOCK = {"self_attn.q_proj": "attn1.to_q", "self_attn.k_proj": "attn1.to_k", "self_attn.v_proj": "attn1.to_v",
                "self_attn.output_proj": "attn1.to_out.0", "cross_attn.q_proj": "attn2.to_q", "cross_attn.k_proj": "attn2.to_k",
                "cross_attn.v_proj": "attn2.to_v", "cross_attn.output_proj": "attn2.to_out.0", "mlp.layer1": "ff.net.0.proj",
                "mlp.layer2": "ff.net.2", "adaln_modulation_self_attn.1": "norm1.linear_1", "adaln_modulation_self_attn.2": "norm1.linear_2",
                "adaln_modulation_cross_attn.1": "norm2.linear_1", "adaln_modulation_mlp.2": "norm3.linear_2"}  # fmt: skip
_ANIMA_TOP = {"x_embedder.proj.1": "patch_embed.proj", "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
              "final_layer.adaln_modulation.1": "norm_out.linear_1", "final_layer.linear": "proj_out"}  # fmt: skip
# original (after diffusion_model.) -> (component, diffusers path)
ANIMA = {f"blocks.{i}.{o}": ("transformer", f"transformer_blocks.{i}.{d}") for i in (0, 1) for o, d in _ANIMA_BLOCK.items()} | {
    o: ("transformer", d) for o, d in _ANIMA_TOP.items()} | {
    f"llm_adapter.blocks.{i}.{leaf}": ("text_conditioner", f"blocks.{i}.{leaf}")
    for i in (0, 1) for leaf in ("self_attn.q_proj", "self_attn.o_proj", "cross_attn.k_proj", "cross_attn.v_proj", "mlp.0", "mlp.2")} | {
    "llm_adapter.out_proj": ("text_conditioner", "out_proj")}  # fmt: skip


def anima_pipeline(seed: int = 0):
    from diffusers.modular_pipelines.anima.modular_blocks_anima import AnimaAutoBlocks

    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(transformer=tiny_cosmos(seed), text_conditioner=tiny_anima_conditioner(seed))
    return pipe


def anima_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's output on the text conditioner's output, and that output."""
    text = conditioner_output(pipe.text_conditioner)
    return cosmos_output(pipe.transformer, text), text


def anima_pairs(seed: int = 1) -> dict:
    pipe = anima_pipeline()
    pairs = {}
    for original, (component, path) in ANIMA.items():
        pairs[original] = random_pairs(getattr(pipe, component), {path: path}, seed + len(pairs))[path]
    return pairs


def anima_write(layout: str, pairs: dict, directory) -> str:
    diffusers_names = {ANIMA[o][0] + "." + ANIMA[o][1]: p for o, p in pairs.items()}
    writers = {
        "comfyui": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "sd-scripts": lambda: spell(pairs, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "sd-scripts-comfy": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", ALPHA),
        "diffusers": lambda: spell(diffusers_names, lambda p: p, ".lora_A.weight", ".lora_B.weight", None),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"anima-{layout}.safetensors"))


def anima_resolve(component: str):
    table = {o.replace(".", "_"): (c, d) for o, (c, d) in ANIMA.items()} | {f"{c}_{d}".replace(".", "_"): (c, d) for c, d in ANIMA.values()}

    def resolve(stem: str):
        for prefix in ("diffusion_model.", "lora_unet_"):
            stem = stem.removeprefix(prefix)
        c, d = table[stem.replace(".", "_")]
        return d if c == component else None

    return resolve


def anima_expected(tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = anima_pipeline()
    merge_into(pipe.transformer, tensors, anima_resolve("transformer"))
    merge_into(pipe.text_conditioner, tensors, anima_resolve("text_conditioner"))
    return anima_outputs(pipe)


ANIMA_LAYOUTS = {"comfyui": ("comfyui", True), "sd-scripts": ("kohya", False), "sd-scripts-comfy": ("comfyui", False),
                 "diffusers": ("diffusers", True)}  # fmt: skip


@pytest.fixture(scope="module")
def anima_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("anima")
    pairs = anima_pairs()
    return {layout: anima_write(layout, pairs, directory) for layout in ANIMA_LAYOUTS}, anima_outputs(anima_pipeline())


@pytest.mark.parametrize("layout", sorted(ANIMA_LAYOUTS))
def test_anima_layouts_load_into_transformer_and_text_conditioner(layout, anima_files):
    paths, (base, base_text) = anima_files
    fmt, diffusers_reads = ANIMA_LAYOUTS[layout]
    tensors = read(paths[layout])
    want, want_text = anima_expected(tensors)
    if diffusers_reads:
        theirs = anima_pipeline()
        theirs.load_lora_weights(dict(tensors), adapter_name="d")
        got, got_text = anima_outputs(theirs)
        assert_close(got_text, want_text, base_text)
        assert_close(got, want, base)
    pipe = lora_loader.attach(anima_pipeline())
    report = pipe.load_lora_weights(paths[layout], adapter_name="a")
    assert report.format == fmt and not report.skipped
    got, got_text = anima_outputs(pipe)
    assert_close(got_text, want_text, base_text)
    assert_close(got, want, base)
    assert detect_family(convert(tensors).deltas)[0] == "anima"


def test_anima_blend_disable_fuse_unfuse_and_unload(anima_files, tmp_path):
    paths, (base, base_text) = anima_files
    other = anima_write("comfyui", anima_pairs(seed=50), tmp_path)
    theirs = anima_pipeline()
    theirs.load_lora_weights(read(paths["comfyui"]), adapter_name="a")
    theirs.load_lora_weights(read(other), adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    pipe = lora_loader.attach(anima_pipeline())
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("transformer", "text_conditioner")}
    pipe.load_lora_weights(paths["sd-scripts"], adapter_name="a")  # the same LoRA as the comfyui file
    pipe.load_lora_weights(other, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    got, got_text = anima_outputs(pipe)
    want, want_text = anima_outputs(theirs)
    assert_close(got_text, want_text, base_text)
    assert_close(got, want, base)
    pipe.disable_lora()
    assert all(torch.equal(x, y) for x, y in zip(anima_outputs(pipe), (base, base_text)))
    pipe.enable_lora()
    pipe.fuse_lora()
    assert_close(anima_outputs(pipe)[0], got, base)
    pipe.unfuse_lora()
    for c, state in before.items():
        after = getattr(pipe, c).state_dict()
        assert all(torch.equal(after[k], state[k]) for k in state)
    pipe.unload_lora_weights()
    assert all(torch.equal(x, y) for x, y in zip(anima_outputs(pipe), (base, base_text)))


def test_anima_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(anima_files):
    tensors = read(anima_files[0]["sd-scripts"])
    extra = ["lora_unet_blocks_7_self_attn_q_proj.lora_down.weight", "lora_unet_blocks_7_self_attn_q_proj.lora_up.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 24), torch.ones(24, RANK)
    pipe = lora_loader.attach(anima_pipeline())
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("transformer", "text_conditioner")}
    with pytest.raises(LoraError, match="lora_unet_blocks_7_self_attn_q_proj"):
        pipe.load_lora_weights(tensors, adapter_name="x")
    for c, state in before.items():
        after = getattr(pipe, c).state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with pytest.warns(lora_loader.LoraWarning):
        report = pipe.load_lora_weights(tensors, adapter_name="x", strict=False)
    assert sorted(report.skipped) == sorted(extra)


def test_lora_loader_inspect_names_anima(anima_files, capsys):
    from lora_loader.cli import main

    for layout in ("sd-scripts", "comfyui"):
        assert main(["inspect", anima_files[0][layout], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == "anima"


# -- Krea 2 -----------------------------------------------------------------------------------------------------------

_KREA_BLOCK = {"attn.wq": "attn.to_q", "attn.wk": "attn.to_k", "attn.wv": "attn.to_v", "attn.wo": "attn.to_out.0",
               "attn.gate": "attn.to_gate", "mlp.gate": "ff.gate", "mlp.up": "ff.up", "mlp.down": "ff.down"}  # fmt: skip
KREA = {f"blocks.{i}.{o}": f"transformer_blocks.{i}.{d}" for i in (0, 1) for o, d in _KREA_BLOCK.items()} | {
    f"txtfusion.{kind}.0.{o}": f"text_fusion.{kind}.0.{d}" for kind in ("layerwise_blocks", "refiner_blocks")
    for o, d in _KREA_BLOCK.items() if o in ("attn.wq", "attn.wo", "mlp.up")} | {
    "first": "img_in", "last.linear": "final_layer.linear", "tmlp.0": "time_embed.linear_1", "tmlp.2": "time_embed.linear_2",
    "tproj.1": "time_mod_proj", "txtmlp.1": "txt_in.linear_1", "txtmlp.3": "txt_in.linear_2", "txtfusion.projector": "text_fusion.projector"}  # fmt: skip


def krea_pairs(seed: int = 1) -> dict:
    pairs = random_pairs(tiny_krea2(0), {d: d for d in KREA.values()}, seed)
    return {o: pairs[d] for o, d in KREA.items()}


def krea_write(layout: str, pairs: dict, directory) -> str:
    diffusers_names = {KREA[o]: p for o, p in pairs.items()}
    writers = {
        "comfyui": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "ai-toolkit": lambda: spell(pairs, lambda p: "base_model.model." + p, ".lora_A.weight", ".lora_B.weight", None),
        "kohya": lambda: spell(pairs, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "comfyui-kohya": lambda: spell(pairs, lambda p: "diffusion_model." + p, ".lora_down.weight", ".lora_up.weight", ALPHA),
        "kohya-diffusers-names": lambda: spell(diffusers_names, lambda p: "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ALPHA),
        "diffusers": lambda: spell(diffusers_names, lambda p: "transformer." + p, ".lora_A.weight", ".lora_B.weight", None),
    }
    return save_state_dict(writers[layout](), os.path.join(os.fspath(directory), f"krea2-{layout}.safetensors"))


KREA_LAYOUTS = {"comfyui": ("comfyui", True), "ai-toolkit": ("peft", True), "kohya": ("kohya", False),
                "comfyui-kohya": ("comfyui", False), "kohya-diffusers-names": ("kohya", False), "diffusers": ("diffusers", True)}  # fmt: skip


def krea_resolve(stem: str):
    table = {o.replace(".", "_"): d for o, d in KREA.items()} | {d.replace(".", "_"): d for d in KREA.values()}
    for prefix in ("diffusion_model.", "base_model.model.", "transformer.", "lora_unet_"):
        stem = stem.removeprefix(prefix)
    return table[stem.replace(".", "_")]


def krea_expected(tensors: dict) -> torch.Tensor:
    model = tiny_krea2(0)
    merge_into(model, tensors, krea_resolve)
    return krea2_output(model)


@pytest.fixture(scope="module")
def krea_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("krea2")
    pairs = krea_pairs()
    return {layout: krea_write(layout, pairs, directory) for layout in KREA_LAYOUTS}, krea2_output(tiny_krea2(0))


@pytest.mark.parametrize("layout", sorted(KREA_LAYOUTS))
def test_krea2_layouts(layout, krea_files):
    paths, base = krea_files
    fmt, diffusers_reads = KREA_LAYOUTS[layout]
    tensors = read(paths[layout])
    want = krea_expected(tensors)
    if diffusers_reads:
        theirs, _ = diffusers_output(Krea2Pipeline, tiny_krea2, krea2_output, dict(tensors))
        assert_close(theirs, want, base)
    model = lora_loader.attach(tiny_krea2(0))
    report = model.load_lora_weights(paths[layout], adapter_name="k")
    assert report.format == fmt and not report.skipped
    assert_close(krea2_output(model), want, base)
    assert detect_family(convert(tensors).deltas)[0] == "krea2"


def test_krea2_blend_disable_fuse_unfuse_unload(krea_files, tmp_path):
    paths, base = krea_files
    other = read(krea_write("comfyui", krea_pairs(seed=40), tmp_path))
    _, theirs = diffusers_output(Krea2Pipeline, tiny_krea2, krea2_output, read(paths["comfyui"]), adapter="a")
    theirs.load_lora_adapter(Krea2Pipeline.lora_state_dict(dict(other)), prefix="transformer", adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    model = lora_loader.attach(tiny_krea2(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_weights(paths["kohya"], adapter_name="a")  # the same LoRA, Kohya-named
    model.load_lora_weights(other, adapter_name="b")
    model.set_adapters(["a", "b"], [0.7, 0.3])
    blended = krea2_output(model)
    assert_close(blended, krea2_output(theirs), base)
    model.disable_lora()
    assert torch.equal(krea2_output(model), base)
    model.enable_lora()
    model.fuse_lora()
    assert_close(krea2_output(model), blended, base)
    model.unfuse_lora()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.unload_lora_weights()
    assert torch.equal(krea2_output(model), base)


def test_krea2_file_with_blocks_the_model_lacks_is_refused_and_changes_nothing(krea_files):
    tensors = read(krea_files[0]["kohya"])
    extra = ["lora_unet_blocks_9_attn_wq.lora_down.weight", "lora_unet_blocks_9_attn_wq.lora_up.weight"]
    tensors[extra[0]], tensors[extra[1]] = torch.ones(RANK, 32), torch.ones(32, RANK)
    model = lora_loader.attach(tiny_krea2(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match="lora_unet_blocks_9_attn_wq"):
        model.load_lora_weights(tensors, adapter_name="x")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.warns(lora_loader.LoraWarning):
        report = model.load_lora_weights(tensors, adapter_name="x", strict=False)
    assert sorted(report.skipped) == sorted(extra)
    assert_close(krea2_output(model), krea_expected(read(krea_files[0]["kohya"])), krea_files[1])


def test_lora_loader_inspect_names_krea2(krea_files, capsys):
    from lora_loader.cli import main

    for layout in ("kohya", "comfyui", "diffusers"):
        assert main(["inspect", krea_files[0][layout], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == "krea2"


def tiny_qwen3(seed: int = 0):
    """Anima's text encoder (a Qwen3Model: ``layers.N.self_attn.q_proj``), tiny."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8)  # fmt: skip
    return Qwen3Model(config).eval()


def qwen3_output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 9).reshape(1, 8)).last_hidden_state


def test_anima_sd_scripts_file_with_qwen3_text_encoder_layers(tmp_path):
    """sd-scripts' Anima LoRA with ``lora_te_layers_0_self_attn_q_proj`` (the Qwen3 text encoder) beside the DiT's
    ``lora_unet_blocks_0_cross_attn_q_proj``: each part into its component (diffusers' Anima loader reads neither)."""
    pipe = anima_pipeline()
    pipe.update_components(text_encoder=tiny_qwen3(0))
    te_modules = dict(pipe.text_encoder.named_modules())
    g = torch.Generator().manual_seed(11)
    tensors, te_paths = {}, ("layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.down_proj")
    for stem, path in [(f"lora_unet_{o.replace('.', '_')}", ANIMA[o][1]) for o in ("blocks.0.cross_attn.q_proj", "blocks.0.cross_attn.k_proj")] + [
            (f"lora_te_{p.replace('.', '_')}", p) for p in te_paths]:  # fmt: skip
        module = (te_modules if stem.startswith("lora_te_") else dict(pipe.transformer.named_modules()))[path]
        tensors[f"{stem}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.3
        tensors[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
    base_te, base = qwen3_output(pipe.text_encoder), cosmos_output(pipe.transformer)
    want_te_model, want_model = tiny_qwen3(0), tiny_cosmos(0)
    te_of = {f"lora_te_{p.replace('.', '_')}": p for p in te_paths}
    merge_into(want_te_model, tensors, lambda stem: te_of.get(stem))
    merge_into(want_model, tensors, lambda stem: None if stem.startswith("lora_te_") else anima_resolve("transformer")(stem))
    pipe = lora_loader.attach(pipe)
    report = pipe.load_lora_weights(tensors, adapter_name="te")
    assert not report.skipped and set(pipe.get_list_adapters()) == {"transformer", "text_encoder"}
    assert_close(qwen3_output(pipe.text_encoder), qwen3_output(want_te_model), base_te)
    assert_close(cosmos_output(pipe.transformer), cosmos_output(want_model), base)
    assert detect_family(convert(tensors).deltas)[0] == "anima"


def test_anima_lokr_in_original_names_and_attention_only_files_are_named_anima():
    """LyCORIS LoKr (``diffusion_model.blocks.0.cross_attn.k_proj.lokr_w1`` / ``lokr_w2``, full factors) gives
    the merge of kron(w1, w2); with a ``dora_scale`` it loads. A file of attention modules only, whose diffusers
    names (``attn1.to_q``, ``attn2.to_k``) other families share, is still Anima's by its own names."""
    transformer = dict(tiny_cosmos(0).named_modules())
    g = torch.Generator().manual_seed(12)
    tensors = {}
    for original in ("blocks.0.cross_attn.q_proj", "blocks.0.self_attn.k_proj", "blocks.1.mlp.layer2"):
        rows, cols = transformer[ANIMA[original][1]].weight.shape
        stem = "diffusion_model." + original
        tensors[f"{stem}.lokr_w1"] = torch.randn(2, 2, generator=g) * 0.5
        tensors[f"{stem}.lokr_w2"] = torch.randn(rows // 2, cols // 2, generator=g) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)  # full factors: LyCORIS scales them by 1
    want = tiny_cosmos(0)
    with torch.no_grad():
        for original in ("blocks.0.cross_attn.q_proj", "blocks.0.self_attn.k_proj", "blocks.1.mlp.layer2"):
            stem = "diffusion_model." + original
            dict(want.named_modules())[ANIMA[original][1]].weight += torch.kron(tensors[f"{stem}.lokr_w1"], tensors[f"{stem}.lokr_w2"])
    base = cosmos_output(tiny_cosmos(0))
    pipe = lora_loader.attach(anima_pipeline())
    assert not pipe.load_lora_weights(dict(tensors), adapter_name="k").skipped
    assert_close(cosmos_output(pipe.transformer), cosmos_output(want), base)
    assert detect_family(convert(tensors).deltas)[0] == "anima"
    tensors["diffusion_model.blocks.0.cross_attn.q_proj.dora_scale"] = torch.rand(24, 1, generator=g) + 0.5
    pipe = lora_loader.attach(anima_pipeline())
    assert not pipe.load_lora_weights(tensors, adapter_name="dora").skipped
    assert (cosmos_output(pipe.transformer) - base).abs().max() > 1e-3
    attention_only = {k: v for k, v in read_pairs(anima_pairs(), lambda p: "diffusion_model." + p).items() if "_attn." in k}
    assert detect_family(convert(attention_only).deltas)[0] == "anima"


def read_pairs(pairs: dict, stem) -> dict:
    return spell({o: p for o, p in pairs.items() if o.startswith("blocks.")}, stem, ".lora_A.weight", ".lora_B.weight", None)


@pytest.mark.parametrize("prefix", ["lycoris_", "diffusion_model."])
def test_krea2_lokr_in_original_names_gives_the_merge_of_its_factors(prefix):
    """LyCORIS' LoKr on Krea 2's original modules (``lycoris_blocks_0_attn_wq.lokr_w1`` / ``lokr_w2_a`` / ``lokr_w2_b``)."""
    modules = dict(tiny_krea2(0).named_modules())
    g = torch.Generator().manual_seed(13)
    tensors, want = {}, tiny_krea2(0)
    for original in ("blocks.0.attn.wq", "blocks.1.mlp.down", "txtfusion.refiner_blocks.0.attn.wo"):
        rows, cols = modules[KREA[original]].weight.shape
        stem = prefix + (original.replace(".", "_") if prefix == "lycoris_" else original)
        w1, w2a, w2b = torch.randn(2, 2, generator=g) * 0.5, torch.randn(rows // 2, 2, generator=g) * 0.3, torch.randn(2, cols // 2, generator=g) * 0.3
        tensors |= {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b, f"{stem}.alpha": torch.tensor(1.0)}
        with torch.no_grad():
            dict(want.named_modules())[KREA[original]].weight += 0.5 * torch.kron(w1, w2a @ w2b)  # alpha 1 / rank 2
    model = lora_loader.attach(tiny_krea2(0))
    assert not model.load_lora_weights(tensors, adapter_name="k").skipped
    assert_close(krea2_output(model), krea2_output(want), krea2_output(tiny_krea2(0)))
    assert detect_family(convert(tensors).deltas)[0] == "krea2"


def test_anima_saved_in_diffusers_layout_is_read_by_diffusers_and_krea2_kohya_save_reads_back(anima_files, krea_files, tmp_path):
    """An sd-scripts Anima LoRA saved as diffusers (``transformer.`` + ``text_conditioner.``) gives diffusers+peft
    the same outputs; a Krea 2 LoRA saved as Kohya is in the original names (``lora_unet_blocks_0_attn_wq``)."""
    pipe = lora_loader.attach(anima_pipeline())
    pipe.load_lora_weights(anima_files[0]["sd-scripts"], adapter_name="a")
    want, want_text = anima_outputs(pipe)
    path = pipe.save_lora_weights(str(tmp_path / "anima.safetensors"), adapter_name="a", format="diffusers")
    assert any(k.startswith("text_conditioner.blocks.") for k in read(path))
    theirs = anima_pipeline()
    theirs.load_lora_weights(path, adapter_name="d")
    got, got_text = anima_outputs(theirs)
    assert_close(got_text, want_text, anima_files[1][1])
    assert_close(got, want, anima_files[1][0])
    model = lora_loader.attach(tiny_krea2(0))
    model.load_lora_weights(krea_files[0]["comfyui"], adapter_name="k")
    path = model.save_lora_weights(str(tmp_path / "krea.safetensors"), adapter_name="k", format="kohya")
    assert "lora_unet_blocks_0_attn_wq.lora_down.weight" in read(path)
    again = lora_loader.attach(tiny_krea2(0))
    again.load_lora_weights(path, adapter_name="k")
    assert_close(krea2_output(again), krea2_output(model), krea_files[1])
