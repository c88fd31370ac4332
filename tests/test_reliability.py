"""Issue 17: calls that must be transactions, numbers that must be right, errors that must be LoraErrors.

Each test is a reproduction from the issue (or its class of bug) on a tiny Llama or a tiny SD pipeline.
A refused call must raise a `LoraError` naming what is wrong and leave the host bitwise unchanged
(`fingerprint`); a call that is accepted must give the numbers the adapters' own factors give.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from fingerprint import assert_unchanged, fingerprint
from llm_tiny import input_ids, tiny_llama
from safetensors.torch import save_file
from tiny import tiny_sd_pipeline, unet_inputs

import lora_loader
from lora_loader import LoraConfig, LoraError

Q = "model.layers.0.self_attn.q_proj"  # Linear 16 -> 16
V = "model.layers.1.self_attn.v_proj"  # Linear 16 -> 8
UP = "model.layers.0.mlp.up_proj"  # Linear 16 -> 32
SHAPES = {Q: (16, 16), V: (8, 16), UP: (32, 16)}


def lm():
    return lora_loader.attach(tiny_llama(0))


def pair(path: str, rank: int = 2, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = SHAPES[path]
    return {
        f"{path}.lora_A.weight": (torch.randn(rank, in_f, generator=g) * 0.5).to(dtype),
        f"{path}.lora_B.weight": (torch.randn(out_f, rank, generator=g) * 0.5).to(dtype),
    }


def lora(*paths, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = {}
    for i, path in enumerate(paths):
        sd.update(pair(path, rank, seed * 10 + i))
    return sd


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


@torch.no_grad()
def logits(model, **kwargs):
    return model(input_ids=input_ids(), **kwargs).logits.clone()


def expect_refused(host, call, *needles):
    before = fingerprint(host)
    with pytest.raises(LoraError) as info:
        call()
    after = fingerprint(host)
    assert_unchanged(before, after)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in: {info.value}"
    return info.value


# -- transactions that were not ---------------------------------------------------------------------


def test_a_hotswap_refused_for_a_dora_layer_in_the_middle_overwrites_no_layer_before_it():
    model = lm()
    sd = lora(Q, V, UP, seed=1)
    sd[f"{V}.lora_magnitude_vector"] = torch.rand(8) + 0.5  # the middle layer is DoRA
    model.load_lora_weights(sd, adapter_name="a")
    expect_refused(model, lambda: model.load_lora_weights(lora(Q, V, UP, seed=2), adapter_name="a", hotswap=True), "DoRA")


def test_a_hotswap_bringing_dora_to_the_last_layer_changes_nothing():
    model = lm()
    model.load_lora_weights(lora(Q, UP, seed=1), adapter_name="a")
    new = {**lora(Q, UP, seed=2), f"{UP}.lora_magnitude_vector": torch.rand(32) + 0.5}
    expect_refused(model, lambda: model.load_lora_weights(new, adapter_name="a", hotswap=True), "DoRA")


@pytest.mark.parametrize("name", ["", "a.b", None, "__base__", 3])
def test_add_adapter_with_a_bad_name_leaves_requires_grad_and_everything_else_alone(name):
    model = lm()
    model.load_lora_weights(lora(Q), adapter_name="x")
    expect_refused(model, lambda: model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name), "adapter")


def test_add_adapter_that_fails_after_planning_restores_requires_grad():
    model = lm()
    model.load_lora_weights(lora(Q), adapter_name="x")
    # modules_to_save naming the adapted module itself: refused by the planner, after the targets matched
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["q_proj"])
    expect_refused(model, lambda: model.add_adapter(config, adapter_name="y"))


def test_prepare_hotswap_refused_for_one_adapter_pads_none_of_the_others():
    model = lm()
    model.load_lora_weights(lora(Q, rank=2, seed=1), adapter_name="a")
    model.load_lora_weights(lora(Q, rank=8, seed=2), adapter_name="b")
    expect_refused(model, lambda: lora_loader.prepare_hotswap(model, max_rank=4), "max_rank=4", "'b'")


@pytest.mark.parametrize("max_rank", [0, -1, 2.5, "8", True])
def test_prepare_hotswap_refuses_a_max_rank_that_is_not_a_positive_int(max_rank):
    model = lm()
    model.load_lora_weights(lora(Q, rank=2), adapter_name="a")
    expect_refused(model, lambda: lora_loader.prepare_hotswap(model, max_rank=max_rank), "max_rank")


def test_delete_adapters_with_a_repeated_name_deletes_nothing_and_raises_a_lora_error():
    model = lm()
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.load_lora_weights(lora(UP, seed=2), adapter_name="b")
    expect_refused(model, lambda: model.delete_adapters(["b", "b"]), "'b'")


@pytest.mark.parametrize("call", ["delete_adapters", "fuse_lora", "set_adapters", "set_lora_device"])
@pytest.mark.parametrize("names", [["b", "b"], ["zzz"], ["__base__"], [None], [3], "zzz", 3])
def test_every_call_taking_adapter_names_refuses_bad_lists_the_same_way(call, names):
    model = lm()
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.load_lora_weights(lora(UP, seed=2), adapter_name="b")
    if call == "fuse_lora":
        run = lambda: model.fuse_lora(adapter_names=names)  # noqa: E731
    elif call == "set_lora_device":
        run = lambda: model.set_lora_device(names, "cpu")  # noqa: E731
    else:
        run = lambda: getattr(model, call)(names)  # noqa: E731
    expect_refused(model, run)


def test_names_given_as_a_tuple_or_a_single_string_are_accepted():
    model = lm()
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.load_lora_weights(lora(UP, seed=2), adapter_name="b")
    model.set_adapters(("a", "b"), [0.5, 0.25])
    assert model.get_active_adapters() == ["a", "b"]
    model.delete_adapters("a")
    assert model.get_list_adapters() == {"model": ["b"]}


# -- wrong numbers, no error ------------------------------------------------------------------------


def test_a_file_naming_one_module_twice_in_two_spellings_is_refused():
    model = lm()
    sd = lora(Q, seed=1)
    other = pair(Q, seed=2)
    sd[f"{kohya_name(Q)}.lora_down.weight"] = other[f"{Q}.lora_A.weight"]
    sd[f"{kohya_name(Q)}.lora_up.weight"] = other[f"{Q}.lora_B.weight"]
    err = expect_refused(model, lambda: model.load_lora_weights(sd, adapter_name="a"), Q)
    assert f"{kohya_name(Q)}.lora_down.weight" in str(err) and f"{Q}.lora_A.weight" in str(err)


def test_a_pipeline_file_naming_one_module_twice_is_refused():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    sd = {
        f"unet.{path}.lora_A.weight": a, f"unet.{path}.lora_B.weight": b,
        f"lora_unet_{path.replace('.', '_')}.lora_down.weight": a, f"lora_unet_{path.replace('.', '_')}.lora_up.weight": b,
    }  # fmt: skip
    expect_refused(pipe, lambda: pipe.load_lora_weights(sd, adapter_name="a"), path)


def test_fuse_lora_with_a_repeated_name_fuses_nothing():
    model = lm()
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    expect_refused(model, lambda: model.fuse_lora(adapter_names=["a", "a"]), "'a'")


def test_a_mixed_batch_while_an_adapter_is_fused_is_refused():
    model = lm()
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.fuse_lora()
    with pytest.raises(LoraError, match="fused"):
        logits(model, adapter_names=["__base__", "a"])
    model.unfuse_lora()
    base_and_a = logits(model, adapter_names=["__base__", "a"])
    model.disable_lora()
    assert torch.equal(base_and_a[0], logits(model)[0])


def test_a_mixed_batch_while_fused_and_disabled_gives_the_base_model():
    model = lm()
    base = logits(model)
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.fuse_lora()
    model.disable_lora()
    assert torch.allclose(logits(model, adapter_names=["__base__", "a"]), base, atol=1e-6)


def test_hotswapping_a_fused_adapter_is_refused():
    model = lm()
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.fuse_lora()
    expect_refused(model, lambda: model.load_lora_weights(lora(Q, seed=2), adapter_name="a", hotswap=True), "fused", "unfuse_lora")


def _peft_folder(tmp_path, rank, alpha, seed):
    folder = tmp_path / f"peft-{rank}-{alpha}-{seed}"
    folder.mkdir()
    sd = {"base_model.model." + k: v for k, v in lora(Q, UP, rank=rank, seed=seed).items()}
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "up_proj"]})
    )
    return folder


def test_a_peft_adapter_hotswapped_to_another_rank_and_alpha_saves_what_it_computes(tmp_path):
    model = lm()
    model.load_adapter(str(_peft_folder(tmp_path, 4, 8, 1)), adapter_name="a")
    lora_loader.prepare_hotswap(model, max_rank=8)
    model.load_lora_weights(str(_peft_folder(tmp_path, 2, 7, 2)), adapter_name="a", hotswap=True)
    expected = logits(model)
    model.save_adapter(str(tmp_path / "saved"), "a")
    fresh = lm()
    fresh.load_adapter(str(tmp_path / "saved"), adapter_name="a")
    assert torch.allclose(logits(fresh), expected, atol=1e-5)


def test_a_padded_adapter_saves_at_its_own_rank(tmp_path):
    model = lm()
    model.load_adapter(str(_peft_folder(tmp_path, 4, 8, 1)), adapter_name="a")
    expected = logits(model)
    lora_loader.prepare_hotswap(model, max_rank=16)
    assert model.get_adapter_state_dict("a")[f"{Q}.lora_A.weight"].shape == (4, 16)
    model.save_adapter(str(tmp_path / "saved"), "a")
    fresh = lm()
    fresh.load_adapter(str(tmp_path / "saved"), adapter_name="a")
    assert torch.allclose(logits(fresh), expected, atol=1e-5)


def test_unload_under_a_residency_cap_forgets_the_unloaded_adapters_entirely():
    model = lm()
    model.set_max_resident_adapters(1)
    model.load_lora_weights(lora(Q, seed=1), adapter_name="a")
    model.unload_lora_weights()
    model.load_lora_weights(lora(Q, seed=2), adapter_name="b")
    with_b = logits(model)
    fresh = lm()
    fresh.load_lora_weights(lora(Q, seed=2), adapter_name="b")
    assert torch.allclose(with_b, logits(fresh), atol=1e-6)
    assert model.get_list_adapters() == {"model": ["b"]}


def test_load_unload_cycles_under_a_cap_keep_no_adapter_alive():
    import gc
    import weakref

    model = lm()
    model.set_max_resident_adapters(1)
    refs = []
    for i in range(3):
        model.load_lora_weights(lora(Q, UP, seed=i), adapter_name=f"a{i}")
        refs += [weakref.ref(m.lora_adapters[f"a{i}"]) for m in (model.get_submodule(Q), model.get_submodule(UP))]
        model.unload_lora_weights()
    gc.collect()
    assert [r for r in refs if r() is not None] == []


@pytest.mark.parametrize("where", ["down", "up", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_factor_or_an_alpha_is_refused_naming_the_key(where, value):
    model = lm()
    key = f"{kohya_name(Q)}.lora_{where}.weight" if where != "alpha" else f"{kohya_name(Q)}.alpha"
    g = torch.Generator().manual_seed(0)
    sd = {
        f"{kohya_name(Q)}.lora_down.weight": torch.randn(2, 16, generator=g),
        f"{kohya_name(Q)}.lora_up.weight": torch.randn(16, 2, generator=g),
        f"{kohya_name(Q)}.alpha": torch.tensor(1.0),
    }
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    expect_refused(model, lambda: model.load_lora_weights(sd, adapter_name="a"), key, "NaN")


def test_nan_in_a_peft_config_alpha_is_refused():
    model = lm()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": float("nan"), "target_modules": ["q_proj"]}
    sd = {"base_model.model." + k: v for k, v in lora(Q).items()}
    expect_refused(model, lambda: model.load_adapter(adapter_state_dict=sd, peft_config=config), "lora_alpha")


@pytest.mark.parametrize("shape", [[3], [2, 2], [0], [1, 0]])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_an_alpha_that_is_not_one_number_is_refused_naming_the_key(shape, layout):
    model = lm()
    sd = lora(Q)
    if layout == "kohya":
        sd = {f"{kohya_name(Q)}.lora_down.weight": sd[f"{Q}.lora_A.weight"], f"{kohya_name(Q)}.lora_up.weight": sd[f"{Q}.lora_B.weight"]}
        key = f"{kohya_name(Q)}.alpha"
    else:
        key = f"{Q}.alpha"
    sd[key] = torch.ones(shape)
    expect_refused(model, lambda: model.load_lora_weights(sd, adapter_name="a"), key, "one number")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_integer_bool_and_complex_factors_are_refused_naming_the_key(dtype):
    model = lm()
    sd = lora(Q)
    key = f"{Q}.lora_B.weight"
    sd[key] = sd[key].to(dtype)
    expect_refused(model, lambda: model.load_lora_weights(sd, adapter_name="a"), key, "floating")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16])
def test_low_precision_float_factors_load_and_compute_their_values(dtype):
    model = lm()
    sd = pair(Q, dtype=dtype)
    model.load_lora_weights(sd, adapter_name="a")
    got = logits(model)
    fresh = lm()
    fresh.load_lora_weights({k: v.float() for k, v in sd.items()}, adapter_name="a")
    assert torch.allclose(got, logits(fresh), atol=1e-5)


# -- errors that were not LoraErrors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "down, up",
    [
        (torch.tensor(1.0), torch.tensor(1.0)),
        (torch.zeros(0, 16), torch.zeros(16, 0)),
        (torch.ones(2, 16), torch.tensor(1.0)),
        (torch.ones(0), torch.ones(16, 2)),
    ],
    ids=["0-d", "rank-0", "0-d-up", "empty-down"],
)
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_factors_without_a_rank_are_refused_naming_the_key(down, up, layout):
    model = lm()
    if layout == "kohya":
        sd = {f"{kohya_name(Q)}.lora_down.weight": down, f"{kohya_name(Q)}.lora_up.weight": up}
    else:
        sd = {f"{Q}.lora_A.weight": down, f"{Q}.lora_B.weight": up}
    err = expect_refused(model, lambda: model.load_lora_weights(sd, adapter_name="a"), Q.split(".")[-1])
    assert "ZeroDivision" not in str(err) and "IndexError" not in str(err)


@pytest.mark.parametrize("name", ["__base__", "", "a.b"])
def test_reserved_or_malformed_names_are_refused_by_every_call_that_creates_an_adapter(name):
    model = lm()
    expect_refused(model, lambda: model.load_lora_weights(lora(Q), adapter_name=name), repr(name))
    expect_refused(model, lambda: model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name), repr(name))
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    expect_refused(pipe, lambda: pipe.load_lora_weights(lora(Q), adapter_name=name), repr(name))


def test_allow_pickle_false_refuses_a_bin_file(tmp_path):
    model = lm()
    torch.save(lora(Q), tmp_path / "adapter.bin")
    expect_refused(model, lambda: model.load_lora_weights(str(tmp_path / "adapter.bin"), allow_pickle=False), "allow_pickle", "adapter.bin")
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save(lora(Q), folder / "pytorch_lora_weights.bin")
    expect_refused(model, lambda: model.load_lora_weights(str(folder), allow_pickle=False), "allow_pickle")
    model.load_lora_weights(str(folder), adapter_name="ok")  # the default still reads weights-only .bin files


def test_saving_under_a_path_whose_parent_is_a_file_raises_a_lora_error_naming_it(tmp_path):
    model = lm()
    model.load_lora_weights(lora(Q), adapter_name="a")
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    for call in (
        lambda: model.save_lora_weights(str(target), adapter_name="a"),
        lambda: model.save_lora_weights(str(target / "x.safetensors"), adapter_name="a"),
        lambda: model.save_adapter(str(target), "a"),
        lambda: model.save_lora_weights(str(target), adapter_name="a", format="kohya"),
    ):
        with pytest.raises(LoraError, match="afile"):
            call()


def _write_peft(folder, config_bytes: bytes):
    os.makedirs(folder, exist_ok=True)
    sd = {"base_model.model." + k: v for k, v in lora(Q).items()}
    save_file(sd, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "wb") as f:
        f.write(config_bytes)
    return folder


GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
BAD_CONFIGS = {
    "not-utf8": b"\xff\xfe{\x00",
    "json-list": b"[1, 2]",
    "json-string": b'"LORA"',
    "r-not-a-number": json.dumps({**GOOD, "r": "abc"}).encode(),
    "r-bool": json.dumps({**GOOD, "r": True}).encode(),
    "alpha-not-a-number": json.dumps({**GOOD, "lora_alpha": "abc"}).encode(),
    "bad-regex-in-alpha-pattern": json.dumps({**GOOD, "alpha_pattern": {"q_proj(": 2}}).encode(),
    "bad-regex-in-rank-pattern": json.dumps({**GOOD, "rank_pattern": {"[": 2}}).encode(),
    "rank-pattern-a-list": json.dumps({**GOOD, "rank_pattern": [1]}).encode(),
    "alpha-pattern-a-string": json.dumps({**GOOD, "alpha_pattern": "x"}).encode(),
    "alpha-pattern-value-a-string": json.dumps({**GOOD, "alpha_pattern": {"q_proj": "x"}}).encode(),
    "target-modules-an-int": json.dumps({**GOOD, "target_modules": 5}).encode(),
    "target-modules-list-of-ints": json.dumps({**GOOD, "target_modules": [5]}).encode(),
    "use-rslora-a-string": json.dumps({**GOOD, "use_rslora": "yes"}).encode(),
    "dropout-a-string": json.dumps({**GOOD, "lora_dropout": "x"}).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_adapter_config_is_a_lora_error_naming_the_file(case, tmp_path):
    model = lm()
    folder = _write_peft(str(tmp_path / case), BAD_CONFIGS[case])
    expect_refused(model, lambda: model.load_adapter(folder, adapter_name="a"), "adapter_config.json")
    with pytest.raises(LoraError, match="adapter_config.json"):
        LoraConfig.from_pretrained(folder)


@pytest.mark.parametrize(
    "metadata",
    [
        "[1, 2]",
        '"x"',
        json.dumps({"r": 2, "lora_alpha": "abc"}),
        json.dumps({"r": 2, "lora_alpha": 4, "alpha_pattern": {"q_proj(": 1}}),
        json.dumps({"r": 2, "lora_alpha": 4, "rank_pattern": [1]}),
    ],
)
def test_a_bad_lora_adapter_metadata_header_is_a_lora_error_naming_the_file(metadata, tmp_path):
    model = lm()
    path = str(tmp_path / "x.safetensors")
    save_file(lora(Q), path, metadata={"lora_adapter_metadata": metadata})
    expect_refused(model, lambda: model.load_lora_weights(path, adapter_name="a"), "x.safetensors", "lora_adapter_metadata")


@pytest.mark.parametrize("field, value", [("r", "abc"), ("lora_alpha", "abc"), ("target_modules", 5), ("rank_pattern", [1])])
def test_add_adapter_refuses_a_config_with_a_field_of_the_wrong_type(field, value):
    model = lm()
    expect_refused(model, lambda: model.add_adapter({"target_modules": ["q_proj"], field: value}, adapter_name="a"), field)


def test_pipeline_and_model_refuse_a_hotswap_of_a_fused_adapter_alike():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    sd = {f"unet.{path}.lora_A.weight": torch.randn(2, 8, generator=g), f"unet.{path}.lora_B.weight": torch.randn(8, 2, generator=g)}
    pipe.load_lora_weights(sd, adapter_name="a")
    pipe.fuse_lora()
    expect_refused(pipe, lambda: pipe.load_lora_weights({k: v * 2 for k, v in sd.items()}, adapter_name="a", hotswap=True), "fused")
    pipe.unfuse_lora()
    with torch.no_grad():
        pipe.unet(**unet_inputs(pipe))


# -- found by the state machine ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_a_model_saved_as_one_file_in_each_layout_reloads_to_the_same_outputs(fmt, tmp_path):
    """save_lora_weights(format='peft') on a model dropped the leading 'model.' of every module path."""
    model = lm()
    model.load_lora_weights(lora(Q, UP, seed=3), adapter_name="a")
    expected = logits(model)
    path = model.save_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a", format=fmt)
    fresh = lm()
    fresh.load_lora_weights(path, adapter_name="a")
    assert torch.allclose(logits(fresh), expected, atol=1e-6)
