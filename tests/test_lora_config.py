"""`lora_loader.LoraConfig` and what `add_adapter` builds from it (API.md section 3, issue 3 scope 2).

PEFT is the oracle: the same config given to ``peft.get_peft_model`` on an
identical tiny model must target the same modules with the same shapes, count
the same trainable parameters, and read back the ``adapter_config.json`` that
``save_adapter`` writes with the same field values. A field that changes the
math and is not implemented is a ``LoraError`` and leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lora_loader
from lora_loader import LoraConfig, LoraError

PREFIX = "base_model.model."

# -- tiny models (seeded; the same seed gives bit-identical weights) -------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def input_ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


def ours(kind: str, seed: int = 0, **config):
    """An attached tiny model with one adapter "mine" added from ``config``."""
    model = lora_loader.attach(MODELS[kind](seed))
    model.add_adapter(LoraConfig(**config), adapter_name="mine")
    return model


def theirs(kind: str, seed: int = 0, **config):
    """The same tiny model with the same config through peft."""
    return peft.get_peft_model(MODELS[kind](seed), peft.LoraConfig(**config))


def our_shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.get_adapter_state_dict("mine").items()}


def peft_shapes(peft_model) -> dict[str, tuple]:
    # save_embedding_layers=False: peft would otherwise add a full copy of a targeted embedding's base weight
    # ("auto", for resized vocabularies); that copy is not part of the adapter.
    sd = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k.removeprefix(PREFIX): tuple(v.shape) for k, v in sd.items()}


def lora_targets(keys) -> set[str]:
    return {k.split(".lora_")[0] for k in keys if ".lora_A." in k or ".lora_embedding_A" in k}


def snapshot(model) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "active": _active(model),
    }


def _active(model) -> list:
    try:
        return list(model.active_adapters())
    except LoraError:  # no adapter at all
        return []


def assert_same_snapshot(model, before) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name
    assert after["active"] == before["active"]


def assert_no_peft(model) -> None:
    """lora_loader must never fall back to transformers' peft-backed methods."""
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]


# -- fields and defaults ---------------------------------------------------------------------------------------

PEFT_FIELDS = [
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "layers_to_transform",
    "modules_to_save",
    "fan_in_fan_out",
]


@pytest.mark.parametrize("field", PEFT_FIELDS)
def test_lora_config_field_default_equals_peft_default(field):
    assert getattr(LoraConfig(), field) == getattr(peft.LoraConfig(), field)


def test_lora_config_takes_peft_keyword_arguments_and_keeps_them():
    values = dict(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        bias="lora_only",
        use_rslora=True,
        use_dora=True,
        init_lora_weights="gaussian",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        task_type="CAUSAL_LM",
        layers_to_transform=[1],
        modules_to_save=["lm_head"],
        fan_in_fan_out=False,
    )
    config = LoraConfig(**values)
    for field, value in values.items():
        got = getattr(config, field)
        if field == "target_modules":  # peft itself turns the list into a set
            assert set(got) == set(value)
        else:
            assert got == value, field


def _plain_peft_defaults() -> dict:
    """Every field of the installed peft's LoraConfig whose default is plain JSON data."""
    defaults = {}
    for f in dataclasses.fields(peft.LoraConfig):
        value = getattr(peft.LoraConfig(), f.name)
        if isinstance(value, (type(None), bool, int, float, str, list, dict)):
            defaults[f.name] = str(value) if f.name == "peft_type" else value
    return defaults


def test_lora_config_accepts_every_peft_field_at_its_default_so_peft_code_ports_unchanged():
    # Code written for peft passes fields lora_loader does not implement, at their harmless defaults
    # (use_qalora=False, lora_bias=False, ...). Those must construct, not raise.
    defaults = _plain_peft_defaults()
    for bookkeeping in ("auto_mapping", "peft_version"):  # written by peft's save, never passed by users
        defaults.pop(bookkeeping)
    assert {"use_qalora", "lora_bias", "layer_replication", "exclude_modules"} <= set(defaults)
    config = LoraConfig(**defaults)
    for name in ("r", "lora_alpha", "use_qalora", "lora_bias", "layer_replication"):
        assert getattr(config, name) == defaults[name], name


# -- targeting: the same modules and shapes as peft ------------------------------------------------------------

TARGETING = {
    "suffix-list": ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "dotted-suffix": ("llama", dict(r=4, target_modules=["self_attn.q_proj", "mlp.down_proj"])),
    # a suffix matches whole name components only: "attn.q_proj" is not a suffix of "...self_attn.q_proj"
    "component-boundary": ("llama", dict(r=4, target_modules=["attn.q_proj", "v_proj"])),
    "regex": ("llama", dict(r=4, target_modules=r".*\.layers\.1\.self_attn\.(k|o)_proj")),
    "regex-mlp": ("llama", dict(r=4, target_modules=r"model\.layers\.\d+\.mlp\.(gate|up)_proj")),
    "all-linear-llama": ("llama", dict(r=4, target_modules="all-linear")),
    "all-linear-gpt2": ("gpt2", dict(r=4, target_modules="all-linear")),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
    "layers_to_transform": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "rank_pattern": ("llama", dict(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})),
    "rank_pattern-full-name": (
        "llama",
        dict(r=8, target_modules=["q_proj"], rank_pattern={"model.layers.0.self_attn.q_proj": 3}),
    ),
    "modules_to_save": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    # PEFT matches modules_to_save by plain suffix: "norm" is model.norm and every *_layernorm too.
    "modules_to_save-suffix": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["norm"])),
    "embedding": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "dora": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(TARGETING))
