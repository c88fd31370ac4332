"""MiniMax-H3 (diffusers' ``MiniMaxH3ModularPipeline``: ``transformer`` and ``transformer_ref``) against diffusers+peft.

Each producer's layout is written here as its own save code writes it (none of it through lora_loader):

- ai-toolkit (``extensions_built_in/diffusion_models/minimax_h3``): its LoRA network on every Linear of the
  original transformer, peft-format keys without alpha, ``transformer.`` renamed to ``diffusion_model.`` by
  ``convert_lora_weights_before_save``, saved in bf16; its LoKr keeps ``lokr_*`` and ``alpha``;
- the reference / ComfyUI names with no prefix, alpha-less and mixed-rank (AdaLN projections at a lower
  rank), as the published Turbo LoRAs circulate;
- musubi-tuner (``networks/lora_minimax_h3.py``: ``lora_unet_`` on the main blocks' attention and MLP,
  AdaLN excluded; ``lora_down``/``lora_up``/``alpha``, bf16, its ``modelspec.architecture`` header);
- DiffSynth-Studio (``--lora_target_modules attn.qkv_proj,attn.out_proj,mlp.fc1,mlp.fc2``, peft's state dict
  with the ``.default.`` infix, on the raw checkpoint whose ``qkv_proj`` rows interleave per head);
- LightX2V's Turbo files (diffusers' names with ``.default.``, no prefix, alpha in the safetensors header);
- diffusers' own layout (peft + ``MiniMaxH3ModularPipeline.save_lora_weights``), for ``transformer`` and
  ``transformer_ref``.

The oracle is diffusers: the same file loaded by ``MiniMaxH3LoraLoaderMixin.load_lora_weights`` (its
converter + peft) into an identical tiny pipeline, the denoiser's video and audio outputs equal to 1e-4,
and the LoRA must have moved them. LoKr, which diffusers does not load for H3, is checked against a merge
of the factors computed here.
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers.modular_pipelines import MiniMaxH3ModularPipeline
from peft import LoraConfig
from producers import add_peft_adapter
from safetensors.torch import load_file, save_file
from tiny_minimax import CONFIG, HEAD_DIM, original_modules, run, tiny_minimax_pipeline, tiny_transformer

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = [
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*requires torchvision"),
]

TOLERANCE = 1e-4
MOVED = 1e-3
RANK = 4
MUSUBI_HEADER = {"modelspec.architecture": "MiniMax-H3/lora", "ss_base_model_version": "minimax_h3", "ss_network_dim": "4"}


def assert_close(got, want, base):
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE


def both(ref: bool = True):
    """A pipeline for diffusers+peft and an identical one with lora_loader attached."""
    return tiny_minimax_pipeline(ref=ref), lora_loader.attach(tiny_minimax_pipeline(ref=ref))


# -- producers ---------------------------------------------------------------------------------------------------


def factors(modules: dict, seed: int, rank=RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (down [r, in], up [out, r])}``; ``rank`` a number or ``{name fragment: rank}`` (default RANK)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_in, fan_out) in modules.items():
        r = rank if isinstance(rank, int) else next((v for k, v in rank.items() if k in name), RANK)
        out[name] = (torch.randn(r, fan_in, generator=g) * 0.3, torch.randn(fan_out, r, generator=g) * 0.3)
    return out


def save(tensors: dict, path, metadata=None) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata)
    return os.fspath(path)


def peft_keys(f: dict, prefix: str = "", infix: str = "", dtype=torch.float32) -> dict:
    return {f"{prefix}{m}.lora_{ab}{infix}.weight": t.to(dtype) for m, (d, u) in f.items() for ab, t in (("A", d), ("B", u))}


def aitoolkit_file(path, seed=1, modules=None) -> str:
    """ai-toolkit: every Linear of the original transformer, ``diffusion_model.`` + peft keys, no alpha, bf16."""
    return save(peft_keys(factors(modules or original_modules(), seed), "diffusion_model.", dtype=torch.bfloat16), path)


def bare_file(path, seed=1) -> str:
    """The reference names with no prefix, alpha-less, AdaLN projections at rank 2 and the rest at rank 4."""
    return save(peft_keys(factors(original_modules(), seed, {"adaln": 2})), path)


def musubi_file(path, seed=1, alpha=2.0) -> str:
    """musubi-tuner: ``lora_unet_`` + the flattened original name, main blocks' attention and MLP only, bf16."""
    f = factors(original_modules(refiner=False, adaln=False, top=False), seed)
    sd = {}
    for name, (down, up) in f.items():
        stem = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    return save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path, MUSUBI_HEADER)


