"""The Flux.1 variants: fal's Kontext layout, Chroma, FLUX.1-Krea-dev.

- fal's Kontext trainer: PEFT-wrapped BFL names (``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``),
  every Linear of every block: oracle diffusers' ``_convert_fal_kontext_lora_to_diffusers`` (it hard-codes
  FLUX.1's 19 / 38 blocks and 3072 width: compared on a state dict of real row counts and small input widths),
  and an independent merge on a tiny `FluxTransformer2DModel` (Kontext's diffusers model is Flux's).
- Chroma (`ChromaTransformer2DModel`: no per-block modulation, no guidance_in / vector_in, one
  ``distilled_guidance_layer``): diffusers / PEFT layout through ``ChromaPipeline``'s loader (FluxLoraLoaderMixin)
  + peft; its checkpoint names in Kohya (``lora_unet_``) and ai-toolkit (``diffusion_model.``) spelling, the
  distilled guidance layer included: an independent merge.
- FLUX.1-Krea-dev is FLUX.1-dev's architecture: its Kohya files load as Flux.1 (linear1 split four ways).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FluxTransformer2DModel
from peft import LoraConfig
from producers import add_peft_adapter, save_diffusers_lora

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = [pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # fmt: skip

TOLERANCE = 1e-4
MOVED = 1e-3
RANK = 4
FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=16, axes_dims_rope=(4, 4, 8))  # fmt: skip


def assert_close(got, want, base):
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE, float((got - want).abs().max())


def _seeded(factory, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_flux(guidance: bool = True):
    return _seeded(lambda: FluxTransformer2DModel(**FLUX_CONFIG, pooled_projection_dim=8, guidance_embeds=guidance))


def tiny_chroma():
    return _seeded(lambda: ChromaTransformer2DModel(**FLUX_CONFIG, approximator_num_channels=8, approximator_hidden_dim=32,
                                                    approximator_layers=2))  # fmt: skip


def forward(model):
    g = torch.Generator().manual_seed(7)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)
    kwargs = dict(hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(8, 3), return_dict=False)  # fmt: skip
    if isinstance(model, FluxTransformer2DModel):
        kwargs["pooled_projections"] = torch.randn(1, 8, generator=g)
        if model.config.guidance_embeds:
            kwargs["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        return model(**kwargs)[0]


def bfl_modules(model) -> dict[str, tuple[list[str], bool]]:
    """BFL's dotted Flux.1 / Chroma module name -> (its diffusers modules in row order, (shift, scale) swapped)."""
    chroma = isinstance(model, ChromaTransformer2DModel)
    table = {"img_in": (["x_embedder"], False), "txt_in": (["context_embedder"], False), "final_layer.linear": (["proj_out"], False)}
    for i in range(model.config.num_layers):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table |= {
            d + "img_attn.qkv": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], False),
            d + "img_attn.proj": ([b + "attn.to_out.0"], False),
            d + "img_mlp.0": ([b + "ff.net.0.proj"], False),
            d + "img_mlp.2": ([b + "ff.net.2"], False),
            d + "txt_attn.qkv": ([b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"], False),
            d + "txt_attn.proj": ([b + "attn.to_add_out"], False),
            d + "txt_mlp.0": ([b + "ff_context.net.0.proj"], False),
            d + "txt_mlp.2": ([b + "ff_context.net.2"], False),
        }
        if not chroma:
            table |= {d + "img_mod.lin": ([b + "norm1.linear"], False), d + "txt_mod.lin": ([b + "norm1_context.linear"], False)}
    for i in range(model.config.num_single_layers):
        b = f"single_transformer_blocks.{i}."
        table |= {f"single_blocks.{i}.linear1": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"], False),
                  f"single_blocks.{i}.linear2": ([b + "proj_out"], False)}  # fmt: skip
        if not chroma:
            table[f"single_blocks.{i}.modulation.lin"] = ([b + "norm.linear"], False)
    if chroma:
        table |= {"distilled_guidance_layer.in_proj": (["distilled_guidance_layer.in_proj"], False),
                  "distilled_guidance_layer.out_proj": (["distilled_guidance_layer.out_proj"], False)}  # fmt: skip
        for i in range(model.config.approximator_layers):
            table |= {f"distilled_guidance_layer.layers.{i}.in_layer": ([f"distilled_guidance_layer.layers.{i}.linear_1"], False),
                      f"distilled_guidance_layer.layers.{i}.out_layer": ([f"distilled_guidance_layer.layers.{i}.linear_2"], False)}  # fmt: skip
    else:
        table |= {
            "time_in.in_layer": (["time_text_embed.timestep_embedder.linear_1"], False),
            "time_in.out_layer": (["time_text_embed.timestep_embedder.linear_2"], False),
            "vector_in.in_layer": (["time_text_embed.text_embedder.linear_1"], False),
            "vector_in.out_layer": (["time_text_embed.text_embedder.linear_2"], False),
            "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
        }
        if model.config.guidance_embeds:
            table |= {"guidance_in.in_layer": (["time_text_embed.guidance_embedder.linear_1"], False),
                      "guidance_in.out_layer": (["time_text_embed.guidance_embedder.linear_2"], False)}  # fmt: skip
    return table


def lora_factors(model, table, names, seed: int, alpha=None) -> dict[str, tuple]:
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, name in enumerate(names):
        parts, _ = table[name]
        rows = sum(modules[p].weight.shape[0] for p in parts)
        a = float(1 + n % 5) if alpha is None else float(alpha)
        out[name] = (torch.randn(RANK, modules[parts[0]].weight.shape[1], generator=g) * 0.3, torch.randn(rows, RANK, generator=g) * 0.3, a)
    return out


def kohya_file(factors) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up, alpha) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    return sd


