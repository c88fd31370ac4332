"""Flux Control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora) in diffusers' FluxControlPipeline.

A Control LoRA widens the transformer's input (``img_in`` / ``x_embedder`` takes the control image's
latents beside the noisy ones: 64 -> 128 channels in FLUX.1-dev, 4 -> 8 here), carries a
``lora_B.bias`` on every module and replaces the attention norms' scales. The files are written
(a) as diffusers' tests write them: a PEFT state dict in diffusers' names with a wider
``x_embedder.lora_A`` and ``transformer.<...>.norm_q.weight`` tensors, saved with
``FluxControlPipeline.save_lora_weights``; (b) in Black Forest Labs' own layout, keys spelled as in
the released files (``img_in``, ``double_blocks.N.img_attn.qkv``, ``img_attn.norm.query_norm.scale``,
``single_blocks.N.linear1``, ``lora_B.bias``, ...).

The oracle is diffusers+peft: ``FluxControlPipeline.load_lora_weights`` on an identical pipeline.
BFL's names are checked against diffusers' own ``_convert_bfl_flux_control_lora_to_diffusers`` on
a file with the real model's 19 + 38 blocks; the tiny BFL file reaches peft through this file's
copy of that converter (diffusers' own hard-codes FLUX.1's sizes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import _clip_config, _randomize, tiny_tokenizer
from tiny_dit import _t5, _vae
from transformers import CLIPTextModel

import lora_loader
from lora_loader import LoraError

peft = pytest.importorskip("peft")

RANK = 4
IN_CHANNELS = 4  # the base model's packed latent channels; the Control LoRA doubles them
CONTROL_IMAGE = Image.fromarray(np.random.RandomState(0).randint(0, 255, size=(16, 16, 3), dtype="uint8"))


def components(seed: int = 0) -> dict:
    """diffusers' FluxControlLoRATests components (its "real use case": a transformer with the base model's
    in_channels), two double and two single blocks, guidance embedding as in FLUX.1-dev, offline tokenizers."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=IN_CHANNELS, out_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )  # fmt: skip
    text_encoder = CLIPTextModel(_clip_config(32, projection=32))
    _randomize(transformer, seed)
    _randomize(text_encoder, seed + 1)
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(seed + 2), tokenizer_2=tiny_tokenizer(), transformer=transformer,
    )  # fmt: skip


def control_pipe(attach: bool = True) -> FluxControlPipeline:
    pipe = FluxControlPipeline(**components())
    pipe.set_progress_bar_config(disable=True)
    return lora_loader.attach(pipe) if attach else pipe


def flux_pipe(attach: bool = True) -> FluxPipeline:
    pipe = FluxPipeline(**components())
    pipe.set_progress_bar_config(disable=True)
    return lora_loader.attach(pipe) if attach else pipe


def flux_from(pipe) -> FluxPipeline:
    """A FluxPipeline on ``pipe``'s components (what ``FluxPipeline.from_pipe`` builds; diffusers' from_pipe checks
    each model's exact class, and an attached pipeline's components are attached too)."""
    names = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    flux = FluxPipeline(**{name: getattr(pipe, name) for name in names})
    flux.set_progress_bar_config(disable=True)
    return lora_loader.attach(flux)


@torch.no_grad()
def run(pipe) -> torch.Tensor:
    """Two denoising steps to latents from a fixed generator (a FluxPipeline gets no control image)."""
    extra = {"control_image": CONTROL_IMAGE} if isinstance(pipe, FluxControlPipeline) else {}
    return pipe(
        "red", num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="latent",
        max_sequence_length=8, generator=torch.Generator().manual_seed(0), **extra,
    ).images  # fmt: skip


# -- the files -------------------------------------------------------------------------------------------------

# BFL module -> the diffusers modules whose outputs it stacks (diffusers' converter's names), per block.
DOUBLE = {
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"], "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"], "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
}  # fmt: skip
SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"]}
GLOBAL = {
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "txt_in": ["context_embedder"], "img_in": ["x_embedder"],
    "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}  # fmt: skip
DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}  # fmt: skip
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def bfl_table(num_layers: int, num_single_layers: int) -> tuple[dict, dict]:
    """(BFL module -> diffusers parts, BFL norm -> diffusers norm) for a transformer of this depth."""
    modules, norms = dict(GLOBAL), {}
    for i in range(num_layers):
        modules |= {f"double_blocks.{i}.{k}": [f"transformer_blocks.{i}.{p}" for p in v] for k, v in DOUBLE.items()}
        norms |= {f"double_blocks.{i}.{k}": f"transformer_blocks.{i}.{v}" for k, v in DOUBLE_NORMS.items()}
    for i in range(num_single_layers):
        modules |= {f"single_blocks.{i}.{k}": [f"single_transformer_blocks.{i}.{p}" for p in v] for k, v in SINGLE.items()}
        norms |= {f"single_blocks.{i}.{k}": f"single_transformer_blocks.{i}.{v}" for k, v in SINGLE_NORMS.items()}
    return modules, norms


