"""Flux.2 (dev, Klein) LoRAs in the layouts their producers write, on diffusers' `Flux2Transformer2DModel`.

Flux.2's checkpoint names its modules as Flux.1's does (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``) but they are other modules: ``linear1`` is ONE diffusers module
(``attn.to_qkv_mlp_proj``, not split), ``linear2`` is ``attn.to_out``, the MLPs are SwiGLU
(``ff.linear_in`` / ``ff.linear_out``), the modulations are three shared ones.

- diffusers / PEFT: peft's own adapter saved by ``Flux2Pipeline.save_lora_weights``; oracle diffusers+peft.
- BFL names as sd-scripts / musubi-tuner write them (``lora_unet_double_blocks_0_img_attn_qkv`` +
  ``.alpha``), as ai-toolkit writes them (``diffusion_model.`` + BFL names, ``lora_A`` / ``lora_B``) and
  PEFT-wrapped (``base_model.model.``): oracle diffusers' own converters (`Flux2LoraLoaderMixin.lora_state_dict`)
  + peft, on every module they convert right; and an independent merge computed here (``W + alpha / r * up @ down``,
  fused rows cut by hand, (shift, scale) swapped by hand) on every module, the ones diffusers' converters skip
  (guidance_in and the modulations in Kohya files) or get wrong (the final layer's adaLN modulation: diffusers'
  single-file conversion swaps its halves, its LoRA converters do not) included.
- LoKr on the fused projections (ai-toolkit's ``diffusion_model.*.lokr_w1``, LyCORIS' Kohya names): each diffusers
  module takes its rows of the dense Kronecker product, computed here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Pipeline, FluxTransformer2DModel
from peft import LoraConfig
from producers import add_peft_adapter, save_diffusers_lora
from safetensors.torch import load_file, save_file
from tiny_flux2 import forward, tiny_flux2

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TOLERANCE = 1e-4
MOVED = 1e-3
RANK = 4


def assert_close(got, want, base):
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE, float((got - want).abs().max())


def bfl_modules(model) -> dict[str, tuple[list[str], bool]]:
    """BFL's dotted module name -> (the diffusers modules its output rows cover, in row order; whether its
    (shift, scale) halves are (scale, shift) in diffusers), from BFL's flux2 model code and diffusers'
    convert_flux2_transformer_checkpoint_to_diffusers."""
    cfg = model.config
    table = {
        "img_in": (["x_embedder"], False),
        "txt_in": (["context_embedder"], False),
        "time_in.in_layer": (["time_guidance_embed.timestep_embedder.linear_1"], False),
        "time_in.out_layer": (["time_guidance_embed.timestep_embedder.linear_2"], False),
        "double_stream_modulation_img.lin": (["double_stream_modulation_img.linear"], False),
        "double_stream_modulation_txt.lin": (["double_stream_modulation_txt.linear"], False),
        "single_stream_modulation.lin": (["single_stream_modulation.linear"], False),
        "final_layer.linear": (["proj_out"], False),
        "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
    }
    if cfg.guidance_embeds:
        table["guidance_in.in_layer"] = (["time_guidance_embed.guidance_embedder.linear_1"], False)
        table["guidance_in.out_layer"] = (["time_guidance_embed.guidance_embedder.linear_2"], False)
    for i in range(cfg.num_layers):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table |= {
            d + "img_attn.qkv": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], False),
            d + "img_attn.proj": ([b + "attn.to_out.0"], False),
            d + "img_mlp.0": ([b + "ff.linear_in"], False),
            d + "img_mlp.2": ([b + "ff.linear_out"], False),
            d + "txt_attn.qkv": ([b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"], False),
            d + "txt_attn.proj": ([b + "attn.to_add_out"], False),
            d + "txt_mlp.0": ([b + "ff_context.linear_in"], False),
            d + "txt_mlp.2": ([b + "ff_context.linear_out"], False),
        }
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}."
        table |= {f"single_blocks.{i}.linear1": ([b + "attn.to_qkv_mlp_proj"], False),
                  f"single_blocks.{i}.linear2": ([b + "attn.to_out"], False)}  # fmt: skip
    return table


def block_names(table) -> list[str]:
    """musubi-tuner's / sd-scripts' targets: the Linears of DoubleStreamBlock and SingleStreamBlock."""
    return [n for n in table if n.startswith(("double_blocks.", "single_blocks."))]


def lora_factors(model, table, names, seed: int, alpha=None) -> dict[str, tuple]:
    """Per BFL module: (down [r, in], up [rows, r], alpha), rows the sum of its diffusers parts' rows."""
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, name in enumerate(names):
        parts, _ = table[name]
        rows = sum(modules[p].weight.shape[0] for p in parts)
        features = modules[parts[0]].weight.shape[1]
        a = float(1 + n % 5) if alpha is None else float(alpha)
        out[name] = (torch.randn(RANK, features, generator=g) * 0.3, torch.randn(rows, RANK, generator=g) * 0.3, a)
    return out


