"""CogVideoX and Mochi against diffusers+peft: the layouts their trainers write.

diffusers converts nothing for either family (``CogVideoXLoraLoaderMixin`` and ``Mochi1LoraLoaderMixin`` read
the diffusers/PEFT layout only), and their trainers write that layout:

- diffusers' training scripts (``train_cogvideox_lora.py``, cogvideox-factory): peft's state dict through the
  pipeline's ``save_lora_weights``, rank and alpha in ``lora_adapter_metadata``;
- finetrainers (``sft_trainer.save_model_hook``): the same keys written through ``save_function`` with its own
  header ``lora_config`` (``{"r", "lora_alpha", ...}``), so no ``lora_adapter_metadata``: diffusers loads it
  at alpha = rank (finetrainers' docs set the ``lora_alpha / r`` weight by hand), and so does lora_loader;
- finetrainers' legacy Mochi script and FastVideo: ``MochiPipeline.save_lora_weights`` without a config
  (FastVideo puts a ``lora_config.json`` of its own beside it, which diffusers does not read either);
- VideoX-Fun (CogVideoX-Fun, e.g. its reward LoRAs): Kohya keys ``lora_unet__<path>`` (the adapted root's
  empty name makes the double underscore) with ``alpha``, on every Linear; diffusers cannot read these, so
  they are checked against the factors merged into the weights here.

Tiny transformers from diffusers' model tests (``get_init_dict``), seeded random weights; the pipelines hold
the transformer alone (LoRA loading needs nothing else). Outputs must agree to 1e-4 and the LoRA must move them.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
from diffusers import (
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    MochiPipeline,
    MochiTransformer3DModel,
)
from peft import LoraConfig
from producers import add_peft_adapter
from safetensors.torch import load_file, save_file
from tiny import _randomize

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

pytestmark = [
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
    pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported"),  # Mochi's rope
]

TOLERANCE = 1e-4
MOVED = 1e-3

COGVIDEOX = {  # diffusers' tests/models/transformers/test_models_transformer_cogvideox.py
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "time_embed_dim": 2,
    "text_embed_dim": 8, "num_layers": 2, "sample_width": 8, "sample_height": 8, "sample_frames": 8, "patch_size": 2,
    "patch_size_t": None, "temporal_compression_ratio": 4, "max_text_seq_length": 8,
}  # fmt: skip
MOCHI = {  # diffusers' tests/models/transformers/test_models_transformer_mochi.py
    "patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "pooled_projection_dim": 16,
    "in_channels": 4, "out_channels": None, "qk_norm": "rms_norm", "text_embed_dim": 16, "time_embed_dim": 4,
    "activation_fn": "swiglu", "max_sequence_length": 16,
}  # fmt: skip
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the scripts' and finetrainers' default targets


def cogvideox_pipeline(seed: int = 0) -> CogVideoXPipeline:
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**COGVIDEOX)
    _randomize(transformer, seed)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer.eval(), scheduler=DDIMScheduler())


def mochi_pipeline(seed: int = 0) -> MochiPipeline:
    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(**MOCHI)
    _randomize(transformer, seed)
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer.eval())  # fmt: skip


def cogvideox_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 1, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 8, 8, generator=g),
            "timestep": torch.tensor([10, 700])}  # fmt: skip


def mochi_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 2, 16, 16, generator=g), "encoder_hidden_states": torch.randn(2, 16, 16, generator=g),
            "timestep": torch.tensor([10, 700]), "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool)}  # fmt: skip


FAMILIES = {  # family -> (pipeline factory, pipeline class, inputs, every Linear's target names for peft)
    "cogvideox": (cogvideox_pipeline, CogVideoXPipeline, cogvideox_inputs,
                  ATTENTION + ["ff.net.0.proj", "ff.net.2", "norm1.linear", "norm2.linear", "proj_out", "text_proj"]),
    "mochi": (mochi_pipeline, MochiPipeline, mochi_inputs,
              ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2", "norm1.linear",
                           "caption_proj"]),
}  # fmt: skip


def run(pipe, kind: str, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(**FAMILIES[kind][2](), **kwargs).sample


def both(kind: str):
    factory = FAMILIES[kind][0]
    return factory(), lora_loader.attach(factory())


def assert_close(got, want, base):
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE


# -- producers ---------------------------------------------------------------------------------------------------


def peft_layers(kind: str, config: LoraConfig, seed: int) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return add_peft_adapter(FAMILIES[kind][0](0).transformer, config)


def diffusers_file(kind: str, directory, seed: int = 1) -> str:
    """diffusers' training scripts: peft, then ``save_lora_weights`` with the config in the header."""
    config = LoraConfig(r=4, lora_alpha=6 + seed, target_modules=FAMILIES[kind][3], rank_pattern={"to_k": 2},
                        init_lora_weights=False)  # fmt: skip
    name = f"{kind}-{seed}.safetensors"
    FAMILIES[kind][1].save_lora_weights(os.fspath(directory), transformer_lora_layers=peft_layers(kind, config, seed),
                                        transformer_lora_adapter_metadata=config.to_dict(), weight_name=name)  # fmt: skip
    return os.path.join(os.fspath(directory), name)


