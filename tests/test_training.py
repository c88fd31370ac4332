"""Training an adapter made with `add_adapter` (API.md section 3, issue 3 scope 4).

What is specified here:
- `add_adapter` freezes the base and makes only that adapter's tensors (and
  `modules_to_save` copies) trainable, with PEFT's initialisation;
- a plain loop and HF `Trainer` lower the loss and leave every base parameter
  bitwise unchanged; dropout acts only in training mode; gradient
  checkpointing still trains the adapter;
- `save_adapter` writes PEFT's layout, which `peft.PeftModel.from_pretrained`
  loads with identical logits (the reverse oracle); `load_adapter(...,
  is_trainable=True)` resumes training; `AutoLoraModelForCausalLM` rebuilds
  base + adapter from the adapter folder alone.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lora_loader
from lora_loader import LoraConfig

PREFIX = "base_model.model."
MINE = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])

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


def batch(size: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (size, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def eval_loss(model, ids) -> float:
    was_training = model.training
    model.eval()
    loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def with_adapter(kind: str = "llama", config: dict | None = None, seed: int = 0, name: str = "mine"):
    model = lora_loader.attach(MODELS[kind](seed))
    model.add_adapter(LoraConfig(**(MINE if config is None else config)), adapter_name=name)
    model.set_adapter(name)
    return model


def base_names(kind: str = "llama") -> set[str]:
    return {n for n, _ in MODELS[kind]().named_parameters()}


def base_snapshot(model, kind: str = "llama") -> dict[str, torch.Tensor]:
    names = base_names(kind)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def adapter_params(model, kind: str = "llama") -> dict[str, torch.nn.Parameter]:
    """Every parameter the base model does not have: adapter factors and modules_to_save copies."""
    names = base_names(kind)
    return {n: p for n, p in model.named_parameters() if n not in names}


def train_steps(model, ids, steps: int = 8, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_no_peft(model) -> None:
    """lora_loader must never fall back to transformers' peft-backed methods."""
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]


# -- add_adapter: what is trainable ----------------------------------------------------------------------------


def test_add_adapter_freezes_every_base_parameter():
    model = lora_loader.attach(tiny_llama())
    assert all(p.requires_grad for p in model.parameters())  # a fresh model trains everything
    model.add_adapter(LoraConfig(**MINE), adapter_name="mine")
    names = base_names()
    frozen = {n for n, p in model.named_parameters() if n in names and not p.requires_grad}
    assert frozen == names


def test_add_adapter_makes_exactly_that_adapters_tensors_trainable():
    model = lora_loader.attach(tiny_llama())
    model.add_adapter(LoraConfig(**MINE), adapter_name="mine")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = model.get_adapter_state_dict("mine")
    assert trainable and set(trainable) == set(adapter_params(model))
    assert sum(p.numel() for p in trainable.values()) == sum(v.numel() for v in state.values())
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**MINE))
    assert sum(p.numel() for p in trainable.values()) == reference.get_nb_trainable_parameters()[0]
    assert_no_peft(model)


def test_adding_a_second_adapter_leaves_only_the_new_one_trainable():
    model = lora_loader.attach(tiny_llama())
    model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="first")
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not (trainable & first)
    second_size = sum(v.numel() for v in model.get_adapter_state_dict("second").values())
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == second_size


def test_modules_to_save_are_trainable_copies_and_the_original_stays_frozen():
    config = dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = with_adapter(config=config)
    params = dict(model.named_parameters())
    assert not params["lm_head.weight"].requires_grad
    original = dict(tiny_llama().named_parameters())["lm_head.weight"]
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    copies = [p for p in trainable.values() if p.shape == original.shape]
    assert len(copies) == 1 and torch.equal(copies[0].detach(), original.detach())
    assert copies[0].data_ptr() != params["lm_head.weight"].data_ptr()
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    assert sum(p.numel() for p in trainable.values()) == reference.get_nb_trainable_parameters()[0]


# -- add_adapter: PEFT's initialisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"target_modules": "all-linear"}],
    ids=["lora", "rslora", "dora", "all-linear"],
)
def test_right_after_add_adapter_the_logits_equal_the_base_models(extra):
    model = with_adapter(config={**MINE, **extra})
    ids = batch()
    assert (logits(model, ids) - logits(tiny_llama(), ids)).abs().max() <= 1e-6


