"""Flux (and SDXL) LoRAs in the layouts other tools write: ComfyUI, XLabs, Kohya text encoders.

Each file is the same adapter as a PEFT LoRA on diffusers' modules, written in
the other tool's naming; lora_loader's output must match peft's (or diffusers'
own loading of the sd-scripts file, for SDXL) to 1e-4. ComfyUI keys are the
checkpoint's dotted names (Black Forest Labs' for Flux, Stability's for SDXL)
behind ``diffusion_model.`` / ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``;
XLabs keys are x-flux's attention-processor LoRAs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from producers import _sd_scripts_modules, _with_text_model, add_peft_adapter, diffusers_to_sgm, sd_scripts_sdxl_lora
from safetensors.torch import load_file, save_file
from test_flux import ALPHA, RANK, inputs, kohya_flux_file, peft_factors, peft_output, tiny_flux
from tiny import outputs, text_ids, tiny_sdxl_pipeline
from tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline

import lora_loader
from lora_loader import LoraError

peft = pytest.importorskip("peft")

# Black Forest Labs' dotted module names (flux/model.py), by the Kohya spelling of the same module.
BFL_DOTTED = {
    "img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2",
    "img_mod_lin": "img_mod.lin", "txt_attn_qkv": "txt_attn.qkv", "txt_attn_proj": "txt_attn.proj",
    "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2", "txt_mod_lin": "txt_mod.lin", "linear1": "linear1",
    "linear2": "linear2", "modulation_lin": "modulation.lin", "img_in": "img_in", "txt_in": "txt_in",
    "time_in_in_layer": "time_in.in_layer", "guidance_in_out_layer": "guidance_in.out_layer",
    "final_layer_linear": "final_layer.linear", "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}  # fmt: skip


def dotted(kohya_module: str) -> str:
    """``double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv``."""
    for group in ("double_blocks", "single_blocks"):
        if kohya_module.startswith(group + "_"):
            index, _, rest = kohya_module[len(group) + 1 :].partition("_")
            return f"{group}.{index}.{BFL_DOTTED[rest]}"
    return BFL_DOTTED[kohya_module]


def flux_output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).sample


def comfyui_from_kohya(sd: dict, suffixes: dict) -> dict:
    out = {}
    for key, tensor in sd.items():
        module, _, suffix = key[len("lora_unet_") :].partition(".")
        out[f"diffusion_model.{dotted(module)}.{suffixes.get(suffix, suffix)}"] = tensor
    return out


@pytest.mark.parametrize(
    "suffixes",
    [{}, {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}],
    ids=["lora_up-lora_down", "lora_A-lora_B"],
)
def test_a_comfyui_flux_file_gives_the_output_of_the_same_lora_in_peft(suffixes, tmp_path):
    factors = peft_factors(tiny_flux(), seed=1)
    expected = peft_output(factors)
    kohya = load_file(kohya_flux_file(factors, tmp_path / "k.safetensors"))
    model = lora_loader.attach(tiny_flux())
    base = flux_output(model)
    report = model.load_lora_weights(comfyui_from_kohya(kohya, suffixes), adapter_name="c")
    assert report.format == "comfyui"
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(flux_output(model), expected, rtol=1e-4, atol=1e-4)


def test_a_comfyui_key_that_names_no_module_is_refused_by_its_own_name(tmp_path):
    factors = peft_factors(tiny_flux(), seed=1)
    sd = comfyui_from_kohya(load_file(kohya_flux_file(factors, tmp_path / "k.safetensors")), {})
    sd["diffusion_model.double_blocks.0.img_attn.norm.lora_down.weight"] = torch.ones(2, 32)
    sd["diffusion_model.double_blocks.0.img_attn.norm.lora_up.weight"] = torch.ones(32, 2)
    model = lora_loader.attach(tiny_flux())
    with pytest.raises(LoraError, match=r"diffusion_model\.double_blocks\.0\.img_attn\.norm\.lora_down\.weight"):
        model.load_lora_weights(sd, adapter_name="c")
    assert not any(hasattr(m, "lora_adapters") for m in model.modules())


# x-flux's processors: LoRA name -> the diffusers modules its output rows cover.
XLABS_DOUBLE = {
    "qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "proj_lora1": ["attn.to_out.0"],
    "proj_lora2": ["attn.to_add_out"],
}
XLABS_SINGLE = {"qkv_lora": ["attn.to_q", "attn.to_k", "attn.to_v"], "proj_lora": ["proj_out"]}


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_an_xlabs_flux_file_gives_the_output_of_the_same_lora_in_peft(prefix, tmp_path):
    covered = []
    sd = {}
    factors = peft_factors(tiny_flux(), seed=2)
    for i in range(2):
        for group, table, block in (("double_blocks", XLABS_DOUBLE, "transformer_blocks"), ("single_blocks", XLABS_SINGLE, "single_transformer_blocks")):
            for name, parts in table.items():
                paths = [f"{block}.{i}.{p}" for p in parts]
                covered += paths
                # x-flux has no alpha (scale 1): the file's up carries peft's alpha / r.
                sd[f"{prefix}{group}.{i}.processor.{name}.down.weight"] = torch.cat([factors[p][0] for p in paths])
                sd[f"{prefix}{group}.{i}.processor.{name}.up.weight"] = torch.block_diag(*[factors[p][1] for p in paths]) * (ALPHA / RANK)
    expected = peft_output({p: factors[p] for p in covered})
    model = lora_loader.attach(tiny_flux())
    base = flux_output(model)
    report = model.load_lora_weights(sd, adapter_name="x")
    assert report.format == "xlabs" and report.modules == {"model": len(covered)}
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(flux_output(model), expected, rtol=1e-4, atol=1e-4)


def test_an_xlabs_file_with_a_missing_half_is_refused_by_key():
    sd = {"double_blocks.0.processor.proj_lora1.down.weight": torch.ones(2, 32)}
    model = lora_loader.attach(tiny_flux())
    with pytest.raises(LoraError, match=r"double_blocks\.0\.processor\.proj_lora1\.down\.weight"):
        model.load_lora_weights(sd, adapter_name="x")
    assert not any(hasattr(m, "lora_adapters") for m in model.modules())


# -- text encoders: Kohya's lora_te1_ / lora_te3_ and ComfyUI's text_encoders.* ------------------

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def peft_encoder(encoder, targets, seed):
    """Add a PEFT LoRA (alpha = r: files without alpha keys mean scale 1) and return its factors per module."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    sd = add_peft_adapter(encoder, LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {m: (sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]) for m in modules}