DIFFSYNTH_TARGETS = ("attn.qkv_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")


def diffsynth_factors(seed=1) -> dict:
    """DiffSynth-Studio's default targets, in both block stacks; ``qkv_proj``'s up rows as the raw checkpoint
    orders its output: ``[q k v]`` of head 0, then of head 1 (DiffSynth trains that layout as it is)."""
    return factors({m: s for m, s in original_modules(adaln=False, top=False).items() if m.endswith(DIFFSYNTH_TARGETS)}, seed)


def diffsynth_file(path, seed=1) -> str:
    return save(peft_keys(diffsynth_factors(seed), infix=".default"), path)


def lightx2v_file(path, seed=1, metadata=None) -> str:
    """LightX2V's Turbo export: diffusers' names, no prefix, peft's ``.default.``, bf16, alpha in the header."""
    hidden, inner, ffn = CONFIG["hidden_size"], 2 * HEAD_DIM, CONFIG["ffn_dim"]
    shapes = {"attn.to_q": (hidden, inner), "attn.to_k": (hidden, inner), "attn.to_v": (hidden, inner),
              "attn.to_out.0": (inner, hidden), "ff.net.0.proj": (hidden, 2 * ffn), "ff.net.2": (ffn, hidden)}  # fmt: skip
    modules = {f"{stack}.{i}.{m}": s for stack in ("transformer_blocks", "token_refiner.refiner_blocks") for i in range(2)
               for m, s in shapes.items()}  # fmt: skip
    header = {"alpha": "2", "rank": str(RANK), "key_format": "minimax-h3-diffusers"} if metadata is None else metadata
    return save(peft_keys(factors(modules, seed), infix=".default", dtype=torch.bfloat16), path, header)


DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "adaln_proj.linear", "norm_out.linear",
                     "proj_in", "context_embedder"]  # fmt: skip


def diffusers_file(path, seed=1, component="transformer") -> str:
    """peft on diffusers' model, written by ``MiniMaxH3ModularPipeline.save_lora_weights`` with its config."""
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=DIFFUSERS_TARGETS, rank_pattern={"adaln_proj.linear": 2},
                        init_lora_weights=False)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = add_peft_adapter(tiny_transformer(0), config)
    MiniMaxH3ModularPipeline.save_lora_weights(
        os.path.dirname(os.fspath(path)), weight_name=os.path.basename(os.fspath(path)),
        **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": config.to_dict()},
    )  # fmt: skip
    return os.fspath(path)


LAYOUTS = {  # layout -> (writer, modules it adapts in the transformer)
    "ai-toolkit": (aitoolkit_file, 2 * 6 + 2 * 6 + 2 + 8),  # blocks: q k v out fc1 fc2 + adaln; refiner; top-level
    "reference": (bare_file, 2 * 6 + 2 * 6 + 2 + 8),
    "musubi-tuner": (musubi_file, 2 * 6),
    "DiffSynth-Studio": (diffsynth_file, 2 * 6 + 2 * 6),
    "LightX2V": (lightx2v_file, 2 * 6 + 2 * 6),
    "diffusers": (diffusers_file, 2 * 7 + 2 * 6 + 3),
}