def finetrainers_file(kind: str, directory, seed: int = 3) -> str:
    """finetrainers: ``save_lora_weights(..., save_function=partial(safetensors_torch_save_function, metadata=...))``."""
    config = LoraConfig(r=4, lora_alpha=64, target_modules=ATTENTION, init_lora_weights=False)
    header = {"lora_config": json.dumps({"r": 4, "lora_alpha": 64, "init_lora_weights": True, "target_modules": ATTENTION}, indent=4)}

    def safetensors_torch_save_function(weights, filename, metadata=None):
        metadata = {} if metadata is None else metadata
        metadata["format"] = "pt"
        save_file(weights, filename, metadata)

    out = os.path.join(os.fspath(directory), "finetrainers")
    FAMILIES[kind][1].save_lora_weights(out, peft_layers(kind, config, seed), safe_serialization=True,
                                        save_function=functools.partial(safetensors_torch_save_function, metadata=header))  # fmt: skip
    return os.path.join(out, "pytorch_lora_weights.safetensors")


def fastvideo_folder(directory, seed: int = 4) -> str:
    """FastVideo's Mochi LoRA checkpoint: ``save_lora_weights`` without a config, its ``lora_config.json`` beside it."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False)
    out = os.path.join(os.fspath(directory), "fastvideo")
    MochiPipeline.save_lora_weights(save_directory=out, transformer_lora_layers=peft_layers("mochi", config, seed), is_main_process=True)
    with open(os.path.join(out, "lora_config.json"), "w") as f:
        json.dump({"step": 200, "lora_params": {"lora_rank": 4, "lora_alpha": 8, "target_modules": ATTENTION}}, f)
    return out


def videox_fun_file(directory, seed: int = 5, alpha: float = 2.0) -> tuple[str, dict]:
    """VideoX-Fun's LoRANetwork on CogVideoX: every Linear, ``lora_unet__`` + the dotted path mangled, alpha, bf16.
    Returns the path and ``{module path: dense delta}`` (alpha / r * up @ down of the saved tensors)."""
    g = torch.Generator().manual_seed(seed)
    transformer = cogvideox_pipeline(0).transformer
    sd, dense = {}, {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        stem = "lora_unet_" + ("." + name).replace(".", "_")
        down = (torch.randn(2, module.in_features, generator=g) * 0.3).to(torch.bfloat16)
        up = (torch.randn(module.out_features, 2, generator=g) * 0.3).to(torch.bfloat16)
        sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        dense[name] = alpha / 2 * up.float() @ down.float()
    path = os.path.join(os.fspath(directory), "videox_fun.safetensors")
    save_file(sd, path, {"sshs_model_hash": "0" * 64})
    return path, dense


LAYOUTS = {  # (family, layout) -> writer(directory) -> path
    ("cogvideox", "diffusers"): functools.partial(diffusers_file, "cogvideox"),
    ("cogvideox", "finetrainers"): functools.partial(finetrainers_file, "cogvideox"),
    ("mochi", "diffusers"): functools.partial(diffusers_file, "mochi"),
    ("mochi", "finetrainers"): functools.partial(finetrainers_file, "mochi"),
    ("mochi", "fastvideo"): fastvideo_folder,
}


# -- loading -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, layout", LAYOUTS)
def test_each_layout_gives_the_outputs_diffusers_gives(kind, layout, tmp_path):
    path = LAYOUTS[(kind, layout)](tmp_path)
    ref, mine = both(kind)
    base = run(ref, kind)
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert list(report.modules) == ["transformer"]
    assert_close(run(mine, kind), run(ref, kind), base)


def test_finetrainers_header_config_is_not_the_strength_as_in_diffusers(tmp_path):
    """finetrainers' ``lora_config`` (alpha 64 on rank 4) is no ``lora_adapter_metadata``: scale 1, as diffusers."""
    path = finetrainers_file("cogvideox", tmp_path)
    assert {d.scale for d in convert(load_file(path), {"lora_config": "{}"}).deltas.values()} == {1.0}