def test_lora_B_starts_at_zero_and_lora_A_is_kaiming_uniform_within_peft_bound():
    model = with_adapter(config={**MINE, "target_modules": "all-linear"})
    state = model.get_adapter_state_dict("mine")
    downs = {k: v for k, v in state.items() if k.endswith("lora_A.weight")}
    ups = {k: v for k, v in state.items() if k.endswith("lora_B.weight")}
    assert downs and len(downs) == len(ups)
    for key, up in ups.items():
        assert torch.count_nonzero(up) == 0, key
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))  # nn.init.kaiming_uniform_(a=sqrt(5)), as peft
    for key, down in downs.items():
        fan_in = down.shape[1]
        bound = gain * math.sqrt(3.0 / fan_in)
        assert down.abs().max() <= bound + 1e-7, key
        # uniform on [-bound, bound]: the largest of >= 128 draws is close to the bound, the std is bound/sqrt(3)
        assert down.abs().max() > 0.8 * bound, key
        assert abs(down.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3), key


def test_two_adapters_added_in_a_row_get_different_random_A():
    model = lora_loader.attach(tiny_llama())
    model.add_adapter(LoraConfig(**MINE), adapter_name="one")
    model.add_adapter(LoraConfig(**MINE), adapter_name="two")
    one, two = model.get_adapter_state_dict("one"), model.get_adapter_state_dict("two")
    key = next(k for k in one if k.endswith("lora_A.weight"))
    assert not torch.equal(one[key], two[key])


def test_init_lora_weights_false_makes_the_logits_differ_from_the_base():
    model = with_adapter(config={**MINE, "init_lora_weights": False})
    state = model.get_adapter_state_dict("mine")
    assert all(torch.count_nonzero(v) > 0 for k, v in state.items() if k.endswith("lora_B.weight"))
    ids = batch()
    assert (logits(model, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-3


def test_gaussian_init_draws_A_from_a_normal_with_std_one_over_r():
    r = 4  # std 1/4 is far from the kaiming std (1/sqrt(3*fan_in) ~ 0.14 here)
    model = with_adapter(config=dict(r=r, target_modules="all-linear", init_lora_weights="gaussian"))
    state = model.get_adapter_state_dict("mine")
    downs = torch.cat([v.flatten() for k, v in state.items() if k.endswith("lora_A.weight")])
    ups = [v for k, v in state.items() if k.endswith("lora_B.weight")]
    assert all(torch.count_nonzero(u) == 0 for u in ups)
    assert downs.numel() >= 1000
    assert abs(downs.std().item() - 1 / r) < 0.1 / r
    assert abs(downs.mean().item()) < 4 * (1 / r) / math.sqrt(downs.numel())
    # not uniform: a normal has ~32% of its mass beyond one std
    assert (downs.abs() > 1 / r).float().mean().item() > 0.25


# -- training --------------------------------------------------------------------------------------------------


def test_a_plain_training_loop_lowers_the_loss_and_changes_only_adapter_tensors():
    model = with_adapter()
    ids = batch()
    before_base = base_snapshot(model)
    before_adapter = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    before_loss = eval_loss(model, ids)
    train_steps(model, ids, steps=10)
    assert eval_loss(model, ids) < before_loss - 0.05
    after = dict(model.named_parameters())
    for name, value in before_base.items():
        assert torch.equal(after[name], value), f"base parameter {name} changed"
    assert [n for n, v in before_adapter.items() if not torch.equal(after[n], v)]
    assert_no_peft(model)


def test_training_with_modules_to_save_trains_the_copy_and_disabling_gives_the_base_back():
    model = with_adapter(config=dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    ids = batch()
    before_base = base_snapshot(model)
    before_loss = eval_loss(model, ids)
    train_steps(model, ids, steps=8)
    assert eval_loss(model, ids) < before_loss - 0.05
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before_base.items())  # lm_head.weight included
    copy = next(p for n, p in adapter_params(model).items() if p.shape == before_base["lm_head.weight"].shape)
    assert not torch.equal(copy, before_base["lm_head.weight"])
    model.disable_adapters()
    assert torch.equal(logits(model, ids), logits(tiny_llama(), ids))
    model.enable_adapters()
    assert eval_loss(model, ids) < before_loss - 0.05


def test_training_changes_lora_B_away_from_zero():
    model = with_adapter()
    train_steps(model, batch(), steps=3)
    state = model.get_adapter_state_dict("mine")
    assert all(torch.count_nonzero(v) > 0 for k, v in state.items() if k.endswith("lora_B.weight"))


def test_hf_trainer_lowers_the_loss_and_leaves_the_base_unchanged(tmp_path):
    model = with_adapter()
    ids = batch(size=8)
    dataset = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    before_base = base_snapshot(model)
    before_loss = eval_loss(model, ids)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    # peft's own LoRA under these Trainer settings drops this loss by ~0.04
    assert eval_loss(model, ids) < before_loss - 0.01
    after = dict(model.named_parameters())
    for name, value in before_base.items():
        assert torch.equal(after[name], value), f"base parameter {name} changed"


def test_dropout_acts_only_in_training_mode():
    model = with_adapter(config=dict(r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = batch()
    model.train()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert (first - second).abs().max() > 1e-4  # a fresh dropout mask each call
    model.eval()
    with torch.no_grad():
        third, fourth = model(ids).logits, model(ids).logits
    assert torch.equal(third, fourth)


def test_dropout_in_eval_mode_matches_peft_and_zero_dropout_is_deterministic_in_training(tmp_path):
    config = dict(r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = with_adapter(config=config)
    model.save_adapter(str(tmp_path), adapter_name="mine")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    ids = batch()
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-6

    no_dropout = with_adapter(config={**config, "lora_dropout": 0.0})
    no_dropout.train()
    with torch.no_grad():
        assert torch.equal(no_dropout(ids).logits, no_dropout(ids).logits)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}], ids=["default", "reentrant", "non-reentrant"])
def test_gradient_checkpointing_still_trains_the_adapter(kwargs):
    model = with_adapter()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient under gradient checkpointing: {missing[:4]}"
    assert any(torch.count_nonzero(p.grad) > 0 for _, p in trainable)
    model.zero_grad()
    before = eval_loss(model, ids)
    train_steps(model, ids, steps=8)
    assert eval_loss(model, ids) < before - 0.05


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"use_reentrant": False}], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients_as_without(kwargs):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    plain, checkpointed = with_adapter(config=config), with_adapter(config=config)
    with torch.no_grad():  # the same adapter in both: copy the random factors across
        theirs = adapter_params(checkpointed)
        for name, p in adapter_params(plain).items():
            theirs[name].copy_(p)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids = batch()
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    theirs = adapter_params(checkpointed)
    for name, p in adapter_params(plain).items():
        assert p.grad is not None and theirs[name].grad is not None, name
        assert torch.allclose(p.grad, theirs[name].grad, atol=1e-6), name