# -- one file of each layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_producers_layout_gives_the_outputs_diffusers_gives(layout, tmp_path):
    writer, count = LAYOUTS[layout]
    path = writer(tmp_path / f"{layout}.safetensors")
    ref, mine = both()
    base, base_ref = run(ref), run(ref, "transformer_ref")
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert report.modules == {"transformer": count}
    assert_close(run(mine), run(ref), base)
    assert torch.equal(run(mine, "transformer_ref"), base_ref) and torch.equal(run(ref, "transformer_ref"), base_ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detect_family_and_inspect_name_minimax_h3(layout, tmp_path, capsys):
    path = LAYOUTS[layout][0](tmp_path / f"{layout}.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert detect_family(convert(load_file(path), metadata).deltas, metadata)[0] == "minimax-h3"
    from lora_loader.cli import main

    capsys.readouterr()
    assert main(["inspect", path]) == 0
    assert "MiniMax-H3" in capsys.readouterr().out


def test_musubi_files_without_their_header_are_no_minimax_h3_file_by_names_alone(tmp_path):
    """Its converted names are joint-block names SD3 and Flux have too: only the header tells them apart."""
    sd = load_file(musubi_file(tmp_path / "m.safetensors"))
    assert detect_family(convert(sd).deltas)[0] != "minimax-h3"
    assert detect_family(convert(sd).deltas, MUSUBI_HEADER)[0] == "minimax-h3"


def test_diffsynth_rows_are_taken_head_by_head_as_an_independent_merge_takes_them(tmp_path):
    """The fused qkv_proj of a DiffSynth file, fused into the weights, against W + up @ down cut by hand; the
    same factors without the ``.default.`` infix are the other producers' ``[q; k; v]`` rows."""
    f = diffsynth_factors()
    down, up = f["blocks.1.attn.qkv_proj"]
    heads = up.shape[0] // (3 * HEAD_DIM)
    per_head = up.reshape(heads, 3, HEAD_DIM, RANK)  # [head, q|k|v, row, rank]: the raw checkpoint's order
    for layout, path in (("diffsynth", diffsynth_file(tmp_path / "d.safetensors")), ("bare", save(peft_keys(f), tmp_path / "b.safetensors"))):
        _, mine = both()
        attn = mine.transformer.transformer_blocks[1].attn
        before = {p: getattr(attn, p).weight.detach().clone() for p in ("to_q", "to_k", "to_v")}
        mine.load_lora_weights(path, adapter_name="a")
        mine.fuse_lora()
        for part, proj in enumerate(("to_q", "to_k", "to_v")):
            rows = per_head[:, part].reshape(-1, RANK) if layout == "diffsynth" else up.chunk(3)[part]
            assert torch.allclose(getattr(attn, proj).weight, before[proj] + rows @ down, atol=1e-5), (layout, proj)


def test_lokr_on_a_fused_and_on_a_swapped_projection_matches_an_independent_merge(tmp_path):
    """ai-toolkit's LoKr (diffusers does not load it for H3): qkv_proj's rows cut into to_q/k/v, fc1's
    ``[gate; value]`` halves swapped onto SwiGLU's ``[value; gate]``, against the factors merged here."""
    g = torch.Generator().manual_seed(3)
    hidden, ffn, inner = CONFIG["hidden_size"], CONFIG["ffn_dim"], 2 * HEAD_DIM
    sd, dense = {}, {}
    for name, (fan_out, fan_in) in {"blocks.0.attn.qkv_proj": (3 * inner, hidden), "blocks.1.mlp.fc1": (2 * ffn, hidden)}.items():
        w1, w2_a, w2_b = torch.randn(4, 2, generator=g), torch.randn(fan_out // 4, 2, generator=g), torch.randn(2, fan_in // 2, generator=g)
        prefix = f"diffusion_model.{name}."
        sd |= {prefix + "lokr_w1": w1, prefix + "lokr_w2_a": w2_a, prefix + "lokr_w2_b": w2_b, prefix + "alpha": torch.tensor(1.0)}
        dense[name] = torch.kron(w1, w2_a @ w2_b) * (1.0 / 2)  # LyCORIS: alpha / rank of the low-rank half
    path = save(sd, tmp_path / "lokr.safetensors")
    expected = tiny_minimax_pipeline()
    block0, block1 = expected.transformer.transformer_blocks
    with torch.no_grad():
        for proj, rows in zip((block0.attn.to_q, block0.attn.to_k, block0.attn.to_v), dense["blocks.0.attn.qkv_proj"].chunk(3)):
            proj.weight += rows
        gate, value = dense["blocks.1.mlp.fc1"].chunk(2)
        block1.ff.net[0].proj.weight += torch.cat([value, gate])
    _, mine = both()
    base = run(mine)
    mine.load_lora_weights(path, adapter_name="lokr")
    assert_close(run(mine), run(expected), base)


# -- strength: the header's alpha, mixed ranks -------------------------------------------------------------------


def test_the_header_alpha_is_each_modules_alpha_as_diffusers_reads_it(tmp_path):
    with_alpha = lightx2v_file(tmp_path / "turbo.safetensors")
    without = lightx2v_file(tmp_path / "plain.safetensors", metadata={"key_format": "minimax-h3-diffusers"})
    ref, mine = both()
    base = run(ref)
    for pipe in (ref, mine):
        pipe.load_lora_weights(with_alpha, adapter_name="turbo")
        pipe.load_lora_weights(without, adapter_name="plain")
    outputs = {}
    for name in ("turbo", "plain"):
        ref.set_adapters(name)
        mine.set_adapters(name)
        outputs[name] = run(mine)
        assert_close(outputs[name], run(ref), base)
    assert (outputs["turbo"] - outputs["plain"]).abs().max() > MOVED  # alpha 2 on rank 4: half the strength
    assert {d.scale for d in convert(load_file(with_alpha), {"alpha": "2"}).deltas.values()} == {0.5}


def _musubi_state(alpha: float) -> dict:
    sd = {}
    for name, (down, up) in factors(original_modules(refiner=False, adaln=False, top=False), 1).items():
        stem = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    return sd


def test_the_header_alpha_yields_to_alpha_tensors_and_to_a_peft_config():
    header = MUSUBI_HEADER | {"alpha": "1"}
    with_tensors = _musubi_state(alpha=4.0)
    assert {d.scale for d in convert(with_tensors, header).deltas.values()} == {1.0}  # the tensors' 4 / rank 4
    without = {k: v for k, v in with_tensors.items() if not k.endswith(".alpha")}
    assert {d.scale for d in convert(without, header).deltas.values()} == {0.25}  # the header's 1 / rank 4
    peft_named = {f"transformer.transformer_blocks.0.adaln_proj.linear.lora_{ab}.weight": torch.ones(*shape)
                  for ab, shape in (("A", (4, 16)), ("B", (432, 4)))}  # fmt: skip
    config = {"alpha": "1", "lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 8}'}
    assert {d.scale for d in convert(peft_named, config).deltas.values()} == {2.0}  # the config's 8 / 4


def test_the_header_alpha_of_another_familys_file_changes_nothing():
    """diffusers honors the entry for MiniMax-H3 alone; a Flux (BFL names) or SD3-looking file keeps alpha = rank."""
    flux = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.ones(4, 8),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.ones(8, 4)}  # fmt: skip
    joint = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 8),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 4)}  # fmt: skip
    for sd in (flux, joint):
        assert [d.scale for d in convert(sd, {"alpha": "2"}).deltas.values()] == [1.0]


