"""LTX-Video 0.9.x and LTX-2 / LTX-2.3 LoRAs, in the layouts their producers write, against diffusers+peft.

Pipelines are `tiny_ltx`'s (diffusers' own test configs, transformer and, for LTX-2, the text
``connectors``). Each file is a PEFT adapter made by peft on diffusers' modules, then written as
its producer writes it:

- diffusers / PEFT: ``transformer.*`` and ``connectors.*`` keys with the rank and alpha header, by
  diffusers' own ``_save_lora_weights`` (the LTX-Video trainer, diffusers' scripts, SimpleTuner);
- Lightricks' names behind ``diffusion_model.``, PEFT ``lora_A`` / ``lora_B`` and no alpha: the LTX-2
  trainer (ltx_core's module names, bfloat16), ai-toolkit (its ``convert_lora_diffusers_to_original``,
  transcribed below, float16), diffusion-pipe / the LTX-Video trainer's ``--to-comfy`` (LTX-Video);
- ComfyUI's LoRA extraction (``LoraSave``): ``diffusion_model.<name>.lora_up.weight`` / ``lora_down.weight``
  in float16, over the whole diffusion model, LTX-2's text connectors included, and the text
  projection outside it as ``text_embedding_projection.*`` (diffusers' converter reads that key);
- ai-toolkit's LoKr: ``diffusion_model.<name>.lokr_w1`` / ``lokr_w2_a`` / ``lokr_w2_b`` / ``alpha``.

Oracles: diffusers' ``load_lora_weights`` (its LTX converters + peft) where it reads the file, else a
merge of the file's own tensors into the weights computed here (W + alpha / rank * up @ down, the
module found by the rename tables of diffusers' conversion scripts). Every comparison also checks
that the LoRA moved the output.
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import LTX2Pipeline, LTXPipeline
from peft import LoraConfig
from producers import add_peft_adapter, save_state_dict
from safetensors.torch import save_file
from tiny_ltx import outputs, tiny_ltx2_pipeline, tiny_ltx_video_pipeline

import lora_loader
from lora_loader import LoraError
from lora_loader.cli.inspect_cmd import format_inspection, inspect_lora
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TOLERANCE = 1e-4
MOVED = 1e-3
KINDS = ("ltx-video", "ltx2", "ltx2.3")


def pipeline(kind: str, seed: int = 0):
    if kind == "ltx-video":
        return tiny_ltx_video_pipeline(seed)
    return tiny_ltx2_pipeline(seed, version="2.3" if kind == "ltx2.3" else "2.0")


def linears(module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def peft_adapter(kind: str, seed: int, component: str = "transformer", targets=None, r: int = 4, alpha: float = 4.0, **kw):
    """A PEFT LoRA made by peft on (a copy of) the pipeline's ``component``: ``(state dict, config)``."""
    module = getattr(pipeline(kind, seed + 50), component)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or linears(module), init_lora_weights=False, **kw)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return add_peft_adapter(module, config), config


def assert_close(got: dict, want: dict, base: dict, keys=None):
    keys = keys or want.keys()
    moved = max(float((want[k] - base[k]).abs().max()) for k in keys)
    assert moved > MOVED, "the LoRA did not change the output: the test would prove nothing"
    for k in keys:
        assert float((got[k] - want[k]).abs().max()) <= TOLERANCE, k


def both(kind: str):
    """A pipeline for diffusers+peft and an identical one with lora_loader attached."""
    return pipeline(kind), lora_loader.attach(pipeline(kind))


# -- the producers ----------------------------------------------------------------------------------

