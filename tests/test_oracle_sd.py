"""lora_loader against the reference implementation: diffusers' own LoRA loading (with peft).

Each file is written by a real producer (`producers.py`: PEFT + diffusers'
``save_lora_weights``, diffusers' Kohya converter, sd-scripts' naming, diffusers'
pre-PEFT layouts), loaded once by diffusers into one tiny pipeline and once by
lora_loader into an identical one, and the UNet and text-encoder outputs must
agree to 1e-4 for SD 1.5- and SDXL-shaped pipelines. Every comparison also
checks that the LoRA moved each output by more than 1e-3, so a loader that
silently loads nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from producers import (
    kohya_from_peft,
    old_diffusers_lora,
    peft_lora,
    save_diffusers_lora,
    save_state_dict,
    sd_scripts_sd15_lora,
    sd_scripts_sdxl_lora,
)
from tiny import outputs, tiny_sd_pipeline, tiny_sdxl_pipeline

import lora_loader

# diffusers' own multi-adapter loading warns about this on every second adapter.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TOLERANCE = 1e-4  # max abs difference between lora_loader and diffusers+peft
MOVED = 1e-3  # min max abs difference between the LoRA'd and the base output

PIPELINES = {"sd": (tiny_sd_pipeline, StableDiffusionPipeline), "sdxl": (tiny_sdxl_pipeline, StableDiffusionXLPipeline)}
KINDS = tuple(PIPELINES)
TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}

# PEFT configs as diffusers' training scripts build them. Rank != alpha everywhere, and
# rank_pattern / alpha_pattern / rsLoRA make the scale differ from module to module.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def peft_configs(kind: str) -> dict[str, LoraConfig]:
    configs = {
        "unet": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=UNET_TARGETS,
            rank_pattern={"to_k": 2, "time_emb_proj": 6},
            alpha_pattern={"conv1": 2, r"up_blocks\.1\.attentions\.\d.*to_v": 16},
            use_rslora=kind == "sdxl",
            init_lora_weights=False,
        ),
        "text_encoder": LoraConfig(
            r=4,
            lora_alpha=2,
            target_modules=TE_TARGETS,
            alpha_pattern={"fc1": 6},
            use_rslora=True,
            init_lora_weights=False,
        ),
    }
    if kind == "sdxl":
        configs["text_encoder_2"] = LoraConfig(
            r=2, lora_alpha=6, target_modules=TE_TARGETS, rank_pattern={"out_proj": 3}, init_lora_weights=False
        )
    return configs


# For diffusers' Kohya converter: one rank everywhere (the converter writes alpha = rank), on
# linears, 1x1 and 3x3 convs, the samplers, conv_in/conv_out and the time embedding.
# One rank and one alpha per component, because diffusers (the oracle) turns Kohya alphas into
# a PEFT alpha_pattern whose keys do not match attention projections or text-encoder modules:
# an alpha differing from the most common one there would be ignored by diffusers.
# add_embedding (SDXL) is left out on purpose: diffusers cannot load a Kohya key
# `lora_unet_add_embedding_linear_1` in diffusers naming (its SDXL "emb" heuristic in
# `_convert_unet_lora_key` strips the `_1` and it warns "unexpected keys" and drops the layer),
# so it would not be a valid oracle for that layer.
KOHYA_UNET_TARGETS = (
    r".*\.(to_q|to_k|to_v|to_out\.0|ff\.net\.2|proj_out|conv2|conv_shortcut|time_emb_proj)"
    r"|.*(downsamplers|upsamplers)\.0\.conv|conv_in|conv_out|time_embedding\.linear_[12]"
)


def kohya_configs(kind: str) -> dict[str, LoraConfig]:
    configs = {"unet": LoraConfig(r=4, lora_alpha=4, target_modules=KOHYA_UNET_TARGETS, init_lora_weights=False)}
    for te in TEXT_ENCODERS[kind]:
        configs[te] = LoraConfig(
            r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "out_proj", "fc2"], init_lora_weights=False
        )
    return configs


# -- helpers ---------------------------------------------------------------------------------------


def oracle(kind: str, *sources) -> StableDiffusionPipeline:
    """A tiny pipeline with ``(name, file)`` sources loaded by diffusers itself (peft backend)."""
    pipe = PIPELINES[kind][0](0)
    for name, src in sources:
        pipe.load_lora_weights(src, adapter_name=name)
    return pipe


def mine(kind: str, *sources):
    """The same pipeline with the same sources loaded by lora_loader; returns (pipe, reports)."""
    pipe = lora_loader.attach(PIPELINES[kind][0](0))
    reports = [pipe.load_lora_weights(src, adapter_name=name) for name, src in sources]
    return pipe, reports


def oracle_module_counts(pipe, adapter: str) -> dict[str, int]:
    counts = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        n = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in m.lora_A)
        if n:
            counts[component] = n
    return counts


def assert_matches_oracle(got: dict, want: dict, base: dict) -> None:
    """Every output within TOLERANCE of diffusers', and every output moved by the LoRA."""
    assert set(got) == set(want)
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= TOLERANCE, f"{key}: lora_loader differs from diffusers+peft by {diff:.3g}"
    for key in want:
        change = (want[key] - base[key]).abs().max().item()
        assert change > MOVED, f"{key}: the LoRA moves this output by only {change:.3g}; the check proves nothing"