@pytest.mark.parametrize("value", ["eight", "nan", "0"])
def test_a_header_alpha_that_is_no_usable_number_is_ignored_with_a_warning(value, tmp_path):
    path = lightx2v_file(tmp_path / "t.safetensors", metadata={"alpha": value})
    with pytest.warns(lora_loader.LoraWarning, match="alpha"):
        deltas = convert(load_file(path), {"alpha": value}).deltas
    assert {d.scale for d in deltas.values()} == {1.0}
    if value == "eight":  # diffusers ignores it too (a float() it cannot parse): the same outputs
        ref, mine = both()
        base = run(ref)
        ref.load_lora_weights(path, adapter_name="a")
        with pytest.warns(lora_loader.LoraWarning):
            mine.load_lora_weights(path, adapter_name="a")
        assert_close(run(mine), run(ref), base)


def test_a_mixed_rank_alphaless_file_loads_every_module_at_scale_one_as_in_diffusers(tmp_path):
    """diffusers' own H3 test: an alpha-less file in its names with ranks 4 and 2 is at alpha = rank everywhere."""
    f = factors({f"transformer.{m}": s for m, s in {"transformer_blocks.0.attn.to_q": (24, 256), "transformer_blocks.0.adaln_proj.linear": (16, 432),
                                                    "norm_out.linear": (16, 48)}.items()}, 5, {"adaln": 2, "norm_out": 2})  # fmt: skip
    path = save(peft_keys(f), tmp_path / "mixed.safetensors")
    ref, mine = both()
    base = run(ref)
    ref.load_lora_weights(path, adapter_name="a")
    mine.load_lora_weights(path, adapter_name="a")
    assert_close(run(mine), run(ref), base)
    assert {d.scale for d in convert(load_file(path)).deltas.values()} == {1.0}