def test_videox_fun_kohya_keys_match_the_factors_merged_into_the_weights(tmp_path):
    path, dense = videox_fun_file(tmp_path)
    expected = cogvideox_pipeline()
    with torch.no_grad():
        for name, delta in dense.items():
            expected.transformer.get_submodule(name).weight += delta
    mine = lora_loader.attach(cogvideox_pipeline())
    base = run(mine, "cogvideox")
    report = mine.load_lora_weights(path, adapter_name="fun")
    assert report.modules == {"transformer": len(dense)}
    assert_close(run(mine, "cogvideox"), run(expected, "cogvideox"), base)


@pytest.mark.parametrize("kind", FAMILIES)
def test_two_adapters_blend_and_scale_per_call_as_in_diffusers(kind, tmp_path):
    a, b = diffusers_file(kind, tmp_path, 1), diffusers_file(kind, tmp_path, 2)
    ref, mine = both(kind)
    base = run(ref, kind)
    for pipe in (ref, mine):
        pipe.load_lora_weights(a, adapter_name="a")
        pipe.load_lora_weights(b, adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.3])
    assert_close(run(mine, kind), run(ref, kind), base)
    assert_close(run(mine, kind, attention_kwargs={"scale": 0.5}), run(ref, kind, attention_kwargs={"scale": 0.5}), base)
    for pipe in (ref, mine):
        pipe.set_adapters("b")
    assert_close(run(mine, kind), run(ref, kind), base)


@pytest.mark.parametrize("kind", FAMILIES)
def test_disable_fuse_unfuse_and_unload_give_back_the_base_exactly(kind, tmp_path):
    path = diffusers_file(kind, tmp_path)
    _, mine = both(kind)
    weights = copy.deepcopy(mine.transformer.state_dict())
    base = run(mine, kind)
    mine.load_lora_weights(path, adapter_name="a")
    with_lora = run(mine, kind)
    assert (with_lora - base).abs().max() > MOVED
    mine.disable_lora()
    assert torch.equal(run(mine, kind), base)
    mine.enable_lora()
    mine.fuse_lora()
    assert (run(mine, kind) - with_lora).abs().max() <= TOLERANCE
    mine.unfuse_lora()
    assert torch.equal(run(mine, kind), with_lora)
    mine.unload_lora_weights()
    after = mine.transformer.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert torch.equal(run(mine, kind), base)