def check_single_file(kind: str, path, base_outputs) -> None:
    reference = oracle(kind, ("a", path))
    pipe, (report,) = mine(kind, ("a", path))
    assert report.modules == oracle_module_counts(reference, "a")
    assert_matches_oracle(outputs(pipe), outputs(reference), base_outputs[kind])


# -- files, written once per module ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_outputs():
    return {kind: outputs(factory(0)) for kind, (factory, _) in PIPELINES.items()}


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """Per kind, a diffusers-format file (PEFT keys, ``lora_adapter_metadata`` header) from ``save_lora_weights``."""
    out = {}
    for kind, (factory, cls) in PIPELINES.items():
        configs = peft_configs(kind)
        state_dicts = peft_lora(factory, 11, configs)
        folder = tmp_path_factory.mktemp(f"peft-{kind}")
        out[kind] = save_diffusers_lora(folder, cls, state_dicts, configs, "lora.safetensors")
    return out


@pytest.fixture(scope="module")
def kohya_state_dicts():
    """Per kind, a Kohya state dict from diffusers' ``convert_state_dict_to_kohya`` (int64 alpha = rank)."""
    return {
        kind: kohya_from_peft(peft_lora(factory, 22, kohya_configs(kind))) for kind, (factory, _) in PIPELINES.items()
    }


# Kohya modules outside the UNet's down/mid/up blocks. diffusers cannot blend an adapter with
# block weights while any loaded adapter has such a layer: its `get_module_weight` raises
# IndexError on `conv_in` & co. The files blended with block weights leave them out.
OUTSIDE_BLOCKS = ("lora_unet_conv_in.", "lora_unet_conv_out.", "lora_unet_time_embedding_")


@pytest.fixture(scope="module")
def kohya_files(kohya_state_dicts, tmp_path_factory):
    """Per kind: ``"rank"`` as converted; ``"half"`` with every alpha overwritten by fp16 2.0 (rank 4:
    scale 0.5); ``"blocks"``: "half" without the modules outside the UNet blocks."""
    d = tmp_path_factory.mktemp("kohya")
    out = {}
    for kind, sd in kohya_state_dicts.items():
        half = {k: torch.tensor(2.0, dtype=torch.float16) if k.endswith(".alpha") else v for k, v in sd.items()}
        blocks = {k: v for k, v in half.items() if not k.startswith(OUTSIDE_BLOCKS)}
        assert len(blocks) < len(half)
        out[kind] = {
            "rank": save_state_dict(sd, d / f"{kind}-rank.safetensors"),
            "half": save_state_dict(half, d / f"{kind}-half.safetensors"),
            "blocks": save_state_dict(blocks, d / f"{kind}-blocks.safetensors"),
        }
    return out


# -- one file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_peft_file_with_rank_and_alpha_patterns_and_rslora_matches_diffusers(kind, peft_files, base_outputs):
    """A diffusers/PEFT file whose strengths come from the header's rank/alpha patterns and rsLoRA."""
    check_single_file(kind, peft_files[kind], base_outputs)