# -- the two partitions ------------------------------------------------------------------------------------------


def test_a_transformer_ref_file_loads_into_transformer_ref_only(tmp_path):
    path = diffusers_file(tmp_path / "ref.safetensors", component="transformer_ref")
    assert all(k.startswith("transformer_ref.") for k in load_file(path))
    ref, mine = both()
    base, base_ref = run(ref), run(ref, "transformer_ref")
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert list(report.modules) == ["transformer_ref"]
    assert_close(run(mine, "transformer_ref"), run(ref, "transformer_ref"), base_ref)
    assert torch.equal(run(mine), base)


@pytest.mark.parametrize("layout", ["diffusers", "musubi-tuner", "DiffSynth-Studio"])
def test_load_into_transformer_ref_puts_the_transformer_part_there_as_diffusers_does(layout, tmp_path):
    path = LAYOUTS[layout][0](tmp_path / f"{layout}.safetensors")
    ref, mine = both()
    base, base_ref = run(ref), run(ref, "transformer_ref")
    ref.load_lora_weights(path, adapter_name="a", load_into_transformer_ref=True)
    mine.load_lora_weights(path, adapter_name="a", load_into_transformer_ref=True)
    assert mine.get_list_adapters() == {"transformer_ref": ["a"]}
    assert_close(run(mine, "transformer_ref"), run(ref, "transformer_ref"), base_ref)
    assert torch.equal(run(mine), base)


def test_one_adapter_in_both_partitions_weighted_per_partition(tmp_path):
    path = aitoolkit_file(tmp_path / "a.safetensors")
    ref, mine = both()
    base, base_ref = run(ref), run(ref, "transformer_ref")
    for pipe in (ref, mine):
        pipe.load_lora_weights(path, adapter_name="a")
        pipe.load_lora_weights(path, adapter_name="a", load_into_transformer_ref=True)
        pipe.set_adapters("a", {"transformer": 1.0, "transformer_ref": 0.5})
    assert mine.get_list_adapters() == {"transformer": ["a"], "transformer_ref": ["a"]}
    assert_close(run(mine), run(ref), base)
    assert_close(run(mine, "transformer_ref"), run(ref, "transformer_ref"), base_ref)


@pytest.mark.parametrize("layout", ["diffusers", "ai-toolkit"])
def test_a_pipeline_holding_transformer_ref_alone_loads_a_transformer_file_there_as_diffusers_does(layout, tmp_path):
    """The ref2va workflow loads transformer_ref and no transformer; published LoRAs say no partition."""
    path = LAYOUTS[layout][0](tmp_path / f"{layout}.safetensors")
    ref, mine = tiny_minimax_pipeline(main=False), lora_loader.attach(tiny_minimax_pipeline(main=False))
    assert getattr(ref, "transformer", None) is None
    base = run(ref, "transformer_ref")
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert list(report.modules) == ["transformer_ref"]
    assert_close(run(mine, "transformer_ref"), run(ref, "transformer_ref"), base)


def test_load_into_transformer_ref_without_that_partition_is_refused(tmp_path):
    path = diffusers_file(tmp_path / "d.safetensors")
    ref, mine = both(ref=False)
    with pytest.raises(ValueError, match="load_into_transformer_ref"):
        ref.load_lora_weights(path, load_into_transformer_ref=True)
    with pytest.raises(LoraError, match="transformer_ref"):
        mine.load_lora_weights(path, load_into_transformer_ref=True)
    assert mine.get_list_adapters() == {}


# -- blending, switching, fusing, errors -------------------------------------------------------------------------