@pytest.mark.parametrize("kind", FAMILIES)
def test_keys_the_model_lacks_are_an_error_naming_them_and_change_nothing(kind, tmp_path):
    good = load_file(diffusers_file(kind, tmp_path))
    extra = {"transformer.transformer_blocks.9.attn1.to_q.lora_A.weight": torch.ones(4, 16),
             "transformer.transformer_blocks.9.attn1.to_q.lora_B.weight": torch.ones(16, 4)}  # fmt: skip
    path = os.fspath(tmp_path / "bad.safetensors")
    save_file(good | extra, path)
    _, mine = both(kind)
    weights = copy.deepcopy(mine.transformer.state_dict())
    base = run(mine, kind)
    with pytest.raises(LoraError, match=r"transformer_blocks\.9\.attn1\.to_q"):
        mine.load_lora_weights(path, adapter_name="a")
    after = mine.transformer.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert mine.get_list_adapters() == {} and torch.equal(run(mine, kind), base)
    with pytest.warns(lora_loader.LoraWarning):
        report = mine.load_lora_weights(path, adapter_name="a", strict=False)
    assert sorted(report.skipped) == sorted(extra)
    clean = path.replace("bad", "good")
    save_file(good, clean)  # the same file without the extra keys, and without its header: alpha = rank
    ref, _ = both(kind)
    ref.load_lora_weights(clean, adapter_name="a")
    assert_close(run(mine, kind), run(ref, kind), base)


# -- which family ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, layout", [*LAYOUTS, ("cogvideox", "videox-fun")])
def test_detect_family_and_inspect_name_the_family(kind, layout, tmp_path, capsys):
    if layout == "videox-fun":
        path = videox_fun_file(tmp_path)[0]
    else:
        path = LAYOUTS[(kind, layout)](tmp_path)
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    # Mochi's attention-only files name time_embed.pooler.to_q too (peft's "to_q" matches it): Mochi's alone.
    assert detect_family(convert(load_file(path)).deltas)[0] == kind
    from lora_loader.cli import main

    capsys.readouterr()
    assert main(["inspect", path]) == 0
    assert {"cogvideox": "CogVideoX", "mochi": "Mochi"}[kind] in capsys.readouterr().out


def _attention_only(blocks: int, attention=("attn1",)) -> dict:
    return {f"transformer.transformer_blocks.{i}.{a}.{p}.lora_{ab}.weight": torch.ones(2, 2)
            for i in range(blocks) for a in attention for p in ("to_q", "to_k", "to_v", "to_out.0") for ab in "AB"}  # fmt: skip


@pytest.mark.parametrize(
    "blocks, attention, family",
    [(30, ("attn1",), "cogvideox"), (42, ("attn1",), "cogvideox"), (48, ("attn1",), "mochi"),
     (28, ("attn1", "attn2"), None), (48, ("attn1", "attn2"), None)],
    ids=["cogvideox-2b", "cogvideox-5b", "mochi-1", "ltx-video", "ltx-video-13b"],
)  # fmt: skip
def test_attention_only_files_by_their_block_count_and_cross_attention(blocks, attention, family):
    """Attention-only on the blocks alone (a regex target such as finetrainers' ``transformer_blocks.*(to_q|...)``):
    Mochi-1 has 48 blocks, CogVideoX 30 or 42; a file with attn2 (LTX-Video, PixArt, Sana) is neither."""
    found = detect_family(convert(_attention_only(blocks, attention)).deltas)[0]
    if family is None:
        assert found not in ("cogvideox", "mochi")
    else:
        assert found == family


def test_names_of_other_families_are_not_taken_for_cogvideox_or_mochi():
    flux_joint = {f"transformer.transformer_blocks.0.{m}.lora_{ab}.weight": torch.ones(2, 2)
                  for m in ("attn.to_q", "attn.add_q_proj", "ff_context.net.0.proj", "norm1_context.linear") for ab in "AB"}  # fmt: skip
    unet = {f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_{ab}.weight": torch.ones(2, 2) for ab in "AB"}
    for sd in (flux_joint, unet):
        assert detect_family(convert(sd).deltas)[0] not in ("cogvideox", "mochi")