def bfl_control_lora(transformer, seed: int = 1, rows=None) -> dict:
    """A Control LoRA in BFL's layout for ``transformer``: every module the released files adapt, with a
    lora_B.bias, an img_in twice as wide as the x_embedder, and every attention norm's scale.
    ``rows(parts)`` gives a fused module's lora_B rows (default: the diffusers parts' out_features)."""
    g = torch.Generator().manual_seed(seed)
    live = dict(transformer.named_modules())
    config = transformer.config
    modules, norms = bfl_table(config.num_layers, config.num_single_layers)
    sd = {}
    for name, parts in modules.items():
        first = live[parts[0]]
        width = first.in_features * (2 if name == "img_in" else 1)
        out = rows(parts) if rows else sum(live[p].out_features for p in parts)
        sd[f"{name}.lora_A.weight"] = torch.randn(RANK, width, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.3
        sd[f"{name}.lora_B.bias"] = torch.randn(out, generator=g) * 0.3
    for name, target in norms.items():
        sd[f"{name}.scale"] = 1 + torch.randn(live[target].weight.shape, generator=g) * 0.5
    return sd


def to_diffusers_layout(bfl: dict, inner_dim: int, num_layers: int, num_single_layers: int) -> dict:
    """diffusers' ``_convert_bfl_flux_control_lora_to_diffusers`` for any size: lora_A shared by a fused
    module's parts, lora_B and its bias chunked (qkv in thirds, linear1 as [d, d, d, 4d]), the final
    modulation's (shift, scale) halves of lora_B and its bias swapped (not lora_A's: see the names test),
    norm scales as the norms' weights; ``transformer.`` first."""
    modules, norms = bfl_table(num_layers, num_single_layers)
    out = {}
    for name, parts in modules.items():
        a, b, bias = (bfl[f"{name}.{s}"] for s in ("lora_A.weight", "lora_B.weight", "lora_B.bias"))
        if name == "final_layer.adaLN_modulation.1":
            b, bias = (torch.cat(t.chunk(2, dim=0)[::-1]) for t in (b, bias))
        sizes = [inner_dim] * 3 + [4 * inner_dim] if len(parts) == 4 else [b.shape[0] // len(parts)] * len(parts)
        for part, b_rows, bias_rows in zip(parts, b.split(sizes), bias.split(sizes)):
            out[f"transformer.{part}.lora_A.weight"] = a.clone()
            out[f"transformer.{part}.lora_B.weight"] = b_rows.contiguous()
            out[f"transformer.{part}.lora_B.bias"] = bias_rows.contiguous()
    for name, target in norms.items():
        out[f"transformer.{target}.weight"] = bfl[f"{name}.scale"]
    return out


def tiny_files(tmp_path) -> tuple[str, str]:
    """The same tiny Control LoRA as a BFL file and as a diffusers file written by save_lora_weights."""
    transformer = components()["transformer"]
    bfl = bfl_control_lora(transformer)
    bfl_path = str(tmp_path / "control_bfl.safetensors")
    save_file(bfl, bfl_path)
    layers = to_diffusers_layout(bfl, 32, 2, 2)
    FluxControlPipeline.save_lora_weights(
        str(tmp_path), transformer_lora_layers={k[len("transformer."):]: v for k, v in layers.items()},
        weight_name="control_diffusers.safetensors",
    )  # fmt: skip
    return bfl_path, str(tmp_path / "control_diffusers.safetensors")


def oracle(path: str, disable: bool = False) -> torch.Tensor:
    """diffusers+peft's output with the file loaded (diffusers' own load_lora_weights, needs peft)."""
    pipe = control_pipe(attach=False)
    pipe.load_lora_weights(path, adapter_name="control")
    if disable:
        pipe.disable_lora()
    return run(pipe)


def snapshot(pipe) -> dict:
    t = pipe.transformer
    return {
        "x_embedder": t.x_embedder, "config": t._internal_dict, "in_channels": t.config.in_channels,
        "state": {k: v.clone() for k, v in t.state_dict().items()},
        "classes": {n: type(m) for n, m in t.named_modules()},
    }  # fmt: skip


def assert_as_before(pipe, before: dict) -> None:
    t = pipe.transformer
    assert t.x_embedder is before["x_embedder"] and t._internal_dict is before["config"]
    assert t.config.in_channels == before["in_channels"] == IN_CHANNELS
    assert {n: type(m) for n, m in t.named_modules()} == before["classes"]
    state = t.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())


# -- BFL's names, against diffusers' own converter ----------------------------------------------------------------


def test_bfl_names_convert_as_diffusers_converts_them_on_the_real_models_1094_keys():
    """A file with FLUX.1's 19 double and 38 single blocks, tiny tensors of the real row counts where diffusers
    splits (linear1's lora_B has 3 * 3072 + 12288 rows): every key lands where diffusers' converter puts it.

    One deliberate difference: the final modulation's lora_A. BFL's rows are (shift, scale), diffusers'
    (scale, shift), so lora_B's rows (and its bias) swap; diffusers' converter swaps lora_A's rows too, which
    permutes the rank components against lora_B's and changes the product. lora_loader keeps lora_A as it is:
    the product is then exactly BFL's with its rows swapped."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    from lora_loader.formats import convert

    modules, norms = bfl_table(19, 38)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in modules:
        rows = 21504 if name.endswith("linear1") else 6
        sd[f"{name}.lora_A.weight"] = torch.randn(2, 4, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(rows, 2, generator=g)
        sd[f"{name}.lora_B.bias"] = torch.randn(rows, generator=g)
    sd |= {f"{name}.scale": torch.randn(2, generator=g) for name in norms}
    assert len(sd) == 1094 and sum(k.endswith("lora_B.bias") for k in sd) == 314 and sum(k.endswith(".scale") for k in sd) == 152
    expected = _convert_bfl_flux_control_lora_to_diffusers(dict(sd))
    converted = convert(sd)
    assert converted.format == "bfl" and not converted.unknown and not converted.ignored
    got = {}
    for (component, path), delta in converted.deltas.items():
        assert component == "denoiser" and delta.alpha is None  # BFL's files have no alpha: scale 1
        got |= {f"transformer.{path}.lora_A.weight": delta.down, f"transformer.{path}.lora_B.weight": delta.up,
                f"transformer.{path}.lora_B.bias": delta.up_bias}  # fmt: skip
    got |= {f"transformer.{path}.weight": sd[key] for (_, path), key in converted.norm_weights.items()}
    assert got.keys() == expected.keys()
    final_a = "transformer.norm_out.linear.lora_A.weight"
    assert all(torch.equal(got[k], expected[k]) for k in expected if k != final_a)
    a = sd["final_layer.adaLN_modulation.1.lora_A.weight"]
    assert torch.equal(got[final_a], a) and torch.equal(expected[final_a], torch.cat(a.chunk(2)[::-1]))
    product = got["transformer.norm_out.linear.lora_B.weight"] @ got[final_a]
    shift, scale = (sd["final_layer.adaLN_modulation.1.lora_B.weight"] @ a).chunk(2)
    assert torch.equal(product, torch.cat([scale, shift]))


# -- loading, against diffusers+peft --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_a_control_lora_gives_diffusers_peft_output_and_unload_restores_the_base_exactly(layout, tmp_path):
    bfl_path, diffusers_path = tiny_files(tmp_path)
    expected = oracle(diffusers_path)  # diffusers reads the diffusers file; BFL's layout reaches it converted
    pipe = control_pipe()
    before = snapshot(pipe)
    base_flux = run(flux_pipe())
    report = pipe.load_lora_weights(bfl_path if layout == "bfl" else diffusers_path, adapter_name="control")
    assert report.format == layout
    t = pipe.transformer
    assert t.config.in_channels == 2 * IN_CHANNELS and t.x_embedder.in_features == 2 * IN_CHANNELS
    assert isinstance(t.x_embedder, torch.nn.Linear) and t.x_embedder is not before["x_embedder"]
    got = run(pipe)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - oracle(diffusers_path, disable=True)).abs().max() > 1e-2  # the LoRA does something

    pipe.unload_lora_weights()
    assert_as_before(pipe, before)
    assert torch.equal(run(flux_from(pipe)), base_flux), "the transformer is FLUX.1's again, bit for bit"


def test_disable_gives_the_base_model_on_the_widened_input_and_enable_gives_the_lora_back(tmp_path):
    """Disabled, the x_embedder stays wide (FluxControlPipeline still feeds it the control latents, as with
    diffusers+peft), its extra columns zero; the norms compute with their own weights again. diffusers+peft
    keeps the LoRA's norm weights while disabled (they are loaded into the model), so the reference here is
    the base transformer with only its x_embedder widened by zero columns."""
    _, path = tiny_files(tmp_path)
    pipe = control_pipe()
    pipe.load_lora_weights(path, adapter_name="control")
    on = run(pipe)
    reference = control_pipe(attach=False)
    t = reference.transformer
    wide = torch.nn.Linear(2 * IN_CHANNELS, t.x_embedder.out_features)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :IN_CHANNELS] = t.x_embedder.weight
        wide.bias.copy_(t.x_embedder.bias)
    t.x_embedder = wide
    t.register_to_config(in_channels=2 * IN_CHANNELS)
    pipe.disable_lora()
    assert torch.equal(run(pipe), run(reference))
    pipe.enable_lora()
    assert torch.equal(run(pipe), on)
    pipe.transformer.disable_lora()  # the component's own call, on the pipeline's registry
    assert torch.equal(run(pipe), run(reference))
    pipe.transformer.enable_lora()
    assert torch.equal(run(pipe), on)
    pipe.set_adapters("control", 0.0)  # weight 0: off as well, norms included
    assert torch.equal(run(pipe), run(reference))


def test_fuse_matches_the_lora_and_unfuse_and_unload_are_exact(tmp_path):
    _, path = tiny_files(tmp_path)
    pipe = control_pipe()
    before = snapshot(pipe)
    pipe.load_lora_weights(path, adapter_name="control")
    unfused = run(pipe)
    wide_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.fuse_lora()
    torch.testing.assert_close(run(pipe), unfused, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    assert torch.equal(run(pipe), unfused)
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in wide_state.items()), "unfuse gives every weight back bit for bit"
    pipe.unload_lora_weights()
    assert_as_before(pipe, before)


def test_fuse_then_unload_bakes_the_control_lora_into_a_wide_model(tmp_path):
    """diffusers' way of baking a LoRA in: the fused weights stay, and with them the wide x_embedder they live
    in (the model is a control model now). The norms go back to the base, as diffusers' unload puts them back."""
    _, path = tiny_files(tmp_path)
    pipe = control_pipe()
    pipe.load_lora_weights(path, adapter_name="control")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    t = pipe.transformer
    assert t.config.in_channels == 2 * IN_CHANNELS and t.x_embedder.in_features == 2 * IN_CHANNELS
    assert type(t.x_embedder) is torch.nn.Linear and "_lora_widened" not in t.x_embedder.__dict__
    assert not any(hasattr(m, "lora_adapters") or hasattr(m, "lora_norms") for m in t.modules())
    base = components()["transformer"]
    assert torch.equal(t.transformer_blocks[0].attn.norm_q.weight, base.transformer_blocks[0].attn.norm_q.weight)


def test_saving_a_control_lora_says_why_it_cannot_and_writes_nothing(tmp_path):
    bfl_path, _ = tiny_files(tmp_path)
    pipe = control_pipe()
    pipe.load_lora_weights(bfl_path, adapter_name="control")
    with pytest.raises(LoraError, match="'control' replaces norm weights"):
        pipe.save_lora_weights(tmp_path / "out.safetensors", "control")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_flux_lora_after_a_control_lora_is_zero_padded_as_diffusers_does(tmp_path):
    """A FLUX.1-dev LoRA (x_embedder 4 inputs wide) on a model a Control LoRA widened: its lora_A gets zero
    columns, as diffusers' _maybe_expand_lora_state_dict gives them; both together match diffusers+peft."""
    _, path = tiny_files(tmp_path)
    g = torch.Generator().manual_seed(5)
    regular = {
        "transformer.x_embedder.lora_A.weight": torch.randn(RANK, IN_CHANNELS, generator=g),
        "transformer.x_embedder.lora_B.weight": torch.randn(32, RANK, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(RANK, 32, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, RANK, generator=g),
    }
    reference = control_pipe(attach=False)
    reference.load_lora_weights(path, adapter_name="control")
    reference.load_lora_weights(dict(regular), adapter_name="regular")
    reference.set_adapters(["control", "regular"], [1.0, 0.5])
    pipe = control_pipe()
    before = snapshot(pipe)
    pipe.load_lora_weights(path, adapter_name="control")
    pipe.load_lora_weights(dict(regular), adapter_name="regular")
    pipe.set_adapters(["control", "regular"], [1.0, 0.5])
    torch.testing.assert_close(run(pipe), run(reference), rtol=1e-4, atol=1e-4)
    pipe.delete_adapters("control")  # the regular LoRA still sits on the wide x_embedder: it stays wide
    assert pipe.transformer.config.in_channels == 2 * IN_CHANNELS
    pipe.delete_adapters("regular")
    assert_as_before(pipe, before)


# -- what does not load changes nothing --------------------------------------------------------------------------


def test_a_control_lora_after_a_lora_on_the_narrow_x_embedder_is_refused_and_changes_nothing(tmp_path):
    """diffusers refuses this order too (a size mismatch inside peft); here a LoraError says what to do."""
    bfl_path, _ = tiny_files(tmp_path)
    pipe = control_pipe()
    pipe.load_lora_weights({"transformer.x_embedder.lora_A.weight": torch.ones(2, IN_CHANNELS),
                            "transformer.x_embedder.lora_B.weight": torch.ones(32, 2)}, adapter_name="regular")  # fmt: skip
    x_embedder, out = pipe.transformer.x_embedder, run(flux_pipe())
    with pytest.raises(LoraError, match=r"control_bfl\.safetensors.*'img_in\.lora_A\.weight'.*load the Control LoRA first"):
        pipe.load_lora_weights(bfl_path, adapter_name="control")
    assert pipe.transformer.x_embedder is x_embedder and pipe.transformer.config.in_channels == IN_CHANNELS
    assert pipe.get_list_adapters() == {"transformer": ["regular"]}
    pipe.unload_lora_weights()
    assert torch.equal(run(flux_from(pipe)), out)


BAD = {
    "norm scale of the wrong size": ("single_blocks.1.norm.key_norm.scale", lambda t: t[:-1], r"single_blocks\.1\.norm\.key_norm\.scale"),
    "lora_B.bias of the wrong size": ("double_blocks.1.txt_mlp.2.lora_B.bias", lambda t: t[:-1], r"double_blocks\.1\.txt_mlp\.2\.lora_B\.bias"),
    "img_in lora_B of the wrong size": ("img_in.lora_B.weight", lambda t: t[:-2], r"img_in\.lora_(A|B)\.weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_bfl_file_is_a_lora_error_naming_file_and_key_and_changes_nothing(case, tmp_path):
    key, edit, pattern = BAD[case]
    bfl = bfl_control_lora(components()["transformer"])
    bfl[key] = edit(bfl[key])
    path = str(tmp_path / "bad_control.safetensors")
    save_file(bfl, path)
    pipe = control_pipe()
    before = snapshot(pipe)
    with pytest.raises(LoraError, match=rf"bad_control\.safetensors(.|\n)*{pattern}(.|\n)*expected"):
        pipe.load_lora_weights(path, adapter_name="control")
    assert_as_before(pipe, before)
    assert pipe.get_list_adapters() == {}


def test_a_load_that_fails_after_widening_rolls_the_widening_back(tmp_path, monkeypatch):
    import lora_loader.inject as inject

    _, path = tiny_files(tmp_path)
    pipe = control_pipe()
    before = snapshot(pipe)

    def broken(module):
        assert pipe.transformer.config.in_channels == 2 * IN_CHANNELS  # the x_embedder is wide at this point
        raise RuntimeError("out of memory")

    monkeypatch.setattr(inject, "wrap_norm", broken)
    with pytest.raises(LoraError, match="rolled back"):
        pipe.load_lora_weights(path, adapter_name="control")
    assert_as_before(pipe, before)


def test_a_norm_only_file_loads_and_unload_restores_the_norms(tmp_path):
    """diffusers' test_with_norm_in_state_dict: a file of norm weights alone is a Control LoRA too."""
    pipe = control_pipe(attach=False)
    base = flux_from(pipe)
    out = run(base)
    weights = {"transformer.single_transformer_blocks.0.attn.norm_k.weight": torch.full((16,), 3.0)}
    reference = flux_pipe(attach=False)
    reference.load_lora_weights(dict(weights))
    own = base.transformer.single_transformer_blocks[0].attn.norm_k.weight.clone()
    base.load_lora_weights(dict(weights), adapter_name="norms")
    assert torch.equal(base.transformer.state_dict()["single_transformer_blocks.0.attn.norm_k.weight"], own)
    torch.testing.assert_close(run(base), run(reference), rtol=1e-4, atol=1e-4)
    assert (run(base) - out).abs().max() > 1e-3
    base.unload_lora_weights()
    assert torch.equal(run(base), out)
