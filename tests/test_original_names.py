"""The original-name tables and their engine (formats/original_names), against diffusers' own converter.

diffusers' ``_convert_kohya_flux_lora_to_diffusers`` is the oracle for BFL's Flux names: every
module it writes must carry the same dense change (``B @ A``, alpha folded in) as the delta the
table-driven converter gives for that module. The SD3 table is checked end to end against PEFT
in test_flux_layouts; here both tables are checked to be self-consistent (every diffusers path
maps back to its original name) and the engine's rules (row splits, swaps) on their own.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_loader import LoraError
from lora_loader.config import LoraConfig, fields_from_deltas, read_adapter_config
from lora_loader.delta import LoraDelta
from lora_loader.errors import LoraFileError, LoraFormatError
from lora_loader.formats import ConvertedLora, convert
from lora_loader.formats.original_names import FAMILIES, FLUX, SD3, Blocks, Family, Target, family_of, fused, swapped

RANK = 2
HIDDEN = 3072  # diffusers' converter hard-codes FLUX.1's linear1 split [3072, 3072, 3072, 12288]


def _kohya_flux_state_dict(blocks: int = 2) -> dict[str, torch.Tensor]:
    """A Kohya Flux LoRA on every module of the table (small input widths; real fused row counts)."""
    g = torch.Generator().manual_seed(0)
    rows = {"img_attn_qkv": 3 * 24, "txt_attn_qkv": 3 * 24, "linear1": 3 * HIDDEN + 4 * HIDDEN, "final_layer_adaLN_modulation_1": 32}
    names = [f"double_blocks_{i}_{s}" for i in range(blocks) for s in (
        "img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2", "img_mod_lin",
        "txt_attn_proj", "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")]  # fmt: skip
    names += [f"single_blocks_{i}_{s}" for i in range(blocks) for s in ("linear1", "linear2", "modulation_lin")]
    names += ["img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer", "vector_in_out_layer",
              "guidance_in_in_layer", "guidance_in_out_layer", "final_layer_linear", "final_layer_adaLN_modulation_1"]  # fmt: skip
    sd = {}
    for n, name in enumerate(names):
        out = next((r for suffix, r in rows.items() if name.endswith(suffix)), 16)
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, 8, generator=g)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, RANK, generator=g)
        # diffusers' converter drops the final layer's alpha ("TODO: alphas"): there, alpha = rank
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(RANK if name.startswith("final_layer") else 1 + n % 4))
    return sd


def test_a_kohya_flux_file_converts_to_what_diffusers_own_converter_gives():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    sd = _kohya_flux_state_dict()
    ours = convert(sd)
    assert ours.format == "kohya" and not ours.unknown
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    paths = sorted(k[: -len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight"))
    assert len(paths) == len(ours.deltas) == 2 * 14 + 2 * 6 + 10
    for path in paths:
        delta = ours.deltas[("denoiser", path.removeprefix("transformer."))]
        expected = theirs[f"{path}.lora_B.weight"] @ theirs[f"{path}.lora_A.weight"]
        torch.testing.assert_close(delta.scale * delta.up @ delta.down, expected, rtol=1e-5, atol=1e-5)


def test_the_parts_of_a_fused_projection_share_one_down_tensor():
    ours = convert(_kohya_flux_state_dict(blocks=1))
    parts = [ours.deltas[("denoiser", f"single_transformer_blocks.0.{p}")] for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert all(p.down is parts[0].down for p in parts)
    assert [p.up.shape[0] for p in parts] == [HIDDEN, HIDDEN, HIDDEN, 4 * HIDDEN]


# The families with original names (CogVideoX and Mochi have only `detect`: their LoRAs are in diffusers' names).
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.blocks], ids=lambda f: f.name)
def test_every_diffusers_path_of_a_table_maps_back_to_its_original_name(family):
    originals = [b.original.replace("{i}", "7") + s for b in family.blocks for s in b.modules] + list(family.modules)
    for name in originals:
        target = family.targets(name)
        assert target is not None, name
        for part, path in enumerate(target.paths):
            assert family.original_name(path) == (name, part), path
    # A family whose block names are all another's too (Flux.2's are Flux.1's) is told apart by a whole file's names.
    assert family_of([originals[0]]) is family or family_of(originals) is family
    assert family.original_name("no.such.module") is None


def test_family_of_is_none_for_names_of_no_family():
    assert family_of(["down_blocks_0_attentions_0_proj_in", "transformer_blocks_0_attn_to_q"]) is None
    assert family_of(["joint_blocks_3_x_block_attn_qkv"]) is SD3 and family_of(["single_blocks_0_linear2"]) is FLUX


def test_a_module_the_table_lacks_is_refused_with_the_familys_hint():
    parts, why = FLUX.convert_module("double_blocks_0_img_attn_norm", LoraDelta(torch.ones(2, 4), torch.ones(4, 2)))
    assert parts == [] and why == "'double_blocks_0_img_attn_norm' is no Flux module lora_loader knows (double_blocks_*, single_blocks_*, img_in, ...)"
    _, why = SD3.convert_module("joint_blocks_0_x_block_nope", LoraDelta(torch.ones(2, 4), torch.ones(4, 2)))
    assert "is no SD3 module lora_loader knows (joint_blocks_*_x_block_*, context_embedder, ...)" in why


def test_a_new_family_is_a_table_and_its_rules_are_the_engines():
    demo = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {
        "qkv_mlp": fused(("q", 1), ("k", 1), ("v", 1), ("mlp", 2)),
        "fixed": Target(("a", "b"), counts=(3, 1)),
        "mod": swapped("norm.linear"),
    }),), modules={"head": "proj_out"})  # fmt: skip
    down, up = torch.randn(2, 4), torch.randn(10, 2)
    parts, why = demo.convert_module("blocks_1_qkv_mlp", LoraDelta(down, up, 4.0))
    assert why is None and [p for p, _ in parts] == ["layers.1.q", "layers.1.k", "layers.1.v", "layers.1.mlp"]
    assert [d.up.shape[0] for _, d in parts] == [2, 2, 2, 4] and all(d.down is down and d.alpha == 4.0 for _, d in parts)
    torch.testing.assert_close(torch.cat([d.up for _, d in parts]), up)
    parts, why = demo.convert_module("blocks_0_fixed", LoraDelta(down, torch.randn(4, 2)))
    assert why is None and [d.up.shape[0] for _, d in parts] == [3, 1]
    assert demo.convert_module("blocks_0_fixed", LoraDelta(down, torch.randn(5, 2)))[1] == (
        "lora_up has 5 rows, which do not split into the 2 fused projections")
    mod_up = torch.arange(8.0).reshape(4, 2)
    [(path, swapped_delta)], _ = demo.convert_module("blocks_2_mod", LoraDelta(down, mod_up))
    assert path == "layers.2.norm.linear" and swapped_delta.up.tolist() == mod_up[[2, 3, 0, 1]].tolist()
    assert demo.convert_module("head", LoraDelta(down, up))[0][0][0] == "proj_out"


def test_a_table_entry_that_cannot_be_applied_is_refused_when_the_table_is_built():
    with pytest.raises(ValueError, match="fused projection"):
        Target(("a", "b"), swap="always")
    with pytest.raises(ValueError, match="2 paths"):
        Target(("a", "b"), ratios=(1, 2, 3))
    with pytest.raises(ValueError, match="swap="):
        swapped("a", when="sometimes")


def test_sd3_swaps_a_modulation_only_when_it_has_two_halves():
    two = LoraDelta(torch.randn(2, 4), torch.arange(16.0).reshape(8, 2))  # 2 rows per input feature
    six = LoraDelta(torch.randn(2, 4), torch.arange(48.0).reshape(24, 2))
    [(_, d)], _ = SD3.convert_module("joint_blocks_5_context_block_adaLN_modulation_1", two)
    assert d.up.tolist() == torch.cat(two.up.chunk(2)[::-1]).tolist()
    [(_, d)], _ = SD3.convert_module("joint_blocks_5_context_block_adaLN_modulation_1", six)
    assert d.up.tolist() == six.up.tolist()
    [(_, d)], _ = SD3.convert_module("joint_blocks_5_x_block_adaLN_modulation_1", two)
    assert d.up.tolist() == two.up.tolist()


def test_a_file_of_no_lora_keys_is_not_lora_and_a_broken_lora_is():
    not_lora = convert({"model.layers.0.weight": torch.ones(2, 2), "x.lora_weird": torch.ones(2)})
    assert not_lora.is_not_lora() and not_lora.unrecognized == set(not_lora.unknown)
    error = not_lora.not_lora_error("f.safetensors", {"model.layers.0.weight": torch.ones(2, 2)})
    assert isinstance(error, LoraFormatError) and str(error).startswith("f.safetensors: not a LoRA file: none of its 1 keys")
    half = convert({"m.lora_A.weight": torch.ones(2, 4)})  # a LoRA key without its pair: a broken LoRA, not "no LoRA"
    assert not half.is_not_lora() and half.unknown and not half.unrecognized
    comfy = convert({"diffusion_model.x.weird": torch.ones(2)})  # ComfyUI's prefix, no LoRA suffix: its own message
    assert not comfy.is_not_lora()
    assert ConvertedLora().is_not_lora()


def test_config_fields_from_deltas_give_the_common_rank_and_alpha_and_patterns_for_the_rest():
    deltas = {
        "a.q": LoraDelta(torch.ones(4, 8), torch.ones(8, 4), 8.0),
        "a.k": LoraDelta(torch.ones(4, 8), torch.ones(8, 4), 8.0),
        "b.v": LoraDelta(torch.ones(2, 8), torch.ones(8, 2), 0.5),
    }
    fields = fields_from_deltas(deltas)
    assert fields == {"r": 4, "lora_alpha": 8, "rank_pattern": {"b.v": 2}, "alpha_pattern": {"b.v": 0.5},
                      "target_modules": ["a.k", "a.q", "b.v"], "use_rslora": False, "use_dora": False}  # fmt: skip
    config = LoraConfig.from_deltas(deltas, base_model_name_or_path="x")
    assert config.rank_pattern == {r"b\.v": 2} and config.base_model_name_or_path == "x"
    assert (config.rank_for("b.v"), config.alpha_for("b.v"), config.alpha_for("a.q")) == (2, 0.5, 8.0)
    deltas["c"] = LoraDelta(torch.ones(4, 8), torch.ones(8, 4), 8.0, use_rslora=True)
    with pytest.raises(LoraError, match="adapter 'z' mixes rsLoRA"):
        LoraConfig.from_deltas(deltas, who="adapter 'z'")


def test_adapter_config_json_is_read_in_one_place(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    assert read_adapter_config(str(tmp_path / "adapter_config.json")) == {"r": 2, "lora_alpha": 4}
    assert LoraConfig.from_pretrained(str(tmp_path)).r == 2
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(LoraFileError, match="holds a JSON object"):
        LoraConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(LoraFileError, match="not a valid adapter_config.json"):
        read_adapter_config(str(tmp_path / "adapter_config.json"))


def test_a_dora_magnitude_and_a_trained_bias_follow_the_rows_of_a_split_or_swapped_module():
    """PEFT's DoRA magnitude (one norm per output row) and a trained bias are indexed by output row, like lora_B:
    a fused projection's parts take their rows of them, a (shift, scale) swap trades their halves."""
    g = torch.Generator().manual_seed(0)
    down, up, magnitude, bias = (torch.randn(2, 8, generator=g), torch.randn(12, 2, generator=g),
                                 torch.randn(12, generator=g), torch.randn(12, generator=g))  # fmt: skip
    delta = LoraDelta(down, up, 4.0, magnitude=magnitude, bias=bias, dropout=0.1)
    parts, why = FLUX.convert_module("double_blocks_0_img_attn_qkv", delta)
    assert why is None and [p for p, _ in parts] == [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    for (_, part), rows in zip(parts, (slice(0, 4), slice(4, 8), slice(8, 12))):
        assert torch.equal(part.up, up[rows]) and part.down is down
        assert torch.equal(part.magnitude, magnitude[rows]) and torch.equal(part.bias, bias[rows])
        assert (part.alpha, part.dropout) == (4.0, 0.1)
    (path, swapped_delta), = FLUX.convert_module("final_layer_adaLN_modulation_1", delta)[0]
    assert path == "norm_out.linear"
    assert torch.equal(swapped_delta.magnitude, torch.cat([magnitude[6:], magnitude[:6]]))
    assert torch.equal(swapped_delta.up, torch.cat([up[6:], up[:6]]))


def test_a_file_is_read_by_the_family_whose_table_knows_most_of_its_names():
    """Families share block names (Flux's and HunyuanVideo's double_blocks): the table that knows the file's
    modules wins, not the first whose block pattern matches."""
    other = Family("Other", hint="double_blocks_*", blocks=(Blocks("double_blocks_{i}_", "blocks.{i}.", {
        "img_mlp_fc1": "ff.up", "img_mlp_fc2": "ff.down", "img_attn_qkv": fused("q", "k", "v")}),))
    names = ["double_blocks_0_img_mlp_fc1", "double_blocks_0_img_mlp_fc2", "double_blocks_0_img_attn_qkv"]
    from lora_loader.formats import original_names

    saved = original_names.FAMILIES
    original_names.FAMILIES = (FLUX, other)
    try:
        assert family_of(names) is other  # Flux knows img_attn_qkv only
        assert family_of(["double_blocks_0_img_mlp_0", "double_blocks_0_img_attn_qkv"]) is FLUX
        assert family_of(["double_blocks_0_no_such_module"]) is FLUX  # block names alone: the first family
    finally:
        original_names.FAMILIES = saved
