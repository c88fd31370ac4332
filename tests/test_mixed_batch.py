"""Mixed batches: a different adapter per row (issue 3 scope 5).

``model(input_ids, adapter_names=["a", "b", "__base__"])`` applies adapter
``a`` to row 0, ``b`` to row 1 and no adapter to row 2. Each row must equal
the row computed with only that adapter active (``set_adapter``), or with
adapters disabled for ``"__base__"``; ``generate`` takes the same argument.
PEFT's own mixed-batch forward and generate are the second oracle. A mixed
call does not change the model's normal state.

The adapters are made and saved by peft (random, non-zero factors), so these
tests depend on ``load_adapter`` only, not on ``add_adapter``.
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lora_loader
from lora_loader import LoraError

TOL = 1e-5

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
    return _greedy(LlamaForCausalLM(config))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    return _greedy(GPT2LMHeadModel(config))


def _greedy(model):
    # No early stop on EOS: every row generates exactly max_new_tokens, so rows are comparable.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

# Two adapters that differ in rank, alpha, scaling and targets, so a row given the wrong one is visibly wrong.
ADAPTERS = {
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "down_proj"]),
    },
    "gpt2": {
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        "b": dict(r=2, lora_alpha=6, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True),
    },
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """{kind: {name: folder}}: peft-made adapters with random factors, saved by peft."""
    dirs = {}
    for kind, adapters in ADAPTERS.items():
        dirs[kind] = {}
        for seed, (name, config) in enumerate(adapters.items(), start=10):
            folder = tmp_path_factory.mktemp(f"{kind}-{name}")
            torch.manual_seed(seed)
            peft_model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(init_lora_weights=False, **config))
            peft_model.save_pretrained(str(folder))
            dirs[kind][name] = str(folder)
    return dirs


def ours(kind, adapter_dirs):
    model = lora_loader.attach(MODELS[kind]())
    for name, folder in adapter_dirs[kind].items():
        model.load_adapter(folder, adapter_name=name)
    return model


def theirs(kind, adapter_dirs):
    (first, first_dir), *rest = adapter_dirs[kind].items()
    model = peft.PeftModel.from_pretrained(MODELS[kind](), first_dir, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


def ids(batch: int = 4, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids, **kwargs) -> torch.Tensor:
    return model(input_ids, **kwargs).logits


@torch.no_grad()
def one_at_a_time(model, input_ids, names) -> torch.Tensor:
    """Reference: each row computed on the whole batch with only that row's adapter active (or none)."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            model.disable_adapters()
            rows.append(model(input_ids).logits[i])
            model.enable_adapters()
        else:
            model.set_adapter(name)
            rows.append(model(input_ids).logits[i])
    return torch.stack(rows)


@torch.no_grad()
def generate_one_at_a_time(model, input_ids, names, **kwargs) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            model.disable_adapters()
            rows.append(model.generate(input_ids, **kwargs)[i])
            model.enable_adapters()
        else:
            model.set_adapter(name)
            rows.append(model.generate(input_ids, **kwargs)[i])
    return torch.stack(rows)


def active(model) -> list[str]:
    return sorted(model.active_adapters())


# -- forward ---------------------------------------------------------------------------------------------------