def encoder_output(encoder):
    with torch.no_grad():
        return encoder(text_ids()).last_hidden_state


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_text_encoder_loras_reach_clip_and_t5_in_both_pipelines(kind, layout):
    """Kohya: lora_te1_ is CLIP-L, lora_te3_ is T5 (text_encoder_2 in Flux, text_encoder_3 in SD3); ComfyUI: clip_l, t5xxl."""
    factory = tiny_flux_pipeline if kind == "flux" else tiny_sd3_pipeline
    t5 = "text_encoder_2" if kind == "flux" else "text_encoder_3"
    ref = factory()
    base = {c: encoder_output(getattr(ref, c)) for c in ("text_encoder", t5)}
    sd = {}
    for component, targets, kohya_prefix, comfy_name in (("text_encoder", CLIP_TARGETS, "lora_te1_", "clip_l"), (t5, T5_TARGETS, "lora_te3_", "t5xxl")):
        for module, (a, b) in peft_encoder(getattr(ref, component), targets, seed=len(sd)).items():
            if layout == "kohya":
                sd[f"{kohya_prefix}{module.replace('.', '_')}.lora_down.weight"] = a
                sd[f"{kohya_prefix}{module.replace('.', '_')}.lora_up.weight"] = b
            else:
                sd[f"text_encoders.{comfy_name}.transformer.{module}.lora_A.weight"] = a
                sd[f"text_encoders.{comfy_name}.transformer.{module}.lora_B.weight"] = b
    mine = lora_loader.attach(factory())
    report = mine.load_lora_weights(sd, adapter_name="te")
    assert report.modules == {"text_encoder": 8, t5: 12}
    for component in ("text_encoder", t5):
        want = encoder_output(getattr(ref, component))
        assert (want - base[component]).abs().max() > 1e-3
        torch.testing.assert_close(encoder_output(getattr(mine, component)), want, rtol=1e-4, atol=1e-4)