# diffusers' scripts/convert_ltx2_to_diffusers.py LTX_2_0 / LTX_2_3_TRANSFORMER_KEYS_RENAME_DICT (Lightricks' name ->
# diffusers'), which ai-toolkit's extensions_built_in/diffusion_models/ltx2 copies and inverts to save LoRAs.
LTX2_RENAMES = {
    "patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
    "q_norm": "norm_q", "k_norm": "norm_k",
}  # fmt: skip
LTX23_RENAMES = LTX2_RENAMES | {"audio_prompt_adaln_single": "audio_prompt_adaln", "prompt_adaln_single": "prompt_adaln"}
# diffusers' scripts/convert_ltx_to_diffusers.py TRANSFORMER_KEYS_RENAME_DICT (LTX-Video 0.9.x).
LTXV_RENAMES = {"patchify_proj": "proj_in", "adaln_single": "time_embed", "q_norm": "norm_q", "k_norm": "norm_k"}
# convert_ltx2_to_diffusers.py LTX_2_0 / LTX_2_3_CONNECTORS_KEYS_RENAME_DICT (the checkpoint's connector names ->
# diffusers' ``connectors``; the connector blocks sit in the checkpoint's diffusion model, the projection beside it).
CONNECTOR_RENAMES = {
    "video_embeddings_connector": "video_connector", "audio_embeddings_connector": "audio_connector",
    "transformer_1d_blocks": "transformer_blocks", "text_embedding_projection.aggregate_embed": "text_proj_in",
    "text_embedding_projection.audio_aggregate_embed": "audio_text_proj_in",
    "text_embedding_projection.video_aggregate_embed": "video_text_proj_in", "q_norm": "norm_q", "k_norm": "norm_k",
}  # fmt: skip


def lightricks_names(sd: dict, renames: dict) -> dict:
    """ai-toolkit's LTX2Model.convert_lora_weights_before_save: ``transformer.`` -> ``diffusion_model.``, then
    ``convert_lora_diffusers_to_original`` (the adaln special case, then the renames inverted, longest first;
    with LTX-2.3's renames ``audio_prompt_adaln`` becomes ``audio_prompt_adaln_single_single``, as there).
    With the renames of one version these are the names ltx_core, ComfyUI and diffusion-pipe's LTX models have."""
    inverse = sorted(((new, old) for old, new in renames.items()), key=lambda kv: len(kv[0]), reverse=True)
    out = {}
    for key, tensor in sd.items():
        rest = key
        if rest.startswith("time_embed."):
            rest = rest.replace("time_embed.", "adaln_single.", 1)
        elif rest.startswith("audio_time_embed."):
            rest = rest.replace("audio_time_embed.", "audio_adaln_single.", 1)
        for new, old in inverse:
            rest = rest.replace(new, old)
        out[f"diffusion_model.{rest}"] = tensor
    return out


def connector_original(path: str) -> str:
    """A diffusers ``connectors`` path in the checkpoint's names, with the prefix ComfyUI gives it."""
    name = path
    for old, new in sorted(CONNECTOR_RENAMES.items(), key=lambda kv: len(kv[1]), reverse=True):
        name = name.replace(new, old)
    return name if name.startswith("text_embedding_projection.") else f"diffusion_model.{name}"


def lightricks_connectors(peft_sd: dict) -> dict:
    """A PEFT LoRA on diffusers' ``connectors`` in the checkpoint's names, ``lora_A`` / ``lora_B`` as ltx_core reads them."""
    out = {}
    for key, tensor in peft_sd.items():
        module, _, suffix = key.rpartition(".lora_")
        out[f"{connector_original(module)}.lora_{suffix}"] = tensor
    return out


def comfyui_extract(peft_sd: dict, to_original) -> dict:
    """ComfyUI's LoraSave: ``<name>.lora_up.weight`` / ``.lora_down.weight`` in float16, no alpha."""
    out = {}
    for key, tensor in peft_sd.items():
        module, _, suffix = key.rpartition(".lora_")
        suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[suffix]
        out[f"{to_original(module)}.{suffix}"] = tensor.half()
    return out


def to_diffusers_name(original: str, renames: dict) -> str:
    """The oracle's way from a file's module name to diffusers' (the conversion scripts' tables, forward)."""
    name = original.removeprefix("diffusion_model.")
    for old, new in sorted(renames.items(), key=lambda kv: len(kv[0]), reverse=True):
        name = name.replace(old, new)
    for old, new in (("adaln_single.", "time_embed."), ("audio_adaln_single.", "audio_time_embed.")):
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def diffusers_file(kind: str, directory, seed: int = 1, connectors: bool = True) -> str:
    """The diffusers layout with its header, written by diffusers' own ``_save_lora_weights``."""
    cls = LTXPipeline if kind == "ltx-video" else LTX2Pipeline
    layers, metadata = {}, {}
    t_sd, t_cfg = peft_adapter(kind, seed, alpha=6.0 + seed, rank_pattern={"to_k": 2}, alpha_pattern={"ff.net.2": 3.0})
    layers["transformer"], metadata["transformer"] = t_sd, t_cfg.to_dict()
    if kind != "ltx-video" and connectors:
        c_sd, c_cfg = peft_adapter(kind, seed + 7, "connectors", r=2, alpha=5.0)
        layers["connectors"], metadata["connectors"] = c_sd, c_cfg.to_dict()
    name = f"{kind}-{seed}.safetensors"
    cls._save_lora_weights(os.fspath(directory), lora_layers=layers, lora_metadata=metadata, weight_name=name)
    return os.path.join(os.fspath(directory), name)