# -- save_adapter: the reverse oracle --------------------------------------------------------------------------

REVERSE = {
    "lora": ("llama", MINE),
    "all-linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "rslora-patterns": (
        "llama",
        dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
             rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 24}),
    ),
    "layers_to_transform": ("llama", dict(r=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[0])),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "modules_to_save": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "embedding": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2-bias-lora_only": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
    "gpt2-bias-all": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
}


@pytest.mark.parametrize("case", list(REVERSE))
def test_a_trained_and_saved_adapter_loads_in_peft_with_identical_logits(case, tmp_path):
    kind, config = REVERSE[case]
    model = with_adapter(kind, config)
    ids = batch()
    train_steps(model, ids, steps=3)
    model.save_adapter(str(tmp_path), adapter_name="mine")
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()

    reference = peft.PeftModel.from_pretrained(MODELS[kind](), str(tmp_path)).eval()
    ours = logits(model, ids)
    assert (ours - logits(MODELS[kind](), ids)).abs().max() > 1e-4  # training moved it away from the base
    assert (ours - logits(reference, ids)).abs().max() <= 1e-6


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_trained_bias_adapter_saved_by_us_loads_back_in_us_with_identical_logits(bias, tmp_path):
    config = dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias)
    model = with_adapter("gpt2", config)
    ids = batch()
    train_steps(model, ids, steps=3)
    model.save_adapter(str(tmp_path), adapter_name="mine")
    fresh = lora_loader.attach(tiny_gpt2())
    fresh.load_adapter(str(tmp_path), adapter_name="mine")
    assert (logits(fresh, ids) - logits(model, ids)).abs().max() <= 1e-6


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_peft_trained_bias_adapter_loads_with_identical_logits(bias, tmp_path):
    torch.manual_seed(5)
    reference = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias, init_lora_weights=False)
    )
    with torch.no_grad():  # what training the biases does: move them away from the base's
        for name, p in reference.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.1)
    reference.save_pretrained(str(tmp_path))
    reference.eval()
    model = lora_loader.attach(tiny_gpt2())
    model.load_adapter(str(tmp_path), adapter_name="theirs")
    ids = batch()
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-5


def test_the_saved_file_has_peft_keys_and_the_adapter_state_dict_values(tmp_path):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], use_dora=True)
    model = with_adapter(config=config)
    train_steps(model, batch(), steps=2)
    model.save_adapter(str(tmp_path), adapter_name="mine")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    assert set(saved) == set(peft.get_peft_model_state_dict(reference, save_embedding_layers=False))
    state = model.get_adapter_state_dict("mine")
    assert {PREFIX + k for k in state} == set(saved)
    for key, value in state.items():
        assert torch.equal(value.detach().cpu(), saved[PREFIX + key]), key