def kohya_file(factors, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """sd-scripts / musubi-tuner LoRANetwork: lora_unet_<BFL name, dots as underscores>.lora_down/lora_up/alpha."""
    sd = {}
    for name, (down, up, alpha) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{key}.lora_down.weight": down.to(dtype), f"{key}.lora_up.weight": up.to(dtype), f"{key}.alpha": torch.tensor(alpha).to(dtype)}
    return sd


def dotted_file(factors, prefix: str) -> dict[str, torch.Tensor]:
    """ai-toolkit (``diffusion_model.``) / a PEFT-wrapped BFL model (``base_model.model.``): lora_A / lora_B and no
    alpha (alpha = rank: the factors here are made with alpha = RANK)."""
    sd = {}
    for name, (down, up, alpha) in factors.items():
        assert alpha == RANK
        sd |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
    return sd


def merged(model, table, deltas: dict[str, torch.Tensor], weight: float = 1.0):
    """``model`` with each BFL module's dense delta ([rows, in]) added to its diffusers parts' weights."""
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
                w += weight * dense[start : start + w.shape[0]]
                start += w.shape[0]
            assert start == dense.shape[0], name
    return model


def lora_dense(factors) -> dict[str, torch.Tensor]:
    return {name: alpha / down.shape[0] * up.float() @ down.float() for name, (down, up, alpha) in factors.items()}


def diffusers_loaded(sd, guidance: bool = True, ref=None, adapter_name: str = "a"):
    """diffusers' Flux2LoraLoaderMixin.load_lora_weights without a whole pipeline: its lora_state_dict (the
    converters; the header's lora_adapter_metadata for a file), then peft through load_lora_adapter."""
    ref = tiny_flux2(guidance=guidance) if ref is None else ref
    source = sd if isinstance(sd, str) else {k: v.clone() for k, v in sd.items()}
    state, metadata = Flux2Pipeline.lora_state_dict(source, return_lora_metadata=True)
    ref.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name, metadata=metadata)
    return ref


# -- diffusers / PEFT layout ----------------------------------------------------------------------

# Every Linear of the model (a regex: the double blocks' ``attn.to_out`` is a ModuleList, the single blocks' a Linear).
LINEARS = (r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|linear_in|linear_out|to_qkv_mlp_proj"
           r"|linear|linear_1|linear_2)$|^single_transformer_blocks\.\d+\.attn\.to_out$|^(x_embedder|context_embedder|proj_out)$")


def peft_file(tmp_path, seed: int, guidance: bool = True) -> str:
    config = LoraConfig(r=4, lora_alpha=6 + seed, target_modules=LINEARS, rank_pattern={"to_k": 2},
                        alpha_pattern={"proj_out": 3}, init_lora_weights=False)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sd = add_peft_adapter(tiny_flux2(guidance=guidance), config)
    return save_diffusers_lora(tmp_path, Flux2Pipeline, {"transformer": sd}, {"transformer": config}, f"{seed}.safetensors")


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_a_peft_file_in_diffusers_layout_gives_what_diffusers_gives(guidance, tmp_path):
    path = peft_file(tmp_path, 1, guidance)
    ref = tiny_flux2(guidance=guidance)
    base = forward(ref)
    diffusers_loaded(path, ref=ref)
    mine = lora_loader.attach(tiny_flux2(guidance=guidance))
    report = mine.load_lora_weights(path, adapter_name="a")
    assert report.modules == {"model": len([m for m in ref.modules() if hasattr(m, "lora_A")])}
    assert_close(forward(mine), forward(ref), base)
    assert detect_family(convert(load_file(path)).deltas)[0] == "flux2"