@pytest.mark.parametrize("kind", KINDS)
def test_kohya_file_from_diffusers_converter_matches_diffusers(kind, kohya_state_dicts, kohya_files, base_outputs):
    """``convert_state_dict_to_kohya`` output: int64 alpha = rank, LoCon 3x3 convs, samplers, conv_in/out."""
    sd = kohya_state_dicts[kind]
    assert sd["lora_unet_conv_in.alpha"].dtype == torch.int64
    assert sd["lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight"].shape[-2:] == (3, 3)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in sd
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in sd
    check_single_file(kind, kohya_files[kind]["rank"], base_outputs)


@pytest.mark.parametrize("kind", KINDS)
def test_kohya_alpha_below_rank_scales_as_in_diffusers(kind, kohya_files, base_outputs):
    """fp16 ``.alpha`` = rank / 2: every module at half strength, as diffusers reads Kohya alphas."""
    check_single_file(kind, kohya_files[kind]["half"], base_outputs)


def test_sd_scripts_sdxl_lora_with_stability_names_matches_diffusers(tmp_path, base_outputs):
    """sd-scripts' SDXL layout: Stability UNet names, LoCon on 3x3 convs, both text encoders.

    diffusers maps these names itself (`_maybe_map_sgm_blocks_to_diffusers`) and raises on
    keys it cannot rename, so matching its outputs validates the producer's names too.
    """
    sd = sd_scripts_sdxl_lora(tiny_sdxl_pipeline(0), 33)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_2_conv",  # up_blocks.0 upsampler
        "lora_unet_input_blocks_3_0_op",  # down_blocks.0 downsampler
        "lora_unet_input_blocks_1_0_in_layers_2",  # resnet conv1
        "lora_unet_output_blocks_0_0_out_layers_3",  # resnet conv2
        "lora_unet_input_blocks_4_0_emb_layers_1",  # resnet time_emb_proj
        "lora_unet_output_blocks_0_0_skip_connection",  # resnet conv_shortcut
        "lora_unet_time_embed_0",
        "lora_unet_label_emb_0_0",
        "lora_unet_input_blocks_0_0",  # conv_in
        "lora_unet_out_2",  # conv_out
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert f"{name}.lora_down.weight" in sd, name
    assert sd["lora_unet_output_blocks_2_2_conv.lora_down.weight"].shape[-2:] == (3, 3)
    assert sd["lora_unet_output_blocks_2_2_conv.lora_up.weight"].shape[-2:] == (1, 1)
    check_single_file("sdxl", save_state_dict(sd, tmp_path / "sdxl_sd_scripts.safetensors"), base_outputs)


def test_sd_scripts_sd15_lora_with_diffusers_names_matches_diffusers(tmp_path, base_outputs):
    """sd-scripts' SD 1.5 layout: mangled diffusers names, 1x1-conv proj_in, LoCon convs, ``lora_te_``."""
    sd = sd_scripts_sd15_lora(tiny_sd_pipeline(0), 44)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[-2:] == (1, 1)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[-2:] == (3, 3)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    check_single_file("sd", save_state_dict(sd, tmp_path / "sd15_sd_scripts.safetensors"), base_outputs)


OLD_LAYOUT_UNET = LoraConfig(
    r=4,
    lora_alpha=4,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
    init_lora_weights=False,
)
OLD_LAYOUT_TE = LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights=False)


@pytest.mark.parametrize("kind, text_encoder_style", [("sd", "processor"), ("sdxl", "lora_linear_layer")])
def test_old_diffusers_attention_processor_layout_matches_diffusers(kind, text_encoder_style, tmp_path, base_outputs):
    """diffusers <= 0.25: ``attn1.processor.to_q_lora.down.weight``, ``to_out_lora``, ``proj_in.lora.down.weight``,
    text encoders as ``self_attn.to_q_lora`` or ``q_proj.lora_linear_layer``; no alpha (scale 1)."""
    configs = {"unet": OLD_LAYOUT_UNET, **{te: OLD_LAYOUT_TE for te in TEXT_ENCODERS[kind]}}
    sd = old_diffusers_lora(peft_lora(PIPELINES[kind][0], 55, configs), text_encoder_style)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight" in sd
    assert "unet.mid_block.attentions.0.proj_in.lora.down.weight" in sd
    te_q = {"processor": "to_q_lora", "lora_linear_layer": "q_proj.lora_linear_layer"}[text_encoder_style]
    assert f"text_encoder.text_model.encoder.layers.0.self_attn.{te_q}.up.weight" in sd
    check_single_file(kind, save_state_dict(sd, tmp_path / "old.safetensors"), base_outputs)