def test_two_adapters_blend_as_in_diffusers(tmp_path):
    a, b = diffusers_file(tmp_path / "a.safetensors", seed=1), diffsynth_file(tmp_path / "b.safetensors", seed=2)
    ref, mine = both()
    base = run(ref)
    for pipe in (ref, mine):
        pipe.load_lora_weights(a, adapter_name="a")
        pipe.load_lora_weights(b, adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(run(mine), run(ref), base)
    # attention_kwargs={"scale": s} scales the adapters for that call only, as with peft.
    assert_close(run(mine, attention_kwargs={"scale": 0.5}), run(ref, attention_kwargs={"scale": 0.5}), base)


def test_disable_fuse_unfuse_and_unload_give_back_the_base_exactly(tmp_path):
    path = bare_file(tmp_path / "a.safetensors")
    _, mine = both()
    weights = {k: v.clone() for k, v in mine.transformer.state_dict().items()}
    base = run(mine)
    mine.load_lora_weights(path, adapter_name="a")
    with_lora = run(mine)
    assert (with_lora - base).abs().max() > MOVED
    mine.disable_lora()
    assert torch.equal(run(mine), base)
    mine.enable_lora()
    mine.fuse_lora()
    assert (run(mine) - with_lora).abs().max() <= TOLERANCE
    mine.unfuse_lora()
    assert torch.equal(run(mine), with_lora)
    mine.unload_lora_weights()
    assert torch.equal(run(mine), base)
    after = mine.transformer.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())


def test_block_weights_name_module_paths_exactly(tmp_path):
    """``transformer_blocks.1`` at 0 and the token refiner at 0 equal a file holding block 0's keys alone."""
    f = factors(original_modules(), 1)
    path = save(peft_keys(f, "diffusion_model."), tmp_path / "all.safetensors")
    only_block0 = save(peft_keys({m: t for m, t in f.items() if m.startswith("blocks.0.")}, "diffusion_model."), tmp_path / "b0.safetensors")
    _, mine = both()
    _, want = both()
    base = run(want)
    want.load_lora_weights(only_block0, adapter_name="a")
    mine.load_lora_weights(path, adapter_name="a")
    top = ("proj_in", "audio_proj_in", "context_embedder", "time_embedder", "norm_out", "proj_out", "audio_proj_out")
    mine.set_adapters("a", {"transformer": {"transformer_blocks.1": 0.0, "token_refiner": 0.0, **{m: 0.0 for m in top}}})
    assert_close(run(mine), run(want), base)


def test_keys_the_model_lacks_are_an_error_naming_them_and_change_nothing(tmp_path):
    modules = original_modules() | {"blocks.7.attn.qkv_proj": (24, 768), "final_layer.extra_proj": (24, 24)}
    path = aitoolkit_file(tmp_path / "bad.safetensors", modules=modules)
    _, mine = both()
    before = {name: {k: v.clone() for k, v in getattr(mine, name).state_dict().items()} for name in ("transformer", "transformer_ref")}
    base = run(mine)
    with pytest.raises(LoraError) as err:
        mine.load_lora_weights(path, adapter_name="a")
    assert "blocks.7.attn.qkv_proj" in str(err.value) and "final_layer.extra_proj" in str(err.value)
    for name, state in before.items():
        after = getattr(mine, name).state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert mine.get_list_adapters() == {} and torch.equal(run(mine), base)
    # strict=False loads the rest, and its report lists what it skipped.
    with pytest.warns(lora_loader.LoraWarning, match="skipped"):
        report = mine.load_lora_weights(path, adapter_name="a", strict=False)
    skipped = " ".join(map(str, report.skipped))
    assert "blocks.7.attn.qkv_proj" in skipped and "final_layer.extra_proj" in skipped
    _, clean = both()
    clean.load_lora_weights(aitoolkit_file(tmp_path / "good.safetensors"), adapter_name="a")
    assert torch.equal(run(mine), run(clean))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_saved_adapter_loads_back_with_the_same_outputs(fmt, tmp_path):
    _, mine = both()
    mine.load_lora_weights(diffsynth_file(tmp_path / "d.safetensors"), adapter_name="a")
    want = run(mine)
    saved = mine.save_lora_weights(tmp_path / "out", "a", format=fmt)
    _, again = both()
    again.load_lora_weights(saved, adapter_name="a")
    assert torch.allclose(run(again), want, atol=1e-6)