def test_a_t5_lora_on_a_pipeline_without_t5_is_refused_and_changes_nothing():
    pipe = lora_loader.attach(tiny_sd3_pipeline(with_t5=False))
    sd = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(2, 32),
          "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(32, 2)}  # fmt: skip
    with pytest.raises(LoraError, match="lora_te3_encoder_block_0_layer_0_SelfAttention_q"):
        pipe.load_lora_weights(sd, adapter_name="t5")
    assert pipe.get_list_adapters() == {}


def test_a_comfyui_sdxl_file_gives_what_diffusers_gives_for_the_sd_scripts_file():
    """ComfyUI's SDXL keys are Stability's dotted names; the sd-scripts file has the same names underscored."""
    ref = tiny_sdxl_pipeline()
    sd_scripts = sd_scripts_sdxl_lora(ref, seed=3)
    comfy = {}
    renames = {"lora_unet_" + diffusers_to_sgm(n).replace(".", "_"): "diffusion_model." + diffusers_to_sgm(n) for n, _ in _sd_scripts_modules(ref.unet)}
    for component, kohya, comfy_name in (("text_encoder", "lora_te1_", "clip_l"), ("text_encoder_2", "lora_te2_", "clip_g")):
        for name, _ in _sd_scripts_modules(getattr(ref, component)):
            renames[kohya + _with_text_model(name).replace(".", "_")] = f"text_encoders.{comfy_name}.transformer.{_with_text_model(name)}"
    for key, tensor in sd_scripts.items():
        module, _, suffix = key.partition(".")
        comfy[f"{renames[module]}.{suffix}"] = tensor
    base = outputs(ref)
    ref.load_lora_weights(dict(sd_scripts), adapter_name="k")
    want = outputs(ref)
    mine = lora_loader.attach(tiny_sdxl_pipeline())
    assert mine.load_lora_weights(comfy, adapter_name="c").format == "comfyui"
    got = outputs(mine)
    for name in want:
        assert (want[name] - base[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)


# -- SD3 in Stability's original (MMDiT) names: sd-scripts (underscored) and ComfyUI (dotted) -------

def sd3_table(layers: int = 2) -> dict[str, tuple[list[str], bool]]:
    """Stability's dotted name -> (the diffusers modules it fuses, whether its (shift, scale) halves swap)."""
    table = {
        "x_embedder.proj": (["pos_embed.proj"], False),
        "context_embedder": (["context_embedder"], False),
        "t_embedder.mlp.0": (["time_text_embed.timestep_embedder.linear_1"], False),
        "y_embedder.mlp.2": (["time_text_embed.text_embedder.linear_2"], False),
        "final_layer.linear": (["proj_out"], False),
        "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
    }
    for i in range(layers):
        last = i == layers - 1  # the last block's context stream is "pre-only": no out proj, no MLP, 2 halves
        b = f"transformer_blocks.{i}."
        table |= {
            f"joint_blocks.{i}.x_block.attn.qkv": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], False),
            f"joint_blocks.{i}.x_block.attn.proj": ([b + "attn.to_out.0"], False),
            f"joint_blocks.{i}.x_block.mlp.fc1": ([b + "ff.net.0.proj"], False),
            f"joint_blocks.{i}.x_block.adaLN_modulation.1": ([b + "norm1.linear"], False),
            f"joint_blocks.{i}.context_block.attn.qkv": ([b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"], False),
            f"joint_blocks.{i}.context_block.adaLN_modulation.1": ([b + "norm1_context.linear"], last),
        }
        if not last:
            table[f"joint_blocks.{i}.context_block.attn.proj"] = ([b + "attn.to_add_out"], False)
            table[f"joint_blocks.{i}.context_block.mlp.fc2"] = ([b + "ff_context.net.2"], False)
    return table


def sd3_peft_output(factors: dict, model) -> torch.Tensor:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(factors)), model)
    sd = {f"{p}.lora_A.weight": a for p, (a, _) in factors.items()} | {f"{p}.lora_B.weight": b for p, (_, b) in factors.items()}
    assert not set_peft_model_state_dict(model, sd).unexpected_keys
    return sd3_output(model)