NAME_LISTS = {
    "a-b-base-a": ["a", "b", "__base__", "a"],
    "all-base": ["__base__"] * 4,
    "all-b": ["b"] * 4,
    "base-first": ["__base__", "a", "a", "b"],
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("names", list(NAME_LISTS))
def test_each_row_of_a_mixed_batch_equals_that_row_with_only_its_adapter_active(kind, names, adapter_dirs):
    names = NAME_LISTS[names]
    model = ours(kind, adapter_dirs)
    x = ids()
    mixed = logits(model, x, adapter_names=names)
    expected = one_at_a_time(model, x, names)
    assert mixed.shape == expected.shape
    for i, name in enumerate(names):
        assert (mixed[i] - expected[i]).abs().max() <= TOL, f"row {i} ({name})"


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_rows_really_differ_between_adapters(kind, adapter_dirs):
    # Guards the test above: with these adapters, a, b and the base give visibly different rows.
    model = ours(kind, adapter_dirs)
    x = ids()
    same_row = x[:1].expand(3, -1).contiguous()
    mixed = logits(model, same_row, adapter_names=["a", "b", "__base__"])
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3
    assert (mixed[1] - mixed[2]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_base_rows_of_a_mixed_batch_equal_the_plain_base_model(kind, adapter_dirs):
    model = ours(kind, adapter_dirs)
    x = ids()
    mixed = logits(model, x, adapter_names=["__base__", "a", "__base__", "b"])
    base = logits(MODELS[kind](), x)
    assert (mixed[0] - base[0]).abs().max() <= TOL
    assert (mixed[2] - base[2]).abs().max() <= TOL


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_mixed_batch_matches_peft_mixed_batch_forward(kind, adapter_dirs):
    names = ["a", "b", "__base__", "a"]
    model, reference = ours(kind, adapter_dirs), theirs(kind, adapter_dirs)
    x = ids()
    assert (logits(model, x, adapter_names=names) - logits(reference, x, adapter_names=names)).abs().max() <= 1e-4


def test_a_mixed_batch_works_with_an_attention_mask_and_left_padding(adapter_dirs):
    names = ["a", "__base__", "b"]
    model = ours("llama", adapter_dirs)
    x = ids(batch=3)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # row 1 is left-padded
    mixed = logits(model, x, adapter_names=names, attention_mask=mask)
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            model.disable_adapters()
        else:
            model.set_adapter(name)
        rows.append(logits(model, x, attention_mask=mask)[i])
        model.enable_adapters()
    for i in range(3):
        assert (mixed[i] - rows[i]).abs().max() <= TOL, f"row {i}"


# -- generate --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_generate_with_adapter_names_equals_generating_one_adapter_at_a_time(kind, adapter_dirs):
    names = ["a", "b", "__base__", "b"]
    model = ours(kind, adapter_dirs)
    x = ids(length=5)
    with torch.no_grad():
        mixed = model.generate(x, adapter_names=names, max_new_tokens=5, do_sample=False)
    expected = generate_one_at_a_time(model, x, names, max_new_tokens=5, do_sample=False)
    assert mixed.shape == (4, 10)
    assert torch.equal(mixed, expected)


@pytest.mark.parametrize("kind", list(MODELS))
def test_generate_with_adapter_names_equals_peft_mixed_batch_generate(kind, adapter_dirs):
    names = ["__base__", "a", "b", "a"]
    model, reference = ours(kind, adapter_dirs), theirs(kind, adapter_dirs)
    x = ids(length=5, seed=3)
    with torch.no_grad():
        mixed = model.generate(x, adapter_names=names, max_new_tokens=5, do_sample=False)
        expected = reference.generate(input_ids=x, adapter_names=names, max_new_tokens=5, do_sample=False)
    assert torch.equal(mixed, expected)


def test_generated_tokens_differ_between_adapters(adapter_dirs):
    # Guards the generate tests: the adapters change which tokens greedy decoding picks.
    model = ours("llama", adapter_dirs)
    x = ids(length=5)[:1].expand(3, -1).contiguous()
    with torch.no_grad():
        out = model.generate(x, adapter_names=["a", "b", "__base__"], max_new_tokens=5, do_sample=False)
    assert not torch.equal(out[0], out[2]) and not torch.equal(out[1], out[2]) and not torch.equal(out[0], out[1])


# -- the model's own state is untouched ------------------------------------------------------------------------


def test_a_mixed_call_leaves_the_active_adapters_and_outputs_unchanged(adapter_dirs):
    model = ours("llama", adapter_dirs)
    x = ids()
    model.set_adapter("b")
    before_active, before = active(model), logits(model, x)
    logits(model, x, adapter_names=["a", "__base__", "b", "a"])
    assert active(model) == before_active
    assert torch.equal(logits(model, x), before)
    with torch.no_grad():
        model.generate(x, adapter_names=["a", "__base__", "b", "a"], max_new_tokens=3, do_sample=False)
    assert active(model) == before_active
    assert torch.equal(logits(model, x), before)


def test_a_mixed_call_leaves_a_weighted_blend_unchanged(adapter_dirs):
    model = ours("llama", adapter_dirs)
    x = ids()
    model.set_adapters(["a", "b"], weights=[0.7, 0.3])
    before = logits(model, x)
    logits(model, x, adapter_names=["a", "b", "__base__", "a"])
    assert torch.equal(logits(model, x), before)
    assert active(model) == ["a", "b"]


def test_adapter_names_none_is_the_normal_forward(adapter_dirs):
    model = ours("llama", adapter_dirs)
    x = ids()
    model.set_adapter("a")
    assert torch.equal(logits(model, x, adapter_names=None), logits(model, x))


# -- errors ----------------------------------------------------------------------------------------------------


def test_an_unknown_adapter_name_is_a_lora_error_naming_it_and_changes_nothing(adapter_dirs):
    model = ours("llama", adapter_dirs)
    x = ids()
    model.set_adapter("a")
    before = logits(model, x)
    with pytest.raises(LoraError, match="nope"):
        logits(model, x, adapter_names=["a", "nope", "__base__", "b"])
    assert active(model) == ["a"]
    assert torch.equal(logits(model, x), before)


def test_an_unknown_adapter_name_in_generate_is_a_lora_error(adapter_dirs):
    model = ours("llama", adapter_dirs)
    with pytest.raises(LoraError, match="nope"):
        model.generate(ids(), adapter_names=["a", "nope", "b", "a"], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "__base__", "a", "b"], []], ids=["short", "long", "empty"])
def test_adapter_names_of_the_wrong_length_is_a_lora_error_and_changes_nothing(names, adapter_dirs):
    model = ours("llama", adapter_dirs)
    x = ids(batch=4)
    model.set_adapter("b")
    before = logits(model, x)
    with pytest.raises(LoraError):
        logits(model, x, adapter_names=names)
    assert active(model) == ["b"]
    assert torch.equal(logits(model, x), before)


def test_the_mixed_batch_does_not_use_peft(adapter_dirs):
    model = ours("llama", adapter_dirs)
    logits(model, ids(), adapter_names=["a", "b", "__base__", "a"])
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