def dotted_file(factors, prefix: str) -> dict[str, torch.Tensor]:
    """lora_A / lora_B, no alpha keys (alpha = rank)."""
    assert all(alpha == RANK for _, _, alpha in factors.values())
    return {f"{prefix}{name}.lora_{ab}.weight": t for name, (d, u, _) in factors.items() for ab, t in (("A", d), ("B", u))}


def merged(model, table, factors, weight: float = 1.0):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (down, up, alpha) in factors.items():
            dense = alpha / down.shape[0] * up @ down
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


# -- fal's Kontext layout ---------------------------------------------------------------------------


def test_a_fal_kontext_file_converts_to_what_diffusers_own_converter_gives():
    """All 19 double and 38 single blocks as fal writes them (diffusers' converter pops every one), real FLUX.1 row
    counts, input width 8: every module's B @ A equals diffusers' converted one."""
    from diffusers.loaders.lora_conversion_utils import _convert_fal_kontext_lora_to_diffusers

    d, g = 3072, torch.Generator().manual_seed(0)
    rows = {"img_mod.lin": 6 * d, "txt_mod.lin": 6 * d, "img_attn.qkv": 3 * d, "txt_attn.qkv": 3 * d, "img_mlp.0": 4 * d,
            "txt_mlp.0": 4 * d, "img_mlp.2": d, "txt_mlp.2": d, "img_attn.proj": d, "txt_attn.proj": d}  # fmt: skip
    names = [f"double_blocks.{i}.{s}" for i in range(19) for s in rows]
    names += [f"single_blocks.{i}.{s}" for i in range(38) for s in ("linear1", "linear2", "modulation.lin")]
    names += ["final_layer.linear"]
    single = {"linear1": 7 * d, "linear2": d, "modulation.lin": 3 * d}
    sd = {}
    for name in names:
        suffix = name.split(".", 2)[-1]
        out = rows.get(suffix) or single.get(suffix) or 64
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    ours = convert(sd)
    assert not ours.unknown
    theirs = _convert_fal_kontext_lora_to_diffusers(dict(sd))
    paths = sorted(k[: -len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight"))
    assert len(paths) == len(ours.deltas) == 19 * 14 + 38 * 6 + 1
    by_path = {module: delta for (_, module), delta in ours.deltas.items()}
    for path in paths:
        delta = by_path[path.removeprefix("transformer.")]
        want = theirs[f"{path}.lora_B.weight"] @ theirs[f"{path}.lora_A.weight"]
        torch.testing.assert_close(delta.scale * delta.up @ delta.down, want, rtol=1e-5, atol=1e-5)
    assert detect_family(ours.deltas)[0] == "flux"


def test_a_fal_kontext_file_gives_the_independent_merge_on_a_flux_model():
    model = tiny_flux()
    table = bfl_modules(model)
    names = [n for n in table if n.startswith(("double_blocks.", "single_blocks.")) or n == "final_layer.linear"]
    factors = lora_factors(model, table, names, seed=1, alpha=RANK)
    want = forward(merged(tiny_flux(), table, factors))
    mine = lora_loader.attach(tiny_flux())
    base = forward(mine)
    report = mine.load_lora_weights(dotted_file(factors, "base_model.model."), adapter_name="kontext")
    assert report.modules == {"model": sum(len(table[n][0]) for n in names)}
    assert_close(forward(mine), want, base)


# -- Chroma -------------------------------------------------------------------------------------------

CHROMA_LINEARS = (r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|proj|net\.2|proj_mlp|proj_out"
                  r"|linear_1|linear_2|in_proj|out_proj)$|^(x_embedder|context_embedder)$")


def chroma_peft_file(tmp_path, seed: int) -> str:
    config = LoraConfig(r=4, lora_alpha=6 + seed, target_modules=CHROMA_LINEARS, init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sd = add_peft_adapter(tiny_chroma(), config)
    return save_diffusers_lora(tmp_path, ChromaPipeline, {"transformer": sd}, {"transformer": config}, f"{seed}.safetensors")


def diffusers_chroma(path, ref, adapter_name):
    state, metadata = ChromaPipeline.lora_state_dict(path, return_lora_metadata=True)
    ref.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name, metadata=metadata)
    return ref


def test_chroma_peft_files_one_and_blended_give_what_diffusers_gives(tmp_path):
    paths = [chroma_peft_file(tmp_path, seed) for seed in (1, 2)]
    ref, mine = tiny_chroma(), lora_loader.attach(tiny_chroma())
    base = forward(ref)
    diffusers_chroma(paths[0], ref, "a")
    mine.load_lora_weights(paths[0], adapter_name="a")
    assert_close(forward(mine), forward(ref), base)
    diffusers_chroma(paths[1], ref, "b")
    mine.load_lora_weights(paths[1], adapter_name="b")
    ref.set_adapters(["a", "b"], [0.7, 0.3])
    mine.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(forward(mine), forward(ref), base)


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model."])
def test_chroma_checkpoint_names_give_the_independent_merge(layout):
    model = tiny_chroma()
    table = bfl_modules(model)
    factors = lora_factors(model, table, list(table), seed=3, alpha=None if layout == "kohya" else RANK)
    sd = kohya_file(factors) if layout == "kohya" else dotted_file(factors, layout)
    want = forward(merged(tiny_chroma(), table, factors))
    mine = lora_loader.attach(tiny_chroma())
    base = forward(mine)
    report = mine.load_lora_weights(sd, adapter_name="c")
    assert report.modules == {"model": sum(len(table[n][0]) for n in factors)}
    assert_close(forward(mine), want, base)
    assert detect_family(convert(sd).deltas)[0] == "chroma"


def test_chroma_disable_fuse_unfuse_exact_and_a_flux_modulation_is_refused_whole():
    model = tiny_chroma()
    table = bfl_modules(model)
    factors = lora_factors(model, table, list(table), seed=4)
    mine = lora_loader.attach(tiny_chroma())
    base = forward(mine)
    weights = {k: v.clone() for k, v in mine.state_dict().items()}
    mine.load_lora_weights(kohya_file(factors), adapter_name="c")
    want = forward(merged(tiny_chroma(), table, factors))
    mine.disable_lora()
    assert torch.equal(forward(mine), base)
    mine.enable_lora()
    mine.fuse_lora()
    assert (forward(mine) - want).abs().max() <= TOLERANCE
    mine.unfuse_lora()
    assert all(torch.equal(v, weights[k]) for k, v in mine.state_dict().items() if k in weights)
    mine.unload_lora_weights()
    # A Flux.1 file's per-block modulation: Chroma has none. Refused whole, the model untouched; strict=False skips it.
    flux_table = bfl_modules(tiny_flux())
    extra = kohya_file(lora_factors(tiny_flux(), flux_table, ["double_blocks.0.img_mod.lin"], seed=5))
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with pytest.raises(LoraError, match="img_mod"):
        mine.load_lora_weights(kohya_file(factors) | extra, adapter_name="x")
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
    with pytest.warns(Warning, match="strict=False, skipped 3 key"):
        report = mine.load_lora_weights(kohya_file(factors) | extra, adapter_name="x", strict=False)
    assert sorted(report.skipped) == sorted(extra)
    assert_close(forward(mine), want, base)


def test_a_chroma_file_in_flux_names_only_is_named_chroma_by_its_header():
    model = tiny_chroma()
    table = bfl_modules(model)
    sd = kohya_file(lora_factors(model, table, [n for n in table if "_attn." in n], seed=6))
    assert detect_family(convert(sd).deltas, {"modelspec.architecture": "chroma/lora"})[0] == "chroma"


# -- Krea ---------------------------------------------------------------------------------------------


def test_a_krea_kohya_file_loads_as_flux1():
    """FLUX.1-Krea-dev: FLUX.1-dev's architecture; sd-scripts writes its Flux.1 header. linear1 is four modules."""
    model = tiny_flux()
    table = bfl_modules(model)
    factors = lora_factors(model, table, list(table), seed=7)
    sd = kohya_file(factors)
    want = forward(merged(tiny_flux(), table, factors))
    mine = lora_loader.attach(tiny_flux())
    base = forward(mine)
    report = mine.load_lora_weights(sd, adapter_name="krea")
    assert report.modules == {"model": sum(len(table[n][0]) for n in factors)}
    assert_close(forward(mine), want, base)
    header = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora", "modelspec.title": "krea"}
    assert detect_family(convert(sd).deltas, header)[0] == "flux"