def sd3_output(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
            pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500]),
        ).sample  # fmt: skip


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_an_sd3_file_in_stabilitys_names_gives_the_output_of_the_same_lora_in_peft(layout):
    table = sd3_table()
    modules = dict(tiny_sd3_pipeline().transformer.named_modules())
    g = torch.Generator().manual_seed(9)
    factors, sd = {}, {}
    for name, (parts, swap) in table.items():
        for p in parts:
            w = modules[p].weight  # Linear [out, in], or the patch embedding's Conv2d [out, in, k, k]
            factors[p] = (torch.randn(RANK, *w.shape[1:], generator=g) * 0.3, torch.randn(w.shape[0], RANK, *[1] * (w.dim() - 2), generator=g) * 0.3)
        down = torch.cat([factors[p][0] for p in parts])
        up = torch.block_diag(*[factors[p][1] for p in parts]) if len(parts) > 1 else factors[parts[0]][1]
        if swap:  # diffusers (scale, shift) -> Stability (shift, scale)
            scale, shift = up.chunk(2)
            up = torch.cat([shift, scale])
        key = "lora_unet_" + name.replace(".", "_") if layout == "kohya" else "diffusion_model." + name
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(ALPHA * len(parts))  # the same alpha / rank as peft's
    expected = sd3_peft_output(factors, tiny_sd3_pipeline().transformer)
    pipe = lora_loader.attach(tiny_sd3_pipeline())
    base = sd3_output(pipe.transformer)
    report = pipe.load_lora_weights(sd, adapter_name="s")
    assert report.format == layout and report.modules == {"transformer": len(factors)}
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(sd3_output(pipe.transformer), expected, rtol=1e-4, atol=1e-4)


def test_a_kohya_file_with_diffusers_dit_names_under_lora_transformer_loads_like_peft():
    """OneTrainer writes Flux LoRAs as ``lora_transformer_<diffusers path underscored>``."""
    factors = peft_factors(tiny_flux(), seed=4)
    expected = peft_output(factors)
    sd = {}
    for path, (a, b) in factors.items():
        name = "lora_transformer_" + path.replace(".", "_")
        sd |= {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": torch.tensor(ALPHA)}
    model = lora_loader.attach(tiny_flux())
    assert model.load_lora_weights(sd, adapter_name="o").modules == {"model": len(factors)}
    torch.testing.assert_close(flux_output(model), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", ["base_model.model.", "transformer.", ""])
def test_peft_keys_on_bfl_module_names_give_the_output_of_the_same_lora_in_peft(prefix, tmp_path):
    """fal's Kontext LoRAs: PEFT keys (``lora_A``/``lora_B``, no alpha: scale 1) on BFL's dotted module names,
    behind ``base_model.model.`` (as diffusers' ``_convert_fal_kontext_lora_to_diffusers`` reads them) or
    another prefix; fused projections are one LoRA over the fused rows."""
    factors = peft_factors(tiny_flux(), seed=4)
    expected = peft_output(factors)
    sd = load_file(kohya_flux_file(factors, tmp_path / "k.safetensors"))
    fal = {}
    for key, tensor in sd.items():
        module, _, suffix = key[len("lora_unet_") :].partition(".")
        if suffix == "alpha":
            continue
        if suffix == "lora_up.weight":  # no alpha key: fold alpha / rank into lora_B
            tensor = tensor * (float(sd[f"lora_unet_{module}.alpha"]) / sd[f"lora_unet_{module}.lora_down.weight"].shape[0])
        fal[f"{prefix}{dotted(module)}.{'lora_A' if suffix == 'lora_down.weight' else 'lora_B'}.weight"] = tensor
    model = lora_loader.attach(tiny_flux())
    base = flux_output(model)
    model.load_lora_weights(fal, adapter_name="fal")
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(flux_output(model), expected, rtol=1e-4, atol=1e-4)