@torch.no_grad()
def merged(kind: str, sd: dict, renames: dict) -> dict:
    """The independent oracle: the file's LoRA (or LoKr) pairs merged into a fresh pipeline's weights."""
    pipe = pipeline(kind)
    modules = {}
    for key in sd:
        module, _, suffix = key.rpartition(".")
        if key.endswith(".weight"):
            module = module.rpartition(".")[0]
        modules.setdefault(module, {})[key[len(module) + 1 :]] = sd[key].float()
    for name, t in modules.items():
        is_connector = "embeddings_connector" in name or name.startswith("text_embedding_projection.")
        component = pipe.connectors if is_connector else pipe.transformer
        path = to_diffusers_name(name, CONNECTOR_RENAMES if is_connector else renames)
        layer = component.get_submodule(path)
        if "lokr_w1" in t:  # ComfyUI's LoKr: kron(w1, w2_a @ w2_b), scale alpha / rank of w2_b
            delta = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (float(t["alpha"]) / t["lokr_w2_b"].shape[0])
        else:
            up = t.get("lora_up.weight", t.get("lora_B.weight"))
            down = t.get("lora_down.weight", t.get("lora_A.weight"))
            scale = float(t["alpha"]) / down.shape[0] if "alpha" in t else 1.0
            delta = scale * up @ down
        layer.weight += delta
    return outputs(pipe)


# -- the diffusers layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_diffusers_file_gives_the_outputs_diffusers_gives(kind, tmp_path):
    path = diffusers_file(kind, tmp_path)
    ref, mine = both(kind)
    base = outputs(ref)
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert set(report.modules) == ({"transformer"} if kind == "ltx-video" else {"transformer", "connectors"})
    assert_close(outputs(mine), outputs(ref), base)