def test_add_adapter_targets_the_same_modules_with_the_same_shapes_as_peft(case):
    kind, config = TARGETING[case]
    model = ours(kind, **config)
    expected = peft_shapes(theirs(kind, **config))
    assert lora_targets(our_shapes(model)) == lora_targets(expected)
    assert our_shapes(model) == expected
    assert_no_peft(model)


def test_all_linear_targets_every_linear_layer_but_not_lm_head():
    model = ours("llama", target_modules="all-linear")
    targets = lora_targets(our_shapes(model))
    linears = {n for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    assert targets == linears - {"lm_head"}


def test_regex_target_is_matched_against_the_full_module_name():
    # A regex string is a full match (re.fullmatch) on the module name, as peft does: "q_proj" alone as a regex
    # matches nothing, since no module is named exactly "q_proj".
    with pytest.raises(ValueError):
        theirs("llama", target_modules="q_proj")
    with pytest.raises(LoraError):
        ours("llama", target_modules="q_proj")


def test_a_partial_name_is_not_a_suffix_match():
    with pytest.raises(ValueError):
        theirs("llama", target_modules=["proj"])
    with pytest.raises(LoraError):
        ours("llama", target_modules=["proj"])


def test_target_modules_that_match_nothing_is_a_lora_error_and_changes_nothing():
    model = lora_loader.attach(tiny_llama())
    before = snapshot(model)
    with pytest.raises(LoraError, match="no_such_proj"):
        model.add_adapter(LoraConfig(target_modules=["no_such_proj"]), adapter_name="mine")
    assert_same_snapshot(model, before)


# -- print_trainable_parameters --------------------------------------------------------------------------------

PRINTING = {
    "plain": ("llama", dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])),
    "all-linear-gpt2": ("gpt2", dict(r=4, target_modules="all-linear")),
    "rank_pattern": ("llama", dict(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})),
    "dora": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(PRINTING))
def test_print_trainable_parameters_prints_what_peft_prints(case, capsys):
    kind, config = PRINTING[case]
    model = ours(kind, **config)
    model.set_adapter("mine")
    capsys.readouterr()
    model.print_trainable_parameters()
    our_line = capsys.readouterr().out.strip()
    theirs(kind, **config).print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    assert our_line == peft_line