def test_two_peft_files_blend_as_diffusers_blends_them(tmp_path):
    paths = [peft_file(tmp_path, seed) for seed in (1, 2)]
    ref, mine = tiny_flux2(), lora_loader.attach(tiny_flux2())
    base = forward(ref)
    for name, path in zip("ab", paths):
        diffusers_loaded(path, ref=ref, adapter_name=name)
        mine.load_lora_weights(path, adapter_name=name)
    ref.set_adapters(["a", "b"], [0.7, 0.3])
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(forward(mine), forward(ref), base)


# -- BFL names: diffusers' converters where they are right, an independent merge everywhere ---------

# What diffusers' converters do not convert right: the final adaLN modulation (not swapped); Kohya files: the
# modules `_convert_kohya_flux2_lora_to_diffusers` has no entry for (it warns and drops them).
NOT_DIFFUSERS = ("final_layer.adaLN_modulation.1",)
NOT_DIFFUSERS_KOHYA = NOT_DIFFUSERS + ("guidance_in.in_layer", "guidance_in.out_layer", "double_stream_modulation_img.lin",
                                       "double_stream_modulation_txt.lin", "single_stream_modulation.lin")  # fmt: skip


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model.", "base_model.model."])
def test_bfl_names_load_as_diffusers_own_converters_load_them(layout):
    model = tiny_flux2()
    table = bfl_modules(model)
    skip = NOT_DIFFUSERS_KOHYA if layout == "kohya" else NOT_DIFFUSERS
    names = [n for n in table if n not in skip]
    factors = lora_factors(model, table, names, seed=2, alpha=None if layout == "kohya" else RANK)
    sd = kohya_file(factors) if layout == "kohya" else dotted_file(factors, layout)
    ref = diffusers_loaded(sd)
    mine = lora_loader.attach(tiny_flux2())
    base = forward(mine)
    report = mine.load_lora_weights(sd, adapter_name="a")
    assert report.modules == {"model": sum(len(table[n][0]) for n in names)}
    assert_close(forward(mine), forward(ref), base)
    assert detect_family(convert(sd).deltas)[0] == "flux2"


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
@pytest.mark.parametrize("layout", ["kohya", "diffusion_model.", "base_model.model."])
def test_every_bfl_module_gives_the_independent_merge(layout, guidance):
    model = tiny_flux2(guidance=guidance)
    table = bfl_modules(model)
    factors = lora_factors(model, table, list(table), seed=3, alpha=None if layout == "kohya" else RANK)
    sd = kohya_file(factors) if layout == "kohya" else dotted_file(factors, layout)
    want = forward(merged(tiny_flux2(guidance=guidance), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_flux2(guidance=guidance))
    base = forward(mine)
    report = mine.load_lora_weights(sd, adapter_name="a")
    assert report.modules == {"model": sum(len(table[n][0]) for n in factors)}
    assert_close(forward(mine), want, base)


def test_a_musubi_file_in_bf16_with_its_header_gives_the_independent_merge(tmp_path):
    """musubi-tuner's FLUX.2 network: DoubleStreamBlock / SingleStreamBlock Linears, bf16, modelspec.architecture."""
    model = tiny_flux2(guidance=False)
    table = bfl_modules(model)
    factors = lora_factors(model, table, block_names(table), seed=4)
    path = tmp_path / "musubi.safetensors"
    header = {"ss_network_module": "networks.lora_flux_2", "modelspec.architecture": "Flux.2-klein-4b/lora"}
    save_file(kohya_file(factors, torch.bfloat16), str(path), metadata=header)
    bf16 = {n: (d.bfloat16(), u.bfloat16(), a) for n, (d, u, a) in factors.items()}
    want = forward(merged(tiny_flux2(guidance=False), table, lora_dense(bf16)))
    mine = lora_loader.attach(tiny_flux2(guidance=False))
    base = forward(mine)
    assert mine.load_lora_weights(str(path), adapter_name="m").format == "kohya"
    assert_close(forward(mine), want, base)
    attention_only = {k: v for k, v in kohya_file(factors).items() if "_attn_" in k}
    assert detect_family(convert(attention_only).deltas, header)[0] == "flux2"  # names shared with Flux.1: the header says


def test_linear1_is_one_module_in_flux2_and_four_in_flux1():
    """The widths decide: Flux.2's linear1 has 9 rows per input feature (q, k, v, SwiGLU gate and up), Flux.1's 7."""
    d = 32
    for rows, paths in ((9 * d, ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]),
                        (7 * d, [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])):  # fmt: skip
        sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(RANK, d),
              "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(rows, RANK)}  # fmt: skip
        assert sorted(m for _, m in convert(sd).deltas) == sorted(paths)


