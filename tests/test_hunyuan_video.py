"""HunyuanVideo (1.0, I2V, FramePack) and HunyuanVideo 1.5 LoRAs in the layouts their producers write.

- diffusers / PEFT: peft's own adapters, saved by ``HunyuanVideoPipeline.save_lora_weights``;
  oracle: diffusers+peft loading the same file.
- Tencent's original names behind ``diffusion_model.`` (ComfyUI, musubi-tuner's ``convert_lora``
  "other" format) or ``transformer.`` (diffusion-pipe): oracle: diffusers' own
  ``_convert_hunyuan_video_lora_to_diffusers`` + peft, for every module it converts right; for
  the ones it does not (``single_blocks.N.linear1`` is split at a hard-coded 3072 rows, the final
  layer's ``lora_A`` is (shift, scale)-swapped with its ``lora_B``, the token refiner's
  ``self_attn_qkv`` cuts ``lora_A`` in three) and for musubi-tuner's ``lora_unet_*`` files, which
  diffusers does not convert at all: an independent merge of the file's tensors into a copy of the
  weights, computed here (``W + alpha / r * up @ down``, fused rows cut by hand, (shift, scale)
  swapped by hand).
- musubi-tuner's LoKr / LoHa (networks/lokr.py, loha.py) on the fused projections: each diffusers
  module takes its rows of the dense Kronecker / Hadamard product, computed here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import HunyuanVideoPipeline
from peft import LoraConfig
from producers import add_peft_adapter, save_diffusers_lora, save_state_dict
from safetensors.torch import save_file
from tiny_hunyuan import forward, tiny_framepack, tiny_hunyuan, tiny_hunyuan_15, tiny_hunyuan_pipeline

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family, family_from_metadata
from lora_loader.formats import convert
from lora_loader.formats.original_names import FLUX, HUNYUAN_VIDEO, HUNYUAN_VIDEO_15, family_of

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TOLERANCE = 1e-4
MOVED = 1e-3
RANK = 4


def assert_close(got, want, base):
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE, float((got - want).abs().max())


# -- Tencent's module names, written out from diffusers' converter and checkpoint scripts --------------


def tencent_modules(model) -> dict[str, tuple[list[str], bool]]:
    """Tencent's dotted module name -> (the diffusers modules its output rows cover, in row order; whether
    its (shift, scale) halves are (scale, shift) in diffusers), for every Linear of a 1.0 or 1.5 model."""
    cfg = model.config
    v15 = "text_embed_2_dim" in cfg
    refiner = "context_embedder.token_refiner.refiner_blocks"
    table = {
        "txt_in.input_embedder": (["context_embedder.proj_in"], False),
        "txt_in.t_embedder.mlp.0": (["context_embedder.time_text_embed.timestep_embedder.linear_1"], False),
        "txt_in.t_embedder.mlp.2": (["context_embedder.time_text_embed.timestep_embedder.linear_2"], False),
        "txt_in.c_embedder.linear_1": (["context_embedder.time_text_embed.text_embedder.linear_1"], False),
        "txt_in.c_embedder.linear_2": (["context_embedder.time_text_embed.text_embedder.linear_2"], False),
        "final_layer.linear": (["proj_out"], False),
        "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
    }
    for i in range(cfg.num_refiner_layers):
        b = f"{refiner}.{i}."
        table |= {
            f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], False),
            f"txt_in.individual_token_refiner.blocks.{i}.self_attn_proj": ([b + "attn.to_out.0"], False),
            f"txt_in.individual_token_refiner.blocks.{i}.mlp.fc1": ([b + "ff.net.0.proj"], False),
            f"txt_in.individual_token_refiner.blocks.{i}.mlp.fc2": ([b + "ff.net.2"], False),
            f"txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1": ([b + "norm_out.linear"], False),
        }
    for i in range(cfg.num_layers):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table |= {
            d + "img_mod.linear": ([b + "norm1.linear"], False),
            d + "img_attn_proj": ([b + "attn.to_out.0"], False),
            d + "img_mlp.fc1": ([b + "ff.net.0.proj"], False),
            d + "img_mlp.fc2": ([b + "ff.net.2"], False),
            d + "txt_mod.linear": ([b + "norm1_context.linear"], False),
            d + "txt_attn_proj": ([b + "attn.to_add_out"], False),
            d + "txt_mlp.fc1": ([b + "ff_context.net.0.proj"], False),
            d + "txt_mlp.fc2": ([b + "ff_context.net.2"], False),
        }
        if v15:  # separate projections
            for x, (q, k, v) in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                table |= {d + f"{x}_attn_q": ([b + "attn." + q], False), d + f"{x}_attn_k": ([b + "attn." + k], False),
                          d + f"{x}_attn_v": ([b + "attn." + v], False)}  # fmt: skip
        else:
            table[d + "img_attn_qkv"] = ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], False)
            table[d + "txt_attn_qkv"] = ([b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"], False)
    if v15:
        table |= {
            "time_in.mlp.0": (["time_embed.timestep_embedder.linear_1"], False),
            "time_in.mlp.2": (["time_embed.timestep_embedder.linear_2"], False),
            "time_r_in.mlp.0": (["time_embed.timestep_embedder_r.linear_1"], False),
            "time_r_in.mlp.2": (["time_embed.timestep_embedder_r.linear_2"], False),
            "byt5_in.fc1": (["context_embedder_2.linear_1"], False),
            "byt5_in.fc2": (["context_embedder_2.linear_2"], False),
            "byt5_in.fc3": (["context_embedder_2.linear_3"], False),
            "vision_in.proj.1": (["image_embedder.linear_1"], False),
            "vision_in.proj.3": (["image_embedder.linear_2"], False),
        }
        return table
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}."
        table |= {
            f"single_blocks.{i}.linear1": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"], False),
            f"single_blocks.{i}.linear2": ([b + "proj_out"], False),
            f"single_blocks.{i}.modulation.linear": ([b + "norm.linear"], False),
        }
    table |= {
        "time_in.mlp.0": (["time_text_embed.timestep_embedder.linear_1"], False),
        "time_in.mlp.2": (["time_text_embed.timestep_embedder.linear_2"], False),
        "vector_in.in_layer": (["time_text_embed.text_embedder.linear_1"], False),
        "vector_in.out_layer": (["time_text_embed.text_embedder.linear_2"], False),
        "guidance_in.mlp.0": (["time_text_embed.guidance_embedder.linear_1"], False),
        "guidance_in.mlp.2": (["time_text_embed.guidance_embedder.linear_2"], False),
    }
    return table


# musubi-tuner's LoRA targets: every Linear in MMDoubleStreamBlock / MMSingleStreamBlock (networks/lora.py).
def musubi_names(table: dict) -> list[str]:
    return [n for n in table if n.startswith(("double_blocks.", "single_blocks."))]


def lora_factors(model, table: dict, names, seed: int, rank: int = RANK) -> dict[str, tuple]:
    """Per original module: (down [r, in], up [rows, r], alpha), rows the sum of its diffusers parts' rows."""
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, name in enumerate(names):
        parts, _ = table[name]
        rows = sum(modules[p].weight.shape[0] for p in parts)
        features = modules[parts[0]].weight.shape[1]
        out[name] = (torch.randn(rank, features, generator=g) * 0.3, torch.randn(rows, rank, generator=g) * 0.3, float(1 + n % 5))
    return out