@pytest.mark.parametrize(
    "case",
    [
        ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
        ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["norm"])),
        ("gpt2", dict(r=4, target_modules=["c_attn"], bias="lora_only")),
        ("gpt2", dict(r=4, target_modules=["c_attn"], bias="all")),
    ],
    ids=["modules_to_save", "modules_to_save-suffix", "bias-lora_only", "bias-all"],
)
def test_print_trainable_parameters_counts_the_same_trainable_params_as_peft(case, capsys):
    # N (trainable) must equal peft's. M (all) counts the base plus what the adapter adds, as peft's does.
    kind, config = case
    model = ours(kind, **config)
    model.set_adapter("mine")
    capsys.readouterr()
    model.print_trainable_parameters()
    our_line = capsys.readouterr().out.strip()
    peft_model = theirs(kind, **config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert our_line.startswith(f"trainable params: {trainable:,d} || all params: ")
    ours_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ours_trainable == trainable
    total = sum(p.numel() for p in model.parameters())
    assert our_line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# -- adapter_config.json: written, read back, round-tripped ----------------------------------------------------

WRITTEN = dict(
    r=4,
    lora_alpha=12,
    target_modules=["q_proj", "v_proj"],
    lora_dropout=0.05,
    use_rslora=True,
    rank_pattern={"q_proj": 2},
    alpha_pattern={"v_proj": 3},
    layers_to_transform=[0, 1],
    modules_to_save=["lm_head"],
    task_type="CAUSAL_LM",
)


def test_save_adapter_writes_a_config_peft_reads_back_with_the_same_fields(tmp_path):
    model = ours("llama", **WRITTEN)
    model.save_adapter(str(tmp_path), adapter_name="mine")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA"
    read = peft.LoraConfig.from_pretrained(str(tmp_path))
    for field, value in WRITTEN.items():
        got = getattr(read, field)
        if field == "target_modules":
            assert set(got) == set(value)
        elif field == "modules_to_save":
            assert list(got) == value
        else:
            assert got == value, field


def test_save_adapter_records_the_base_model_name_or_path(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = lora_loader.attach(LlamaForCausalLM.from_pretrained(tmp_path / "base"))
    model.add_adapter(LoraConfig(target_modules=["q_proj"]), adapter_name="mine")
    model.save_adapter(str(tmp_path / "adapter"), adapter_name="mine")
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(tmp_path / "base")


def peft_adapter_dir(path, **config) -> str:
    """A peft-made adapter with random (non-zero) factors, saved by peft."""
    torch.manual_seed(123)
    config = {"init_lora_weights": False, **config}
    theirs("llama", **config).save_pretrained(str(path))
    return str(path)


def edit_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def test_config_fields_lora_loader_does_not_use_survive_load_then_save(tmp_path):
    src = tmp_path / "src"
    peft_adapter_dir(src, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    unknown = {
        "some_future_peft_field": {"nested": [1, 2, 3], "flag": True},
        "revision": "v1.2",
        "megatron_core": "my.megatron",
    }
    edit_config(src, **unknown)
    original = json.loads((src / "adapter_config.json").read_text())

    model = lora_loader.attach(tiny_llama())
    model.load_adapter(str(src), adapter_name="x")
    model.save_adapter(str(tmp_path / "out"), adapter_name="x")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())

    for key, value in unknown.items():
        assert written.get(key) == value, key
    assert set(original) <= set(written), f"dropped: {sorted(set(original) - set(written))}"
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_dropout", "bias"):
        assert written[field] == original[field], field


def test_an_adapter_with_non_default_harmless_fields_loads_and_matches_peft(tmp_path):
    src = tmp_path / "src"
    peft_adapter_dir(src, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    edit_config(src, inference_mode=False, revision="abc", some_future_peft_field=7)
    model = lora_loader.attach(tiny_llama())
    model.load_adapter(str(src), adapter_name="x")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(src))
    ids = input_ids()
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-5
    assert (logits(model, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-4


# -- fields that change the math and are not implemented: LoraError, nothing changed -----------------------------

UNSUPPORTED_IN_FILE = {
    "use_qalora": dict(use_qalora=True),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 2]]),
    "peft_type-IA3": dict(peft_type="IA3"),
    "peft_type-LOHA": dict(peft_type="LOHA"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_IN_FILE))
def test_loading_an_adapter_whose_config_needs_unimplemented_math_is_a_lora_error_and_changes_nothing(case, tmp_path):
    src = tmp_path / "src"
    peft_adapter_dir(src, r=4, target_modules=["q_proj", "v_proj"])
    edit_config(src, **UNSUPPORTED_IN_FILE[case])
    model = lora_loader.attach(tiny_llama())
    ids = input_ids()
    before_logits = logits(model, ids)
    before = snapshot(model)
    with pytest.raises(LoraError):
        model.load_adapter(str(src), adapter_name="x")
    assert_same_snapshot(model, before)
    assert torch.equal(logits(model, ids), before_logits)


def test_an_adapter_with_lora_bias_loads_and_matches_peft_and_fusing_it_into_a_biasless_layer_is_refused(tmp_path):
    """PEFT's lora_bias=True (lora_B.bias, as Flux Control LoRAs carry it) is part of the LoRA's output; Llama's
    q_proj has no bias, so the adapter runs unfused there and fuse_lora says why it cannot fuse it."""
    torch.manual_seed(123)
    reference = theirs("llama", r=4, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                param.normal_(0, 0.5)
    reference.save_pretrained(str(tmp_path / "src"))
    model = lora_loader.attach(tiny_llama())
    ids = input_ids()
    base = logits(model, ids)
    model.load_adapter(str(tmp_path / "src"), adapter_name="x")
    got = logits(model, ids)
    assert (got - logits(reference, ids)).abs().max() <= 1e-5
    assert (got - base).abs().max() > 1e-3
    with pytest.raises(LoraError, match=r"q_proj: it has no bias for the adapter's lora_B.bias"):
        model.fuse_lora()
    assert torch.equal(logits(model, ids), got)


def test_the_error_for_an_unimplemented_field_names_the_field(tmp_path):
    src = tmp_path / "src"
    peft_adapter_dir(src, r=4, target_modules=["q_proj"])
    edit_config(src, use_qalora=True)
    model = lora_loader.attach(tiny_llama())
    with pytest.raises(LoraError, match="use_qalora"):
        model.load_adapter(str(src), adapter_name="x")


UNSUPPORTED_IN_CONFIG = {
    "use_qalora": dict(use_qalora=True),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 2]]),
    "trainable_token_indices": dict(trainable_token_indices=[1, 2]),  # (lora_bias=True is implemented: issue 21)
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_IN_CONFIG))
def test_add_adapter_with_an_unimplemented_math_field_is_a_lora_error_and_changes_nothing(case):
    model = lora_loader.attach(tiny_llama())
    before = snapshot(model)
    with pytest.raises(LoraError):
        model.add_adapter(LoraConfig(r=4, target_modules=["q_proj"], **UNSUPPORTED_IN_CONFIG[case]), adapter_name="mine")
    assert_same_snapshot(model, before)