# -- LoKr on the fused projections ---------------------------------------------------------------


def lokr_file(model, table, names, seed: int, layout: str):
    """ai-toolkit's LoKr (``diffusion_model.<BFL>.lokr_w1`` / ``lokr_w2``, both full: no alpha scaling) or LyCORIS'
    Kohya names (``lora_unet_<BFL>.lokr_w1`` full, ``lokr_w2_a`` @ ``lokr_w2_b`` of rank 2, ``alpha``: scale alpha / 2).
    Returns the file and each module's dense delta (kron(w1, w2) * scale)."""
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    sd, dense = {}, {}
    for name in names:
        parts, _ = table[name]
        rows, cols = sum(modules[p].weight.shape[0] for p in parts), modules[parts[0]].weight.shape[1]
        w1 = torch.randn(4, 2, generator=g) * 0.5
        w2_shape = (rows // 4, cols // 2)
        if layout == "ai-toolkit":
            w2 = torch.randn(*w2_shape, generator=g) * 0.3
            sd |= {f"diffusion_model.{name}.lokr_w1": w1, f"diffusion_model.{name}.lokr_w2": w2}
            dense[name] = torch.kron(w1, w2)
        else:
            a, b = torch.randn(w2_shape[0], 2, generator=g) * 0.5, torch.randn(2, w2_shape[1], generator=g) * 0.5
            key = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": a, f"{key}.lokr_w2_b": b, f"{key}.alpha": torch.tensor(3.0)}
            dense[name] = 3.0 / 2 * torch.kron(w1, a @ b)
    return sd, dense


@pytest.mark.parametrize("layout", ["ai-toolkit", "lycoris"])
def test_lokr_on_fused_projections_gives_each_part_its_rows_of_the_kronecker_product(layout):
    model = tiny_flux2()
    table = bfl_modules(model)
    names = [n for n in block_names(table)]
    sd, dense = lokr_file(model, table, names, seed=5, layout=layout)
    want = forward(merged(tiny_flux2(), table, dense))
    mine = lora_loader.attach(tiny_flux2())
    base = forward(mine)
    mine.load_lora_weights(sd, adapter_name="k")
    assert_close(forward(mine), want, base)


# -- the adapter's life: blend, disable, fuse / unfuse, errors ----------------------------------


def test_two_kohya_files_blend_disable_fuse_and_unfuse_exactly():
    model = tiny_flux2()
    table = bfl_modules(model)
    fa = lora_factors(model, table, list(table), seed=6)
    fb = lora_factors(model, table, list(table), seed=7)
    mine = lora_loader.attach(tiny_flux2())
    base = forward(mine)
    weights = {k: v.clone() for k, v in mine.state_dict().items()}
    mine.load_lora_weights(kohya_file(fa), adapter_name="a")
    mine.load_lora_weights(kohya_file(fb), adapter_name="b")
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    want_model = merged(tiny_flux2(), table, lora_dense(fa), 0.7)
    want = forward(merged(want_model, table, lora_dense(fb), 0.3))
    assert_close(forward(mine), want, base)
    mine.disable_lora()
    assert torch.equal(forward(mine), base)
    mine.enable_lora()
    mine.fuse_lora()
    assert (forward(mine) - want).abs().max() <= TOLERANCE
    mine.unfuse_lora()
    for k, v in mine.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    mine.unload_lora_weights()
    assert torch.equal(forward(mine), base)


def test_a_file_with_modules_the_model_lacks_is_refused_whole_or_reported():
    model = tiny_flux2(guidance=False)  # Klein: no guidance embedder
    table = bfl_modules(tiny_flux2())
    factors = lora_factors(tiny_flux2(), table, list(table), seed=8)
    sd = kohya_file(factors)
    mine = lora_loader.attach(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match="guidance") as err:
        mine.load_lora_weights(sd, adapter_name="x")
    assert "guidance" in str(err.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.warns(Warning, match="strict=False, skipped 6 key"):
        report = mine.load_lora_weights(sd, adapter_name="x", strict=False)
    assert sorted(report.skipped) == sorted(k for k in sd if "guidance_in" in k)
    assert report.modules == {"model": sum(len(table[n][0]) for n in factors if not n.startswith("guidance_in"))}


# -- names and shapes both families share: the live model decides --------------------------------


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model."])
def test_a_file_in_names_flux1_and_flux2_share_loads_into_either_model(layout):
    """Attention and time_in only: same names, same widths in Flux.1 and Flux.2; the two tables map time_in to
    time_text_embed (Flux.1) or time_guidance_embed (Flux.2): the model it is loaded into decides."""
    model = tiny_flux2()
    table = bfl_modules(model)
    names = [n for n in table if "_attn." in n or n.startswith("time_in")]
    factors = lora_factors(model, table, names, seed=9, alpha=None if layout == "kohya" else RANK)
    sd = kohya_file(factors) if layout == "kohya" else dotted_file(factors, layout)
    want = forward(merged(tiny_flux2(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_flux2())
    base = forward(mine)
    mine.load_lora_weights(sd, adapter_name="s")
    assert_close(forward(mine), want, base)
    # The same file into Flux.1 (same widths: d = 32, 256 timestep channels) maps time_in onto time_text_embed.
    flux1 = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                   axes_dims_rope=(4, 4, 8))  # fmt: skip
    lora_loader.attach(flux1)
    report = flux1.load_lora_weights(sd, adapter_name="s")
    assert report.modules == {"model": sum(len(table[n][0]) for n in names)}
    assert any(m.__class__.__name__ != "Linear" for n, m in flux1.named_modules() if n == "time_text_embed.timestep_embedder.linear_1")


def test_a_file_of_the_shared_modulations_only_is_flux2s():
    """ai-toolkit trains the shared modulation Linears too: a file of only those has no block name to go by."""
    model = tiny_flux2()
    table = bfl_modules(model)
    names = ["double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"]
    factors = lora_factors(model, table, names, seed=10, alpha=RANK)
    want = forward(merged(tiny_flux2(), table, lora_dense(factors)))
    mine = lora_loader.attach(tiny_flux2())
    base = forward(mine)
    assert mine.load_lora_weights(dotted_file(factors, "diffusion_model."), adapter_name="m").modules == {"model": 3}
    assert_close(forward(mine), want, base)


def test_a_kohya_save_writes_bfl_names_and_reads_back_the_same(tmp_path):
    """save_lora_weights(format="kohya") on Flux.2 writes its BFL names (linear1 whole, qkv fused) as musubi-tuner does."""
    path = peft_file(tmp_path, 3)
    mine = lora_loader.attach(tiny_flux2())
    base = forward(mine)
    mine.load_lora_weights(path, adapter_name="a")
    want = forward(mine)
    written = load_file(mine.save_lora_weights(tmp_path / "kohya.safetensors", "a", format="kohya"))
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in written
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in written
    again = lora_loader.attach(tiny_flux2())
    again.load_lora_weights(written, adapter_name="k")
    assert_close(forward(again), want, base)


@pytest.mark.parametrize("which", ["blocks", "attention + header", "flux1"])
def test_lora_loader_inspect_names_flux2_and_flux1_apart(which, tmp_path, capsys):
    """Names shared with Flux.1: the widths (linear1, the SwiGLU MLPs) or the header (musubi's modelspec) decide."""
    import json

    from lora_loader.cli import main

    model = tiny_flux2()
    table = bfl_modules(model)
    path, header = str(tmp_path / "f.safetensors"), None
    if which == "flux1":
        d = 32  # Flux.1's linear1: 7 rows per input feature, its MLP 4
        sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(RANK, d), "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(7 * d, RANK),
              "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.randn(RANK, d), "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": torch.randn(4 * d, RANK)}  # fmt: skip
    else:
        names = block_names(table) if which == "blocks" else [n for n in table if "_attn." in n]
        sd = kohya_file(lora_factors(model, table, names, seed=11))
        header = None if which == "blocks" else {"modelspec.architecture": "Flux.2-dev/lora"}
    save_file(sd, path, metadata=header)
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == ("flux" if which == "flux1" else "flux2") and info["unknown_keys"] == {}, info