def test_saving_mid_training_leaves_the_adapters_config_as_it_was(tmp_path):
    """PEFT writes inference_mode=true into the saved config, and only there: the adapter trains on."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = lora_loader.attach(tiny_llama())
    model.add_adapter(config, adapter_name="mine")
    model.save_adapter(str(tmp_path), adapter_name="mine")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    assert config.inference_mode is False


STATE_KEYS = {
    "lora": ("llama", MINE),
    "all-linear+modules_to_save": ("llama", dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"])),
    "dora": ("llama", dict(r=4, target_modules=["q_proj"], use_dora=True)),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    # peft keeps a targeted layer's own bias under "<module>.base_layer.bias"; other biases keep their names
    "gpt2-bias-lora_only": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
    "gpt2-bias-all": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
}


@pytest.mark.parametrize("case", list(STATE_KEYS))
def test_get_adapter_state_dict_keys_equal_peft_keys_without_the_prefix(case):
    kind, config = STATE_KEYS[case]
    model = with_adapter(kind, config)
    reference = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**config))
    expected = {k.removeprefix(PREFIX) for k in peft.get_peft_model_state_dict(reference, save_embedding_layers=False)}
    assert set(model.get_adapter_state_dict("mine")) == expected


def test_get_adapter_state_dict_defaults_to_the_active_adapter():
    model = with_adapter(config={**MINE, "init_lora_weights": False})
    model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="other")
    model.set_adapter("mine")
    default = model.get_adapter_state_dict()
    named = model.get_adapter_state_dict("mine")
    assert set(default) == set(named)
    assert all(torch.equal(default[k], named[k]) for k in named)


# -- load_adapter: resume or freeze ----------------------------------------------------------------------------


def test_load_adapter_is_trainable_resumes_training(tmp_path):
    ids = batch()
    model = with_adapter()
    losses = train_steps(model, ids, steps=5)
    saved_loss = eval_loss(model, ids)
    model.save_adapter(str(tmp_path), adapter_name="mine")

    fresh = lora_loader.attach(tiny_llama())
    fresh.load_adapter(str(tmp_path), adapter_name="mine", is_trainable=True)
    fresh.set_adapter("mine")
    assert (logits(fresh, ids) - logits(model, ids)).abs().max() <= 1e-6
    adapter = adapter_params(fresh)
    assert adapter and all(p.requires_grad for p in adapter.values())
    before_base = base_snapshot(fresh)
    train_steps(fresh, ids, steps=5)
    assert eval_loss(fresh, ids) < saved_loss - 0.005
    assert losses[0] > saved_loss
    after = dict(fresh.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before_base.items())


def test_load_adapter_is_trainable_freezes_the_base_as_add_adapter_does(tmp_path):
    # peft's PeftModel.from_pretrained(is_trainable=True) and transformers' load_adapter(is_trainable=True) both
    # leave exactly the adapter trainable, so a plain optimizer over the trainable parameters trains only it.
    model = with_adapter()
    model.save_adapter(str(tmp_path), adapter_name="mine")
    fresh = lora_loader.attach(tiny_llama())
    fresh.load_adapter(str(tmp_path), adapter_name="mine", is_trainable=True)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(fresh))
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert sum(p.numel() for n, p in fresh.named_parameters() if p.requires_grad) == reference.get_nb_trainable_parameters()[0]


def test_load_adapter_not_trainable_gives_frozen_adapter_params(tmp_path):
    model = with_adapter(config={**MINE, "init_lora_weights": False})
    model.save_adapter(str(tmp_path), adapter_name="mine")
    fresh = lora_loader.attach(tiny_llama())
    fresh.load_adapter(str(tmp_path), adapter_name="mine", is_trainable=False)
    adapter = adapter_params(fresh)
    assert adapter and not any(p.requires_grad for p in adapter.values())
    ids = batch()
    assert (logits(fresh, ids) - logits(model, ids)).abs().max() <= 1e-6


def test_load_adapter_defaults_to_not_trainable(tmp_path):
    model = with_adapter(config={**MINE, "init_lora_weights": False})
    model.save_adapter(str(tmp_path), adapter_name="mine")
    fresh = lora_loader.attach(tiny_llama())
    fresh.load_adapter(str(tmp_path), adapter_name="mine")
    assert not any(p.requires_grad for p in adapter_params(fresh).values())


# -- AutoLoraModelForCausalLM ----------------------------------------------------------------------------------


def test_auto_lora_model_for_causal_lm_rebuilds_base_and_adapter_from_the_adapter_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = with_adapter()
    ids = batch()
    train_steps(model, ids, steps=3)
    model.save_adapter(str(tmp_path / "adapter"), adapter_name="mine")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    raw = json.loads(config_file.read_text())
    raw["base_model_name_or_path"] = str(tmp_path / "base")
    config_file.write_text(json.dumps(raw))

    loaded = lora_loader.AutoLoraModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, LlamaForCausalLM)
    assert isinstance(loaded, lora_loader.LoraModelMixin)
    assert loaded.active_adapters()
    loaded.eval()
    assert (logits(loaded, ids) - logits(model, ids)).abs().max() <= 1e-6
    assert (logits(loaded, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-4
    assert_no_peft(loaded)