def test_two_adapters_blend_as_in_diffusers_in_transformer_and_connectors(tmp_path):
    a, b = diffusers_file("ltx2", tmp_path, 1), diffusers_file("ltx2", tmp_path, 2)
    ref, mine = both("ltx2")
    base = outputs(ref)
    for pipe in (ref, mine):
        pipe.load_lora_weights(a, adapter_name="a")
        pipe.load_lora_weights(b, adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(outputs(mine), outputs(ref), base)
    for pipe in (ref, mine):  # per component: the connectors at half strength
        pipe.set_adapters(["a", "b"], [{"transformer": 0.7, "connectors": 0.35}, {"transformer": 0.3, "connectors": 0.15}])
    assert_close(outputs(mine), outputs(ref), base)


# -- Lightricks' names --------------------------------------------------------------------------------

PRODUCERS = {
    # kind, renames, dtype: the LTX-2 trainer saves ltx_core's names in bfloat16, ai-toolkit in float16
    "ltx2-trainer": ("ltx2", LTX2_RENAMES, torch.bfloat16),
    "ai-toolkit-2.3": ("ltx2.3", LTX23_RENAMES, torch.float16),
    "diffusion-pipe-ltxv": ("ltx-video", LTXV_RENAMES, torch.float32),
}


@pytest.mark.parametrize("producer", PRODUCERS)
def test_a_file_in_lightricks_names_gives_what_diffusers_converter_gives(producer, tmp_path):
    kind, renames, dtype = PRODUCERS[producer]
    module = pipeline(kind).transformer
    # diffusion-pipe targets the blocks; diffusers' LTX-Video converter only strips the prefix, so the oracle
    # reads only files whose names it shares. LTX-2's files carry every linear (ai-toolkit, transformer_only off).
    targets = [n for n in linears(module) if n.startswith("transformer_blocks.")] if kind == "ltx-video" else None
    sd, _ = peft_adapter(kind, 3, targets=targets)
    sd = {k: v.to(dtype) for k, v in lightricks_names(sd, renames).items()}
    if kind == "ltx2.3":
        assert {"diffusion_model.prompt_adaln_single.linear.lora_A.weight",
                "diffusion_model.audio_prompt_adaln_single_single.linear.lora_A.weight"} <= set(sd)  # fmt: skip
    if kind != "ltx-video":
        assert "diffusion_model.av_ca_a2v_gate_adaln_single.linear.lora_B.weight" in sd
    path = save_state_dict(sd, tmp_path / f"{producer}.safetensors")
    ref, mine = both(kind)
    base = outputs(ref)
    ref.load_lora_weights(path, adapter_name="x")
    report = mine.load_lora_weights(path, adapter_name="x")
    assert report.format == "comfyui" and report.modules == {"transformer": len(sd) // 2}
    assert_close(outputs(mine), outputs(ref), base)


@pytest.mark.parametrize("kind", ("ltx2", "ltx2.3"))
@pytest.mark.parametrize("producer", ("lightricks", "comfyui-extract"))
def test_a_file_with_the_text_connectors_in_lightricks_names_matches_a_merge_of_its_tensors(kind, producer, tmp_path):
    """A LoRA over the whole checkpoint: its diffusion model holds the connector blocks (diffusers' converter sends
    them to the transformer, where peft drops them) and the text projection sits beside it. Lightricks' own files
    (ltx_core reads only ``lora_A`` / ``lora_B``) carry both, in bfloat16; ComfyUI's LoraSave, over its diffusion
    model, the blocks (``lora_up`` / ``lora_down``, float16). All of them belong to ``connectors``."""
    renames = LTX23_RENAMES if kind == "ltx2.3" else LTX2_RENAMES
    t_sd, _ = peft_adapter(kind, 4, targets=["to_q", "to_v", "ff.net.2", "proj_in", "audio_proj_in", "time_embed.linear"])
    c_sd, _ = peft_adapter(kind, 5, "connectors")
    if producer == "lightricks":
        sd = {k: v.bfloat16() for k, v in lightricks_names(t_sd, renames).items()}
        sd |= {k: v.bfloat16() for k, v in lightricks_connectors(c_sd).items()}
        assert any(k.startswith("text_embedding_projection.") for k in sd)
    else:
        c_sd = {k: v for k, v in c_sd.items() if "_proj_in" not in k}
        sd = comfyui_extract(t_sd, lambda m: next(iter(lightricks_names({m: None}, renames))))
        sd |= comfyui_extract(c_sd, connector_original)
    assert "diffusion_model.patchify_proj.lora_A.weight" in sd or "diffusion_model.patchify_proj.lora_down.weight" in sd
    assert any(k.startswith("diffusion_model.audio_embeddings_connector.transformer_1d_blocks.0.attn1.") for k in sd)
    path = save_state_dict(sd, tmp_path / "full.safetensors")
    base = outputs(pipeline(kind))
    mine = lora_loader.attach(pipeline(kind))
    report = mine.load_lora_weights(path, adapter_name="x")
    assert report.modules == {"transformer": len(t_sd) // 2, "connectors": len(c_sd) // 2}
    assert_close(outputs(mine), merged(kind, sd, renames), base)


def test_ltx_video_top_level_original_names_match_a_merge_of_the_files_tensors(tmp_path):
    """``patchify_proj`` and ``adaln_single.*``: diffusers' LTX-Video converter keeps them as they are (and peft then
    finds no such modules); here they are ``proj_in`` and ``time_embed.*``, as the checkpoint converter renames them."""
    sd, _ = peft_adapter("ltx-video", 6)
    sd = lightricks_names(sd, LTXV_RENAMES)
    sd |= {k.replace("lora_A.weight", "alpha"): torch.tensor(2.0) for k in sd if "patchify" in k and k.endswith("lora_A.weight")}
    assert {"diffusion_model.patchify_proj.alpha", "diffusion_model.adaln_single.linear.lora_B.weight"} <= set(sd)
    path = save_state_dict(sd, tmp_path / "ltxv.safetensors")
    mine = lora_loader.attach(pipeline("ltx-video"))
    base = outputs(mine)
    mine.load_lora_weights(path, adapter_name="x")
    assert_close(outputs(mine), merged("ltx-video", sd, LTXV_RENAMES), base)


def test_ai_toolkit_lokr_in_lightricks_names_matches_a_merge_of_its_factors(tmp_path):
    g = torch.Generator().manual_seed(7)
    sd = {}
    for path in ("transformer_blocks.0.audio_attn1.to_q", "transformer_blocks.0.attn2.to_k", "patchify_proj"):
        module = pipeline("ltx2").transformer.get_submodule(to_diffusers_name(path, LTX2_RENAMES))
        out_features, in_features = module.weight.shape
        stem = f"diffusion_model.{path}"
        sd[f"{stem}.lokr_w1"] = torch.randn(2, 2, generator=g)
        sd[f"{stem}.lokr_w2_a"] = torch.randn(out_features // 2, 3, generator=g) * 0.5
        sd[f"{stem}.lokr_w2_b"] = torch.randn(3, in_features // 2, generator=g) * 0.5
        sd[f"{stem}.alpha"] = torch.tensor(2.0)
    path = save_state_dict(sd, tmp_path / "lokr.safetensors")
    mine = lora_loader.attach(pipeline("ltx2"))
    base = outputs(mine)
    mine.load_lora_weights(path, adapter_name="k")
    assert_close(outputs(mine), merged("ltx2", sd, LTX2_RENAMES), base, keys=("video", "audio"))


# -- switching, fusing, refusing ---------------------------------------------------------------------


def ltx23_original_file(directory) -> str:
    t_sd, _ = peft_adapter("ltx2.3", 8)
    c_sd, _ = peft_adapter("ltx2.3", 9, "connectors")
    sd = lightricks_names(t_sd, LTX23_RENAMES) | lightricks_connectors(c_sd)
    return save_state_dict(sd, directory / "ltx23.safetensors")


def test_disable_is_exact_and_unfuse_gives_back_every_weight_bit_for_bit(tmp_path):
    mine = lora_loader.attach(pipeline("ltx2.3"))
    before = {c: {k: v.clone() for k, v in getattr(mine, c).state_dict().items()} for c in ("transformer", "connectors")}
    base = outputs(mine)
    mine.load_lora_weights(ltx23_original_file(tmp_path), adapter_name="x")
    loaded = outputs(mine)
    assert max(float((loaded[k] - base[k]).abs().max()) for k in base) > MOVED
    mine.disable_lora()
    assert all(torch.equal(outputs(mine)[k], base[k]) for k in base)
    mine.enable_lora()
    mine.fuse_lora(components=["transformer", "connectors"])
    fused = outputs(mine)
    assert all(float((fused[k] - loaded[k]).abs().max()) <= TOLERANCE for k in base)
    mine.unfuse_lora(components=["transformer", "connectors"])
    for component, state in before.items():
        now = getattr(mine, component).state_dict()
        assert all(torch.equal(now[k], v) for k, v in state.items() if k in now), component


def test_a_file_in_lightricks_names_saved_in_the_diffusers_layout_loads_in_diffusers_to_the_same_outputs(tmp_path):
    mine = lora_loader.attach(pipeline("ltx2.3"))
    mine.load_lora_weights(ltx23_original_file(tmp_path), adapter_name="x")
    path = os.fspath(tmp_path / "diffusers.safetensors")
    mine.save_lora_weights(path, "x", format="diffusers")
    ref = pipeline("ltx2.3")
    base = outputs(ref)
    ref.load_lora_weights(path, adapter_name="x")
    assert_close(outputs(mine), outputs(ref), base)


def test_keys_the_model_lacks_are_refused_whole_and_listed_with_strict_false(tmp_path):
    t_sd, _ = peft_adapter("ltx2", 10, targets=["to_q", "to_k"])
    sd = lightricks_names(t_sd, LTX2_RENAMES)
    extra = {
        "diffusion_model.transformer_blocks.3.audio_attn1.to_q.lora_A.weight": torch.ones(4, 8),  # no block 3
        "diffusion_model.transformer_blocks.3.audio_attn1.to_q.lora_B.weight": torch.ones(8, 4),
        "diffusion_model.av_ca_video_gate_adaln_single.linear.lora_A.weight": torch.ones(4, 16),  # no such module
        "diffusion_model.av_ca_video_gate_adaln_single.linear.lora_B.weight": torch.ones(16, 4),
    }
    path = save_state_dict(sd | extra, tmp_path / "bad.safetensors")
    mine = lora_loader.attach(pipeline("ltx2"))
    before = {c: {k: v.clone() for k, v in getattr(mine, c).state_dict().items()} for c in ("transformer", "connectors")}
    with pytest.raises(LoraError) as err:
        mine.load_lora_weights(path, adapter_name="x")
    assert all(key in str(err.value) for key in extra)
    assert "no LTX-2 module" in str(err.value)
    for component, state in before.items():
        now = getattr(mine, component).state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    with pytest.warns(Warning):
        report = mine.load_lora_weights(path, adapter_name="x", strict=False)
    assert set(report.skipped) == set(extra) and report.modules == {"transformer": len(t_sd) // 2}


# -- per-modality weights ------------------------------------------------------------------------------

# The modules that write LTX-2's audio stream, per block (video_to_audio_attn: queries from audio, out into audio).
AUDIO_MODULES = ("audio_attn1", "audio_attn2", "audio_ff", "video_to_audio_attn")


def test_audio_blocks_at_weight_zero_equal_the_files_video_half_alone(tmp_path):
    t_sd, _ = peft_adapter("ltx2", 11, targets=[n for n in linears(pipeline("ltx2").transformer) if n.startswith("transformer_blocks.")])
    c_sd, _ = peft_adapter("ltx2", 12, "connectors")
    sd = lightricks_names(t_sd, LTX2_RENAMES) | lightricks_connectors(c_sd)
    is_audio = [f"transformer_blocks.{i}.{m}." for i in range(1) for m in AUDIO_MODULES] + ["audio_embeddings_connector."]
    video_only = {k: v for k, v in sd.items() if not any(a in k for a in is_audio)}
    assert len(video_only) < len(sd)
    full, half = lora_loader.attach(pipeline("ltx2")), lora_loader.attach(pipeline("ltx2"))
    full.load_lora_weights(save_state_dict(sd, tmp_path / "all.safetensors"), adapter_name="x")
    half.load_lora_weights(save_state_dict(video_only, tmp_path / "video.safetensors"), adapter_name="x")
    blocks = len(full.transformer.transformer_blocks)
    audio = {f"transformer_blocks.{i}.{m}": 0.0 for i in range(blocks) for m in AUDIO_MODULES}
    full.set_adapters("x", {"transformer": audio, "connectors": {"audio_connector": 0.0}})
    got, want = outputs(full), outputs(half)
    assert all(float((got[k] - want[k]).abs().max()) <= 1e-6 for k in got)
    full.set_adapters("x", 1.0)
    assert float((outputs(full)["audio"] - want["audio"]).abs().max()) > MOVED


# -- which family --------------------------------------------------------------------------------------


def test_detect_family_and_inspect_name_ltx2_and_ltx_video_in_every_layout(tmp_path):
    t_sd, _ = peft_adapter("ltx2", 13, targets=["to_q", "proj_in"])
    v_sd, _ = peft_adapter("ltx-video", 13, targets=["to_q", "proj_in", "time_embed.linear"])
    layouts = {
        "ltx2": [
            {f"transformer.{k}": v for k, v in t_sd.items()},
            lightricks_names(t_sd, LTX2_RENAMES),
            {f"lora_unet_{k.rpartition('.lora_')[0].removeprefix('diffusion_model.').replace('.', '_')}"
             f".lora_{'down' if '.lora_A.' in k else 'up'}.weight": v for k, v in lightricks_names(t_sd, LTX2_RENAMES).items()},
        ],
        "ltx-video": [{f"transformer.{k}": v for k, v in v_sd.items()}, lightricks_names(v_sd, LTXV_RENAMES)],
    }
    for family, files in layouts.items():
        for sd in files:
            converted = convert(sd)
            assert not converted.unknown
            assert detect_family(converted.deltas)[0] == family, sorted(sd)[:2]
    # Names that settle nothing (the text projection alone): the producer's header decides.
    projection = {"text_embedding_projection.aggregate_embed.lora_A.weight": torch.ones(2, 64),
                  "text_embedding_projection.aggregate_embed.lora_B.weight": torch.ones(32, 2)}  # fmt: skip
    assert detect_family(convert(projection).deltas, {"ss_base_model_version": "ltx2"})[0] == "ltx2"
    path = tmp_path / "ai-toolkit.safetensors"
    save_file({k: v.contiguous() for k, v in layouts["ltx2"][1].items()}, os.fspath(path))
    info = inspect_lora(os.fspath(path))
    assert info["family"] == "ltx2" and "LTX-2" in format_inspection(info)