def musubi_file(factors: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """musubi-tuner's LoRANetwork state dict: lora_unet_<name, dots as underscores>.lora_down/lora_up/alpha."""
    sd = {}
    for name, (down, up, alpha) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down.to(dtype)
        sd[f"{key}.lora_up.weight"] = up.to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(alpha).to(dtype)  # register_buffer("alpha", torch.tensor(alpha)), cast on save
    return sd


MUSUBI_HEADER = {
    "ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_base_model_version": "hunyuan_video",
    "modelspec.architecture": "hunyuan-video/lora", "modelspec.implementation": "https://github.com/Tencent/HunyuanVideo",
}  # fmt: skip


def dotted_file(factors: dict, prefix: str) -> dict[str, torch.Tensor]:
    """musubi's convert_lora "other" format (diffusion_model. or transformer.): alpha / r folded into both factors
    as its square root, no alpha keys; diffusion-pipe's (transformer.) is the same with alpha = r."""
    sd = {}
    for name, (down, up, alpha) in factors.items():
        root = math.sqrt(alpha / down.shape[0])
        sd[f"{prefix}{name}.lora_A.weight"] = down * root
        sd[f"{prefix}{name}.lora_B.weight"] = up * root
    return sd


def merged(model, table: dict, deltas: dict[str, torch.Tensor], weight: float = 1.0):
    """``model`` with each original module's dense delta ([rows, in]) added to its diffusers parts' weights."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, dense in deltas.items():
            parts, swap = table[name]
            if swap:
                shift, scale = dense.chunk(2)
                dense = torch.cat([scale, shift])
            start = 0
            for p in parts:
                w = modules[p].weight
                w += weight * dense[start : start + w.shape[0]].reshape(w.shape)
                start += w.shape[0]
            assert start == dense.shape[0], name
    return model


def lora_dense(factors: dict) -> dict[str, torch.Tensor]:
    return {name: alpha / down.shape[0] * up.float() @ down.float() for name, (down, up, alpha) in factors.items()}


# -- diffusers / PEFT layout ----------------------------------------------------------------------

LINEARS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp",
    "proj_out", "norm.linear", "norm_out.linear", "proj_in", "linear_1", "linear_2",
]  # fmt: skip


def peft_config(seed: int) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=6 + seed, target_modules=LINEARS, rank_pattern={"to_k": 2},
                      alpha_pattern={"proj_out": 3}, init_lora_weights=False)  # fmt: skip


@pytest.mark.parametrize("condition", [None, "token_replace"], ids=["t2v", "i2v"])
def test_a_peft_file_in_diffusers_layout_gives_what_diffusers_gives(condition, tmp_path):
    config = peft_config(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        sd = add_peft_adapter(tiny_hunyuan(image_condition_type=condition), config)
    path = save_diffusers_lora(tmp_path, HunyuanVideoPipeline, {"transformer": sd}, {"transformer": config}, "peft.safetensors")
    ref = tiny_hunyuan_pipeline(image_condition_type=condition)
    mine = lora_loader.attach(tiny_hunyuan_pipeline(image_condition_type=condition))
    base = forward(ref)
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert report.modules == {"transformer": len(sd) // 2}
    assert_close(forward(mine), forward(ref), base)


def test_two_peft_files_blend_as_diffusers_blends_them(tmp_path):
    paths = []
    for seed in (1, 2):
        config = peft_config(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            sd = add_peft_adapter(tiny_hunyuan(), config)
        paths.append(save_diffusers_lora(tmp_path, HunyuanVideoPipeline, {"transformer": sd}, {"transformer": config}, f"{seed}.safetensors"))
    ref, mine = tiny_hunyuan_pipeline(), lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(ref)
    for pipe in (ref, mine):
        pipe.load_lora_weights(paths[0], adapter_name="a")
        pipe.load_lora_weights(paths[1], adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(forward(mine), forward(ref), base)


@pytest.mark.parametrize("factory", [tiny_framepack, tiny_hunyuan_15], ids=["framepack", "1.5"])
def test_a_peft_file_on_framepack_and_hunyuanvideo_15_gives_what_peft_gives(factory, tmp_path):
    """FramePack's extra modules (image_projection; clean_x_embedder is Conv3d) and 1.5's (context_embedder_2,
    image_embedder, time_embed); diffusers has no LoRA loader for 1.5: peft on the model is the oracle. Written as
    diffusion-pipe writes an adapter: transformer.<path> in adapter_model.safetensors beside adapter_config.json."""
    targets = LINEARS + (["up", "down"] if factory is tiny_framepack else ["linear_3"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ref = factory()
    base = forward(ref)
    torch.manual_seed(3)
    sd = add_peft_adapter(ref, config)
    save_state_dict({f"transformer.{k}": v for k, v in sd.items()}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    mine = lora_loader.attach(factory())
    assert mine.load_lora_weights(str(tmp_path), adapter_name="a").modules == {"model": len(sd) // 2}
    assert_close(forward(mine), forward(ref), base)


# -- Tencent's names: diffusers' converter where it is right, an independent merge everywhere -------------

# What diffusers' converter gets wrong on a tiny model (see the module docstring).
NOT_DIFFUSERS = ("single_blocks.0.linear1", "final_layer.adaLN_modulation.1", "txt_in.individual_token_refiner.blocks.0.self_attn_qkv")


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer."])
def test_tencent_names_load_as_diffusers_own_converter_loads_them(prefix):
    model = tiny_hunyuan()
    table = tencent_modules(model)
    factors = lora_factors(model, table, [n for n in table if n not in NOT_DIFFUSERS], seed=2)
    sd = dotted_file(factors, prefix)
    ref = tiny_hunyuan_pipeline()
    base = forward(ref)
    ref.load_lora_weights(dict(sd), adapter_name="a")  # diffusers converts (img_attn_qkv is there) and peft loads
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    report = mine.load_lora_weights(sd, adapter_name="a")
    assert report.format == ("comfyui" if prefix == "diffusion_model." else "diffusers")
    assert_close(forward(mine), forward(ref), base)


@pytest.mark.parametrize("layout", ["musubi", "diffusion_model.", "transformer."])
def test_every_tencent_module_gives_the_independent_merge(layout):
    """All of them, those diffusers mis-converts included: fused rows, (shift, scale) swap, token refiner."""
    model = tiny_hunyuan()
    table = tencent_modules(model)
    factors = lora_factors(model, table, list(table), seed=3)
    sd = musubi_file(factors) if layout == "musubi" else dotted_file(factors, layout)
    want = forward(merged(tiny_hunyuan(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    report = mine.load_lora_weights(sd, adapter_name="a")
    assert report.modules == {"transformer": sum(len(table[n][0]) for n in factors)}
    assert_close(forward(mine), want, base)


def test_a_diffusion_pipe_adapter_folder_gives_the_independent_merge(tmp_path):
    """diffusion-pipe: peft on Tencent's model, saved as transformer.<name>.lora_A/B in adapter_model.safetensors
    beside PEFT's adapter_config.json (the alpha there), with only_double_blocks as its configs often set it."""
    model = tiny_hunyuan()
    table = tencent_modules(model)
    names = [n for n in musubi_names(table) if n.startswith("double_blocks.")]
    factors = {n: (d, u, 8.0) for n, (d, u, _) in lora_factors(model, table, names, seed=21).items()}
    save_state_dict({f"transformer.{n}.lora_{ab}.weight": t for n, (d, u, _) in factors.items() for ab, t in (("A", d), ("B", u))},
                    tmp_path / "adapter_model.safetensors")  # fmt: skip
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": names, "lora_dropout": 0.0, "bias": "none"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    want = forward(merged(tiny_hunyuan(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    mine.load_lora_weights(str(tmp_path), adapter_name="d")
    assert_close(forward(mine), want, base)


@pytest.mark.parametrize("part", ["attention", "single"])
def test_a_file_in_names_flux_and_hunyuanvideo_share_loads_right_into_hunyuanvideo(part):
    """img_attn_qkv, img_attn_proj, linear1, linear2 are Flux's names too: whichever table reads them, the same modules."""
    model = tiny_hunyuan()
    table = tencent_modules(model)
    shared = ("_attn_qkv", "_attn_proj") if part == "attention" else ("linear1", "linear2")
    factors = lora_factors(model, table, [n for n in musubi_names(table) if n.endswith(shared)], seed=22)
    want = forward(merged(tiny_hunyuan(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    mine.load_lora_weights(musubi_file(factors), adapter_name="s")
    assert_close(forward(mine), want, base)


@pytest.mark.parametrize("condition", [None, "token_replace"], ids=["t2v", "i2v"])
def test_a_musubi_file_gives_the_independent_merge(condition, tmp_path):
    """bf16 tensors and alphas, musubi's header; the same file on HunyuanVideo-I2V's token-replace blocks."""
    model = tiny_hunyuan(image_condition_type=condition)
    table = tencent_modules(model)
    factors = lora_factors(model, table, musubi_names(table), seed=4)
    path = tmp_path / "musubi.safetensors"
    save_file(musubi_file(factors, torch.bfloat16), str(path), metadata=MUSUBI_HEADER)
    bf16 = {n: (d.bfloat16(), u.bfloat16(), float(torch.tensor(a).bfloat16())) for n, (d, u, a) in factors.items()}
    want = forward(merged(tiny_hunyuan(image_condition_type=condition), table, lora_dense(bf16)))
    mine = lora_loader.attach(tiny_hunyuan_pipeline(image_condition_type=condition))
    base = forward(mine)
    assert mine.load_lora_weights(str(path), adapter_name="m").format == "kohya"
    assert_close(forward(mine), want, base)


def test_a_hunyuanvideo_lora_on_framepack_gives_the_independent_merge():
    """FramePack is HunyuanVideo fine-tuned: diffusers loads HunyuanVideo LoRAs into it (diffusers#11546)."""
    table = tencent_modules(tiny_hunyuan())
    factors = lora_factors(tiny_framepack(), table, list(table), seed=5)
    want = forward(merged(tiny_framepack(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_framepack())
    base = forward(mine)
    mine.load_lora_weights(musubi_file(factors), adapter_name="m")
    assert_close(forward(mine), want, base)


def test_a_musubi_framepack_file_in_diffusers_names_gives_the_independent_merge():
    """musubi's FramePack network: diffusers' module names (its model is diffusers'), norms excluded."""
    model = tiny_framepack()
    g = torch.Generator().manual_seed(6)
    table, deltas, sd = {}, {}, {}
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        for name, module in model.get_submodule(block).named_modules():
            if isinstance(module, torch.nn.Linear) and "norm" not in name:
                path = f"{block}.{name}"
                down, up = torch.randn(RANK, module.in_features, generator=g), torch.randn(module.out_features, RANK, generator=g)
                key = "lora_unet_" + path.replace(".", "_")
                sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
                table[path], deltas[path] = ([path], False), 2.0 / RANK * up @ down
    want = forward(merged(tiny_framepack(), table, deltas))
    mine = lora_loader.attach(tiny_framepack())
    base = forward(mine)
    assert mine.load_lora_weights(sd, adapter_name="f").modules == {"model": len(table)}
    assert_close(forward(mine), want, base)


def test_a_hunyuanvideo_15_file_in_tencents_names_gives_the_independent_merge():
    """musubi's HunyuanVideo 1.5 network (MMDoubleStreamBlock's Linears: separate img_attn_q/k/v), and the
    modules it excludes (txt_in, byt5_in, vision_in, time_in and MeanFlow's time_r_in: on diffusers' time_embed,
    not time_text_embed)."""
    model = tiny_hunyuan_15()
    table = tencent_modules(model)
    factors = lora_factors(model, table, list(table), seed=7)
    want = forward(merged(tiny_hunyuan_15(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_hunyuan_15())
    base = forward(mine)
    report = mine.load_lora_weights(musubi_file(factors), adapter_name="m")
    assert report.modules == {"model": sum(len(table[n][0]) for n in factors)}
    assert_close(forward(mine), want, base)


def test_a_comfyui_hunyuanvideo_15_file_with_fused_qkv_gives_the_independent_merge():
    """musubi's convert_hunyuan_video_1_5_lora_to_comfy: q/k/v concatenated into img_attn_qkv (down stacked, up
    block-diagonal, alpha x 3), img_mlp_fc1 -> img_mlp_0, img_mod_linear -> img_mod_lin (ComfyUI's names)."""
    model = tiny_hunyuan_15()
    table = tencent_modules(model)
    factors = lora_factors(model, table, musubi_names(table), seed=8)
    for name in [n for n in factors if "_attn_" in n and n[-1] in "kv"]:  # musubi's converter keeps one alpha for q, k, v
        down, up, _ = factors[name]
        factors[name] = (down, up, factors[name[:-1] + "q"][2])
    comfy = {"img_mlp.fc1": "img_mlp.0", "img_mlp.fc2": "img_mlp.2", "img_mod.linear": "img_mod.lin", "img_attn_proj": "img_attn.proj",
             "txt_mlp.fc1": "txt_mlp.0", "txt_mlp.fc2": "txt_mlp.2", "txt_mod.linear": "txt_mod.lin", "txt_attn_proj": "txt_attn.proj"}  # fmt: skip
    sd = {}
    for i in range(model.config.num_layers):
        for x in ("img", "txt"):
            qkv = [factors[f"double_blocks.{i}.{x}_attn_{p}"] for p in "qkv"]
            key = f"lora_unet_double_blocks_{i}_{x}_attn_qkv"
            sd[f"{key}.lora_down.weight"] = torch.cat([d for d, _, _ in qkv])  # [3r, in]
            sd[f"{key}.lora_up.weight"] = torch.block_diag(*[u for _, u, _ in qkv])  # [3d, 3r]
            sd[f"{key}.alpha"] = torch.tensor(qkv[0][2] * 3)  # "rank is 3x larger"
        for name in comfy:
            down, up, alpha = factors[f"double_blocks.{i}.{name}"]
            key = f"lora_unet_double_blocks_{i}_{comfy[name].replace('.', '_')}"
            sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    want = forward(merged(tiny_hunyuan_15(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_hunyuan_15())
    base = forward(mine)
    mine.load_lora_weights(sd, adapter_name="c")
    assert_close(forward(mine), want, base)


def test_comfyuis_own_hunyuanvideo_names_give_the_independent_merge():
    """ComfyUI runs HunyuanVideo on Flux's block code: img_mod.lin, img_mlp.0, modulation.lin, MLPEmbedder's
    in_layer / out_layer in the text refiner and time_in, dotted behind diffusion_model."""
    model = tiny_hunyuan()
    table = tencent_modules(model)
    factors = lora_factors(model, table, list(table), seed=9)
    spelled = {"img_mod.linear": "img_mod.lin", "txt_mod.linear": "txt_mod.lin", "img_mlp.fc1": "img_mlp.0",
               "img_mlp.fc2": "img_mlp.2", "txt_mlp.fc1": "txt_mlp.0", "txt_mlp.fc2": "txt_mlp.2",
               "modulation.linear": "modulation.lin", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
               "img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
               "txt_attn_proj": "txt_attn.proj", "self_attn_qkv": "self_attn.qkv", "self_attn_proj": "self_attn.proj",
               "t_embedder.mlp.0": "t_embedder.in_layer", "t_embedder.mlp.2": "t_embedder.out_layer",
               "c_embedder.linear_1": "c_embedder.in_layer", "c_embedder.linear_2": "c_embedder.out_layer",
               "time_in.mlp.0": "time_in.in_layer", "time_in.mlp.2": "time_in.out_layer",
               "guidance_in.mlp.0": "guidance_in.in_layer", "guidance_in.mlp.2": "guidance_in.out_layer"}  # fmt: skip
    sd = {}
    for name, (down, up, alpha) in factors.items():
        comfy = name
        for tencent, theirs in spelled.items():
            if name.endswith(tencent):
                comfy = name[: -len(tencent)] + theirs
        sd |= {f"diffusion_model.{comfy}.lora_down.weight": down, f"diffusion_model.{comfy}.lora_up.weight": up,
               f"diffusion_model.{comfy}.alpha": torch.tensor(alpha)}  # fmt: skip
    want = forward(merged(tiny_hunyuan(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    mine.load_lora_weights(sd, adapter_name="c")
    assert_close(forward(mine), want, base)


# -- one adapter among several: blend, disable, fuse, block weights ---------------------------------


def musubi_adapter(seed: int, model=None):
    model = model or tiny_hunyuan()
    table = tencent_modules(model)
    factors = lora_factors(model, table, musubi_names(table), seed=seed)
    return table, factors, musubi_file(factors)


def test_two_musubi_adapters_blend_as_the_weighted_merge():
    table, fa, a = musubi_adapter(11)
    _, fb, b = musubi_adapter(12)
    want = forward(merged(merged(tiny_hunyuan(), table, lora_dense(fa), 0.7), table, lora_dense(fb), 0.3))
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    mine.load_lora_weights(a, adapter_name="a")
    mine.load_lora_weights(b, adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(forward(mine), want, base)


def test_disable_is_exact_and_fuse_unfuse_give_the_base_weights_back_bit_for_bit():
    _, _, sd = musubi_adapter(13)
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    weights = {k: v.clone() for k, v in mine.transformer.state_dict().items()}
    mine.load_lora_weights(sd, adapter_name="a")
    with_lora = forward(mine)
    mine.disable_lora()
    assert torch.equal(forward(mine), base)
    mine.enable_lora()
    mine.fuse_lora()
    assert (forward(mine) - with_lora).abs().max() <= TOLERANCE
    mine.unfuse_lora()
    assert torch.equal(forward(mine), with_lora)
    mine.unload_lora_weights()
    assert all(torch.equal(v, weights[k]) for k, v in mine.transformer.state_dict().items())
    assert torch.equal(forward(mine), base)


def test_dit_block_weights_match_module_paths_exactly():
    """``transformer_blocks.1`` is that dual-stream block only, not ``single_transformer_blocks.1``."""
    model = tiny_hunyuan(num_layers=2, num_single_layers=2)
    table, factors, sd = musubi_adapter(14, model)
    dense = lora_dense(factors)
    scale = {"double_blocks.1.": 0.25, "single_blocks.": 0.5, "double_blocks.0.": 1.0}
    want_model = tiny_hunyuan(num_layers=2, num_single_layers=2)
    for prefix, w in scale.items():
        merged(want_model, table, {n: d for n, d in dense.items() if n.startswith(prefix)}, w)
    mine = lora_loader.attach(tiny_hunyuan_pipeline(num_layers=2, num_single_layers=2))
    base = forward(mine)
    mine.load_lora_weights(sd, adapter_name="a")
    mine.set_adapters("a", {"transformer": {"transformer_blocks.1": 0.25, "single_transformer_blocks": 0.5}})
    assert_close(forward(mine), forward(want_model), base)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_saved_adapter_loads_back_the_same_and_its_header_names_the_family(fmt, tmp_path):
    _, _, sd = musubi_adapter(20)
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    mine.load_lora_weights(sd, adapter_name="a")
    want = forward(mine)
    saved = mine.save_lora_weights(tmp_path / "out", "a", format=fmt)
    again = lora_loader.attach(tiny_hunyuan_pipeline())
    again.load_lora_weights(saved, adapter_name="a")
    assert torch.equal(forward(again), want)
    from lora_loader.cli.inspect_cmd import inspect_lora

    assert inspect_lora(saved)["family"] == "hunyuan-video"
    assert family_from_metadata({"lora_loader.base_model": "HunyuanVideo15Transformer3DModel"}) == "hunyuan-video-1.5"
    assert family_from_metadata({"lora_loader.base_model": "HunyuanVideoFramepackTransformer3DModel"}) == "hunyuan-video"


# -- LyCORIS kinds as musubi writes them, on the fused projections ------------------------------------


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """musubi-tuner's networks/lokr.py ``factorization``: the most balanced (m, n), m <= n, m * n = dimension."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_musubi_lokr_and_loha_on_fused_projections_give_each_part_its_rows_of_the_dense_product(kind):
    """musubi's LoKr / LoHa networks target the blocks' Linears minus the modulations; on img_attn_qkv,
    txt_attn_qkv and linear1 each diffusers module takes its rows of kron(w1, w2_a @ w2_b) (or of
    (w1a @ w1b) * (w2a @ w2b)), scaled by alpha / rank."""
    model = tiny_hunyuan()
    table = tencent_modules(model)
    modules = dict(model.named_modules())
    names = [n for n in musubi_names(table) if "mod" not in n]
    g = torch.Generator().manual_seed(15)
    rank, alpha = 2, 3.0
    sd, dense = {}, {}
    for name in names:
        parts, _ = table[name]
        rows, features = sum(modules[p].weight.shape[0] for p in parts), modules[parts[0]].weight.shape[1]
        key = "lora_unet_" + name.replace(".", "_")
        if kind == "lokr":
            (out_l, out_k), (in_m, in_n) = factorization(rows), factorization(features)
            w1 = torch.randn(out_l, in_m, generator=g)
            w2a, w2b = torch.randn(out_k, rank, generator=g) * 0.3, torch.randn(rank, in_n, generator=g) * 0.3
            sd |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b}
            dense[name] = torch.kron(w1, w2a @ w2b) * (alpha / rank)
        else:
            f = [torch.randn(*s, generator=g) * 0.5 for s in ((rows, rank), (rank, features), (rows, rank), (rank, features))]
            sd |= {f"{key}.hada_w1_a": f[0], f"{key}.hada_w1_b": f[1], f"{key}.hada_w2_a": f[2], f"{key}.hada_w2_b": f[3]}
            dense[name] = (f[0] @ f[1]) * (f[2] @ f[3]) * (alpha / rank)
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    want = forward(merged(tiny_hunyuan(), table, dense))
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    base = forward(mine)
    report = mine.load_lora_weights(sd, adapter_name=kind)
    assert report.modules == {"transformer": sum(len(table[n][0]) for n in names)}
    assert_close(forward(mine), want, base)
    mine.fuse_lora()
    assert (forward(mine) - want).abs().max() <= TOLERANCE


# -- keys that fit nothing ---------------------------------------------------------------------------


def test_keys_the_model_lacks_are_refused_by_name_and_change_nothing_or_are_skipped_with_strict_false():
    table, factors, sd = musubi_adapter(16)
    extra = {
        "lora_unet_double_blocks_3_img_mlp_fc1.lora_down.weight": torch.ones(RANK, 20),  # no block 3 in this model
        "lora_unet_double_blocks_3_img_mlp_fc1.lora_up.weight": torch.ones(80, RANK),
        "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight": torch.ones(RANK, 20),  # no such HunyuanVideo module
        "lora_unet_double_blocks_0_img_attn_norm.lora_up.weight": torch.ones(20, RANK),
    }
    mine = lora_loader.attach(tiny_hunyuan_pipeline())
    before = {k: v.clone() for k, v in mine.transformer.state_dict().items()}
    base = forward(mine)
    with pytest.raises(LoraError, match=r"double_blocks_3_img_mlp_fc1") as err:
        mine.load_lora_weights(sd | extra, adapter_name="a")
    assert "double_blocks_0_img_attn_norm" in str(err.value)
    assert mine.get_list_adapters() == {}
    after = mine.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(forward(mine), base)
    with pytest.warns(Warning, match="strict=False, skipped 4 key"):
        report = mine.load_lora_weights(sd | extra, adapter_name="a", strict=False)
    assert sorted(report.skipped) == sorted(extra)
    assert_close(forward(mine), forward(merged(tiny_hunyuan(), table, lora_dense(factors))), base)


# -- which family: HunyuanVideo never read as Flux, Flux never as HunyuanVideo --------------------------


def test_hunyuanvideo_and_flux_names_pick_their_own_tables():
    assert family_of(["double_blocks_0_img_mlp_fc1", "single_blocks_0_linear1", "single_blocks_0_modulation_linear"]) is HUNYUAN_VIDEO
    assert family_of(["double_blocks_0_img_attn_q", "double_blocks_0_img_mod_linear"]) is HUNYUAN_VIDEO_15
    assert family_of(["txt_in_individual_token_refiner_blocks_0_self_attn_qkv", "double_blocks_0_img_attn_qkv"]) is not FLUX
    flux = ["double_blocks_0_img_mlp_0", "double_blocks_0_img_mod_lin", "single_blocks_0_modulation_lin", "img_in", "txt_in"]
    assert family_of(flux) is FLUX
    assert family_of(flux[:3]) is FLUX  # the names both know: Flux's table, first


def test_aliases_are_read_but_the_way_back_names_tencents_modules():
    from lora_loader.formats.original_names import Blocks, Family

    assert HUNYUAN_VIDEO.targets("double_blocks_4_img_mlp_0").paths == ("transformer_blocks.4.ff.net.0.proj",)
    assert HUNYUAN_VIDEO.original_name("transformer_blocks.4.ff.net.0.proj") == ("double_blocks_4_img_mlp_fc1", 0)
    assert HUNYUAN_VIDEO_15.targets("double_blocks_2_img_attn_qkv").paths[1] == "transformer_blocks.2.attn.to_k"
    assert HUNYUAN_VIDEO_15.original_name("transformer_blocks.2.attn.to_k") == ("double_blocks_2_img_attn_k", 0)
    with pytest.raises(ValueError, match="both as modules and as aliases"):
        Family("Demo", hint="", blocks=(Blocks("b_{i}_", "b.{i}.", {"x": "y"}, aliases={"x": "z"}),))


def test_a_flux_file_loads_into_flux_as_before_and_a_hunyuanvideo_file_is_no_flux_file():
    from test_original_names import _kohya_flux_state_dict

    flux = convert(_kohya_flux_state_dict(blocks=1))
    assert not flux.unknown and ("denoiser", "x_embedder") in flux.deltas and ("denoiser", "context_embedder") in flux.deltas
    assert detect_family(flux.deltas)[0] == "flux"
    _, _, sd = musubi_adapter(17)
    ours = convert(sd)
    assert not ours.unknown
    assert ("denoiser", "transformer_blocks.0.ff.net.0.proj") in ours.deltas  # img_mlp_fc1: no Flux module name


def full_depth_names(table_names, blocks: dict[str, int]) -> dict[str, torch.Tensor]:
    """A file's keys (tiny tensors) for real block counts, to detect by names alone."""
    sd = {}
    for template, count in blocks.items():
        for i in range(count):
            for suffix, rows in table_names.items():
                if suffix.startswith(template):
                    key = "lora_unet_" + template.replace("{i}", str(i)) + suffix[len(template):]
                    sd[f"{key}.lora_down.weight"] = torch.ones(1, 8)
                    sd[f"{key}.lora_up.weight"] = torch.ones(rows, 1)
    return sd


def test_detect_family_names_hunyuanvideo_and_15_from_names_or_header_and_inspect_shows_it(tmp_path):
    _, _, sd = musubi_adapter(18)
    assert detect_family(convert(sd).deltas, MUSUBI_HEADER)[0] == "hunyuan-video"
    framepack = MUSUBI_HEADER | {"ss_base_model_version": "framepack", "modelspec.architecture": "framepack/lora"}
    assert detect_family(convert(sd).deltas, framepack)[0] == "hunyuan-video"
    suffixes = {"double_blocks_{i}_img_mlp_fc1": 32, "single_blocks_{i}_linear1": 56}
    full = full_depth_names(suffixes, {"double_blocks_{i}_": 20, "single_blocks_{i}_": 40})
    assert detect_family(convert(full).deltas)[0] == "hunyuan-video"  # no header: single blocks 38, 39
    v15 = full_depth_names({"double_blocks_{i}_img_attn_q": 8, "double_blocks_{i}_img_mlp_fc1": 32}, {"double_blocks_{i}_": 54})
    assert detect_family(convert(v15).deltas)[0] == "hunyuan-video-1.5"  # no header: blocks 48-53
    model = tiny_hunyuan_15()
    table = tencent_modules(model)
    small = musubi_file(lora_factors(model, table, musubi_names(table), seed=19))
    header = {"ss_base_model_version": "hunyuan_video_1_5", "modelspec.architecture": "hunyuan-video-1.5/lora"}
    assert detect_family(convert(small).deltas, header)[0] == "hunyuan-video-1.5"
    refiner = {"transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q.lora_A.weight": torch.ones(1, 8),
               "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 1)}  # fmt: skip
    assert detect_family(convert(refiner).deltas)[0] == "hunyuan-video"
    from lora_loader.cli.inspect_cmd import inspect_lora

    path = tmp_path / "musubi.safetensors"
    save_file(sd, str(path), metadata=MUSUBI_HEADER)
    info = inspect_lora(str(path))
    assert (info["family"], info["family_label"], info["format"]) == ("hunyuan-video", "HunyuanVideo", "kohya")