# -- two adapters ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=KINDS)
def pair(request, peft_files, kohya_files):
    """Per kind: (diffusers pipeline, lora_loader pipeline), each with adapter "a" (PEFT file) and
    "b" (Kohya, half alpha, UNet blocks only) loaded. Tests set the blend they need; none deletes."""
    kind = request.param
    sources = [("a", peft_files[kind]), ("b", kohya_files[kind]["blocks"])]
    pipe, _ = mine(kind, *sources)
    return kind, oracle(kind, *sources), pipe


def compare_blend(pair, base_outputs, names, **weights) -> None:
    kind, reference, pipe = pair
    reference.set_adapters(names, **weights)
    pipe.set_adapters(names, **weights)
    assert pipe.get_active_adapters() == reference.get_active_adapters()
    assert_matches_oracle(outputs(pipe), outputs(reference), base_outputs[kind])


def test_two_adapters_blended_with_adapter_weights_match_diffusers(pair, base_outputs):
    """``set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])``, diffusers' keyword, on a PEFT and a Kohya file."""
    compare_blend(pair, base_outputs, ["a", "b"], adapter_weights=[0.7, 0.3])


def test_per_component_weights_match_diffusers(pair, base_outputs):
    """One adapter weighted per component (UNet 0.7, text encoders 0.5 / 0.25), the other by one number."""
    kind = pair[0]
    per_component = {"unet": 0.7, "text_encoder": 0.5}
    if kind == "sdxl":
        per_component["text_encoder_2"] = 0.25
    compare_blend(pair, base_outputs, ["a", "b"], adapter_weights=[per_component, 0.6])


# Block weights as diffusers defines them, for the tiny UNets' blocks with attentions:
# SD: down block 0 (2 transformers), up block 1 (3); SDXL: down 1, 2 (2 each), up 0, 1 (3 each).
BLOCK_WEIGHTS = {
    "sd": {"unet": {"down": 0.2, "mid": 1.0, "up": {"block_1": [0.0, 1.0, 0.5]}}, "text_encoder": 0.5},
    "sdxl": {
        "unet": {
            "down": {"block_1": [0.0, 0.5], "block_2": 0.3},
            "mid": 0.0,
            "up": {"block_0": [1.0, 0.2, 0.0], "block_1": 0.6},
        },
        "text_encoder_2": 0.4,
    },
}


def test_unet_block_weights_match_diffusers(pair, base_outputs):
    """UNet block weights (down / mid / up, one weight per transformer) on adapter "a", "b" at 0.5."""
    compare_blend(pair, base_outputs, ["a", "b"], adapter_weights=[BLOCK_WEIGHTS[pair[0]], 0.5])


def test_set_adapters_to_one_of_two_matches_diffusers(pair, base_outputs):
    """With two loaded, ``set_adapters("b")`` leaves only "b" active, at weight 1.0."""
    compare_blend(pair, base_outputs, "b")


@pytest.mark.parametrize("kind", KINDS)
def test_deleting_one_of_two_adapters_leaves_the_other_as_in_diffusers(kind, peft_files, kohya_files, base_outputs):
    """``delete_adapters("a")`` after a 0.7 / 0.3 blend: "b" alone stays active at its weight 0.3, as in diffusers."""
    sources = [("a", peft_files[kind]), ("b", kohya_files[kind]["half"])]
    reference = oracle(kind, *sources)
    pipe, _ = mine(kind, *sources)
    for p in (reference, pipe):
        p.set_adapters(["a", "b"], [0.7, 0.3])
        p.delete_adapters("a")
    assert pipe.get_active_adapters() == reference.get_active_adapters() == ["b"]
    assert pipe.get_list_adapters() == reference.get_list_adapters()
    assert_matches_oracle(outputs(pipe), outputs(reference), base_outputs[kind])
