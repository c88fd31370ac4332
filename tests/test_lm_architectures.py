"""The LMs of 2026 against peft (issue 21, items 1 and 2).

Architectures (`llm_archs`): Qwen3, Qwen3-MoE, Gemma 3 (text), Mistral, Mixtral, Phi-3 (fused ``qkv_proj``
and ``gate_up_proj``), gpt-oss, and RoBERTa token classification with ``modules_to_save=["classifier"]``.
transformers 5 keeps the experts of Qwen3-MoE, Mixtral and gpt-oss as stacked ``nn.Parameter`` s; their
adapters reach them with PEFT's ``target_parameters`` (LoRA on a parameter, PEFT 0.21's ``ParamWrapper``).

For each architecture, two adapters made by peft on that model (random factors, saved by peft) are
loaded into ``lora_loader.attach(model)`` and into ``peft.PeftModel``; every check compares logits with
peft's (<= 1e-4 in fp32) and asserts the adapter moved them (> 1e-3), so a no-op fails:

- each adapter alone; a [0.7, 0.3] blend against peft with both active, each layer's scaling times its
  weight (``set_scale``, what diffusers' ``set_adapters`` does with peft);
- a mixed batch (``adapter_names=["a", "b", "__base__"]``, forward and greedy ``generate``): each row equals
  that adapter alone (peft's own mixed forward too, where peft has one: not for parameters);
- disable exact (``torch.equal`` to the base model), fuse then unfuse (fused ~ unfused, unfused
  bit-identical weights), ``save_adapter`` read by ``peft.PeftModel.from_pretrained`` (same keys, same
  tensors, same logits), and a few AdamW steps from the same init in both, ending at peft's logits.

Then item 2: ``target_parameters`` resolved as peft nests its keys (registration order, whatever the
config's order), on 3-D expert stacks and on a 2-D Linear weight, created by ``add_adapter``, trained,
saved and fused; ``lora_bias`` created, trained, saved and fused; the PEFT fields that change the math and
are not implemented stay a ``LoraError`` naming the field, and leave the model as it was.
"""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

import lora_loader
import transformers as T
from llm_archs import ARCHS, EXPERT_PARAMS, EXPERTS, causal, input_ids, peft_adapter, peft_model, v4_moe_adapter
from lora_loader import LoraConfig, LoraError

TOL = 1e-4
MOVED = 1e-3
NAMES = ("a", "b")
WEIGHTS = {"a": 0.7, "b": 0.3}
MIXED = ["a", "b", "__base__"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``{arch: {adapter name: folder}}``: peft's adapters, saved by peft."""
    out = {}
    for arch, spec in ARCHS.items():
        out[arch] = {
            name: peft_adapter(spec.build(), spec.adapters[name], tmp_path_factory.mktemp(f"{arch}-{name}"), seed=seed)
            for seed, name in enumerate(NAMES)
        }
    return out


@pytest.fixture(scope="module")
def base_logits() -> dict[str, torch.Tensor]:
    return {arch: logits(spec.build(), input_ids()) for arch, spec in ARCHS.items()}


def ours(arch: str, folders, **kwargs):
    model = lora_loader.attach(ARCHS[arch].build())
    for name in NAMES:
        model.load_adapter(folders[arch][name], adapter_name=name, **kwargs)
    return model


def theirs(arch: str, folders, **kwargs) -> peft.PeftModel:
    return peft_model(ARCHS[arch].build, {name: folders[arch][name] for name in NAMES}, **kwargs)


@torch.no_grad()
def logits(model, ids, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits.detach().clone()


def assert_close_and_moved(got, want, base, what: str) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{what}: lora_loader's logits differ from peft's by {diff:.3g}"
    moved = (want - base).abs().max().item()
    assert moved > MOVED, f"{what}: the adapter moves the logits by only {moved:.3g}; the check proves nothing"


def peft_blend(model: peft.PeftModel, weights: dict[str, float]) -> peft.PeftModel:
    """Every peft LoRA layer with all of ``weights``' adapters active, each one's scaling times its weight.

    A ``modules_to_save`` copy runs one adapter at a time in peft (it refuses two): the first one's, the rule
    lora_loader documents for copies (`adapters.AdapterRegistry._push_copies`)."""
    names = list(weights)
    for module in model.modules():
        if isinstance(module, PeftLoraLayer):
            module.set_adapter([n for n in names if n in module.lora_A])
            for name, weight in weights.items():
                if name in module.lora_A:
                    module.set_scale(name, weight)
        elif isinstance(module, ModulesToSaveWrapper):
            module.set_adapter(names[0])
    return model


def peft_rows(model: peft.PeftModel, ids, names) -> torch.Tensor:
    """Each row with only its adapter active in peft (``__base__``: adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(logits(model, ids)[i])
        else:
            model.set_adapter(name)
            rows.append(logits(model, ids)[i])
    return torch.stack(rows)


def labels_for(arch: str, ids: torch.Tensor) -> torch.Tensor:
    if ARCHS[arch].causal:
        return ids
    return torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(7))


def train(model, arch: str, ids, steps: int = 3) -> None:
    """A plain loop: AdamW on the trainable tensors, the model's own loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    labels = labels_for(arch, ids)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(before)
    changed = [k for k, v in before.items() if not torch.equal(now[k], v)]
    assert not changed, f"base tensors changed: {changed[:5]}"


# -- every architecture against peft ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_adapter_alone_gives_peft_logits(arch, folders, base_logits):
    model, oracle, ids = ours(arch, folders), theirs(arch, folders), input_ids()
    for name in NAMES:
        model.set_adapter(name)
        oracle.set_adapter(name)
        assert_close_and_moved(logits(model, ids), logits(oracle, ids), base_logits[arch], f"{arch} adapter {name}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_blend_equals_peft_with_both_active_and_each_scaled(arch, folders, base_logits):
    model, oracle, ids = ours(arch, folders), theirs(arch, folders), input_ids()
    model.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
    blended = logits(model, ids)
    assert_close_and_moved(blended, logits(peft_blend(oracle, WEIGHTS), ids), base_logits[arch], f"{arch} blend")
    model.set_adapter("a")  # the blend is not adapter a alone
    assert (blended - logits(model, ids)).abs().max() > MOVED


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_mixed_batch_gives_each_row_its_own_adapter(arch, folders, base_logits):
    model, oracle, ids = ours(arch, folders), theirs(arch, folders), input_ids()
    mixed = logits(model, ids, adapter_names=MIXED)
    want = peft_rows(oracle, ids, MIXED)
    for row, name in enumerate(MIXED):
        diff = (mixed[row] - want[row]).abs().max().item()
        assert diff <= TOL, f"{arch}: row {row} ({name}) differs from peft with {name} alone by {diff:.3g}"
    # "__base__" runs no adapter at all (not bit-equal with experts: which tokens share an expert's matmul differs)
    assert (mixed[2] - base_logits[arch][2]).abs().max() <= 1e-5
    assert (mixed[0] - mixed[1]).abs().max() > MOVED
    if not ARCHS[arch].experts_as_parameters:  # peft's own mixed batch (it has none for target_parameters)
        with torch.no_grad():
            theirs_mixed = oracle(input_ids=ids, adapter_names=MIXED).logits
        assert (mixed - theirs_mixed).abs().max() <= TOL
    assert model.active_adapters() == ["b"]  # a mixed call leaves the model's own state alone


@pytest.mark.parametrize("arch", [a for a, spec in ARCHS.items() if spec.causal])
def test_generate_with_a_row_per_adapter_equals_generating_with_each_alone(arch, folders):
    model, ids = ours(arch, folders), input_ids(length=5)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        mixed = model.generate(ids, adapter_names=MIXED, **kwargs)
        want = []
        for row, name in enumerate(MIXED):
            if name == "__base__":
                model.disable_adapters()
            else:
                model.enable_adapters()
                model.set_adapter(name)
            want.append(model.generate(ids, **kwargs)[row])
    assert torch.equal(mixed, torch.stack(want))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_disabling_gives_exactly_the_base_logits_and_enabling_gives_the_blend_back(arch, folders, base_logits):
    model, ids = ours(arch, folders), input_ids()
    model.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
    blended = logits(model, ids)
    model.disable_adapters()
    assert torch.equal(logits(model, ids), base_logits[arch])
    model.enable_adapters()
    assert torch.equal(logits(model, ids), blended)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fusing_a_blend_keeps_its_logits_and_unfusing_restores_the_weights_bit_for_bit(arch, folders, base_logits):
    model, ids = ours(arch, folders), input_ids()
    before = state(ARCHS[arch].build())
    model.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
    unfused = logits(model, ids)
    model.fuse_lora()
    fused = logits(model, ids)
    assert_close_and_moved(fused, unfused, base_logits[arch], f"{arch} fused")
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the weights really changed
    model.unfuse_lora()
    assert_same_state(model, before)
    assert torch.equal(logits(model, ids), unfused)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_adapter_writes_what_peft_wrote_and_peft_reads_it_back(arch, folders, tmp_path):
    model, ids = ours(arch, folders), input_ids()
    for name in NAMES:
        model.set_adapter(name)
        saved = tmp_path / name
        model.save_adapter(str(saved), adapter_name=name)
        theirs_file = load_file(os.path.join(folders[arch][name], "adapter_model.safetensors"))
        ours_file = load_file(str(saved / "adapter_model.safetensors"))
        assert sorted(ours_file) == sorted(theirs_file)
        assert all(torch.equal(ours_file[k], theirs_file[k]) for k in theirs_file)
        config = json.loads((saved / "adapter_config.json").read_text())
        assert sorted(config.get("target_parameters") or []) == sorted(ARCHS[arch].adapters[name].get("target_parameters", []))
        reread = peft.PeftModel.from_pretrained(ARCHS[arch].build(), str(saved)).eval()
        original = peft.PeftModel.from_pretrained(ARCHS[arch].build(), folders[arch][name]).eval()
        assert torch.equal(logits(reread, ids), logits(original, ids))  # peft reads the same adapter from both
        assert (logits(reread, ids) - logits(model, ids)).abs().max() <= TOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_from_the_same_init_ends_at_peft_logits(arch, name, folders):
    ids = input_ids()
    model = lora_loader.attach(ARCHS[arch].build())
    model.load_adapter(folders[arch][name], adapter_name=name, is_trainable=True)
    oracle = peft_model(ARCHS[arch].build, {name: folders[arch][name]}, is_trainable=True)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in oracle.parameters() if p.requires_grad
    )
    start = logits(model, ids)
    train(model, arch, ids)
    train(oracle, arch, ids)
    assert_close_and_moved(logits(model, ids), logits(oracle, ids), start, f"{arch} {name} trained")


# -- target_parameters: LoRA on nn.Parameters --------------------------------------------------------------------------


def _qwen3_moe_file(tmp_path, **fields) -> str:
    return peft_adapter(ARCHS["qwen3_moe"].build(), dict(r=2, lora_alpha=4, **{"target_modules": [], **fields}), tmp_path / "src")


@pytest.mark.parametrize(
    "targets",
    [
        ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],  # the config's order is not the nesting's
        ["down_proj", "gate_up_proj"],  # bare names: peft matches any module's parameter of that name
        ["experts.down_proj"],  # one parameter: no base_layer in its keys
        ["layers.1.mlp.experts.gate_up_proj"],  # one layer only
    ],
    ids=["reversed", "bare", "one", "one-layer"],
)
def test_target_parameters_name_the_parameters_as_peft_nests_them(targets, tmp_path, base_logits):
    folder = _qwen3_moe_file(tmp_path, target_parameters=targets, rank_pattern={"down_proj": 3}, alpha_pattern={"gate_up_proj": 7})
    model = lora_loader.attach(ARCHS["qwen3_moe"].build())
    report = model.load_adapter(folder)
    oracle = peft.PeftModel.from_pretrained(ARCHS["qwen3_moe"].build(), folder).eval()
    assert_close_and_moved(logits(model, input_ids()), logits(oracle, input_ids()), base_logits["qwen3_moe"], str(targets))
    with_experts = sum(1 for n, _ in ARCHS["qwen3_moe"].build().named_modules() if n.endswith("mlp.experts"))
    assert report.modules == {"model": 1 if targets[0].startswith("layers.1") else with_experts}


def test_a_lora_on_a_linear_weight_by_target_parameters_loads_fuses_and_saves_as_peft(tmp_path, base_logits):
    fields = dict(r=2, lora_alpha=4, target_modules=["v_proj"], target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])
    folder = peft_adapter(ARCHS["qwen3"].build(), fields, tmp_path / "src")
    model = lora_loader.attach(ARCHS["qwen3"].build())
    model.load_adapter(folder)
    oracle = peft.PeftModel.from_pretrained(ARCHS["qwen3"].build(), folder).eval()
    ids = input_ids()
    got = logits(model, ids)
    assert_close_and_moved(got, logits(oracle, ids), base_logits["qwen3"], "q_proj.weight")
    model.fuse_lora()
    assert (logits(model, ids) - got).abs().max() <= TOL
    model.unfuse_lora()
    model.save_adapter(str(tmp_path / "saved"))
    reread = peft.PeftModel.from_pretrained(ARCHS["qwen3"].build(), str(tmp_path / "saved")).eval()
    assert (logits(reread, ids) - got).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_add_adapter_with_target_parameters_has_peft_keys_and_trains_like_peft(arch, tmp_path):
    """A new adapter: PEFT's tensors and shapes; saved untrained, peft trains it from there; ours trains it
    from the same init; both end at the same logits, and the trained one saved by us reads in peft."""
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, init_lora_weights=False)
    model = lora_loader.attach(ARCHS[arch].build())
    model.add_adapter(LoraConfig(**fields), adapter_name="new")
    reference = peft.get_peft_model(ARCHS[arch].build(), peft.LoraConfig(**fields))
    want = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    assert {k: tuple(v.shape) for k, v in model.get_adapter_state_dict("new").items()} == want
    model.save_adapter(str(tmp_path / "init"), adapter_name="new")
    oracle = peft.PeftModel.from_pretrained(ARCHS[arch].build(), str(tmp_path / "init"), is_trainable=True)
    ids = input_ids()
    start = logits(model, ids)
    train(model, arch, ids)
    train(oracle, arch, ids)
    trained = logits(model, ids)
    assert_close_and_moved(trained, logits(oracle, ids), start, f"{arch} add_adapter trained")
    model.save_adapter(str(tmp_path / "trained"), adapter_name="new")
    reread = peft.PeftModel.from_pretrained(ARCHS[arch].build(), str(tmp_path / "trained")).eval()
    assert (logits(reread, ids) - trained).abs().max() <= TOL


def test_add_adapter_with_target_parameters_starts_at_the_base_model(base_logits):
    model = lora_loader.attach(ARCHS["mixtral"].build())
    model.add_adapter(LoraConfig(r=2, target_parameters=EXPERT_PARAMS), adapter_name="new")
    assert torch.equal(logits(model, input_ids()), base_logits["mixtral"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_adapters.new." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (lora_A, lora_B)


def test_parameter_loras_save_in_diffusers_and_peft_files_and_read_back(folders, tmp_path, base_logits):
    model = ours("qwen3_moe", folders)
    ids = input_ids()
    want = logits(model, ids)
    for fmt in ("diffusers", "peft"):
        path = model.save_lora_weights(str(tmp_path / f"{fmt}.safetensors"), adapter_name="b", format=fmt)
        again = lora_loader.attach(ARCHS["qwen3_moe"].build())
        again.load_lora_weights(path, adapter_name="b")
        assert_close_and_moved(logits(again, ids), want, base_logits["qwen3_moe"], fmt)
    with pytest.raises(LoraError, match="Kohya"):
        model.save_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="b", format="kohya")


def test_deleting_parameter_loras_gives_back_the_plain_modules(folders, base_logits):
    model = ours("gpt_oss", folders)
    experts = model.model.layers[0].mlp.experts
    kind = type(ARCHS["gpt_oss"].build().model.layers[0].mlp.experts)
    assert type(experts) is not kind
    model.delete_adapters(["a", "b"])
    assert type(experts) is kind and "lora_adapters" not in experts._modules
    assert torch.equal(logits(model, input_ids()), base_logits["gpt_oss"])


def test_parameter_loras_that_do_not_fit_are_refused_and_change_nothing(tmp_path):
    folder = _qwen3_moe_file(tmp_path, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS)
    eight = causal(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, moe_intermediate_size=24, num_experts=8, **EXPERTS)
    other = lora_loader.attach(eight())
    before = state(other)
    with pytest.raises(LoraError, match=r"experts.*gate_up_proj"):
        other.load_adapter(folder)
    assert_same_state(other, before)
    assert other.get_list_adapters() == {}
    report = other.load_adapter(folder, strict=False)  # the q_proj LoRAs load, the experts' are reported
    assert report.modules == {"model": 2}
    assert len(report.skipped) == 2 * 2 * 2 and all(".mlp.experts." in k for k in report.skipped)


def test_hotswap_and_weighted_merges_of_parameter_loras_are_lora_errors(folders):
    model = ours("qwen3_moe", folders)
    ids = input_ids()
    model.set_adapter("a")
    before = logits(model, ids)
    with pytest.raises(LoraError, match="target_parameters"):
        model.load_lora_weights(folders["qwen3_moe"]["a"], adapter_name="a", hotswap=True)
    with pytest.raises(LoraError, match="target_parameters"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="linear")
    assert sorted(model.get_list_adapters()["model"]) == ["a", "b"]
    model.set_adapter("a")
    assert torch.equal(logits(model, ids), before)


def test_parked_parameter_loras_come_back_with_the_same_logits(folders):
    model = ours("mixtral", folders)
    ids = input_ids()
    model.set_adapter("a")
    first = logits(model, ids)
    model.set_max_resident_adapters(1)
    model.set_adapter("b")
    assert model.lora_residency() == {"resident": ["b"], "parked": ["a"]}
    model.set_adapter("a")
    assert torch.equal(logits(model, ids), first)


# -- lora_bias -------------------------------------------------------------------------------------------------------


def test_add_adapter_with_lora_bias_trains_saves_and_fuses_as_peft(tmp_path):
    """gpt-oss's attention projections have biases: a new adapter with lora_B biases (PEFT's lora_bias=True) has
    PEFT's tensors, trains from the same init to peft's logits, is read by peft, and fuses into the biases."""
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], lora_bias=True, init_lora_weights=False)
    model = lora_loader.attach(ARCHS["gpt_oss"].build())
    model.add_adapter(LoraConfig(**fields), adapter_name="x")
    keys = model.get_adapter_state_dict("x")
    reference = peft.get_peft_model(ARCHS["gpt_oss"].build(), peft.LoraConfig(**fields))
    assert sorted(keys) == sorted(k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(reference))
    assert any(k.endswith("lora_B.bias") for k in keys)
    model.save_adapter(str(tmp_path / "init"), adapter_name="x")
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["lora_bias"] is True
    oracle = peft.PeftModel.from_pretrained(ARCHS["gpt_oss"].build(), str(tmp_path / "init"), is_trainable=True)
    ids = input_ids()
    start = logits(model, ids)
    train(model, "gpt_oss", ids)
    train(oracle, "gpt_oss", ids)
    trained = logits(model, ids)
    assert_close_and_moved(trained, logits(oracle, ids), start, "lora_bias trained")
    bias_names = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("up_bias")]
    assert bias_names  # the lora_B biases train
    model.save_adapter(str(tmp_path / "trained"), adapter_name="x")
    reread = peft.PeftModel.from_pretrained(ARCHS["gpt_oss"].build(), str(tmp_path / "trained")).eval()
    assert (logits(reread, ids) - trained).abs().max() <= TOL
    base = state(ARCHS["gpt_oss"].build())
    model.fuse_lora()
    assert (logits(model, ids) - trained).abs().max() <= TOL
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.bias, base["model.layers.0.self_attn.q_proj.bias"])
    model.unfuse_lora()
    assert_same_state(model, base)


def test_lora_bias_with_zero_init_starts_at_the_base_and_its_bias_is_zero(base_logits):
    model = lora_loader.attach(ARCHS["gpt_oss"].build())
    model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"], lora_bias=True), adapter_name="x")
    assert torch.equal(logits(model, input_ids()), base_logits["gpt_oss"])
    biases = [v for k, v in model.get_adapter_state_dict("x").items() if k.endswith("lora_B.bias")]
    assert len(biases) == 2 and all(not b.any() for b in biases)


LORA_BIAS_REFUSED = {
    "with-target-parameters": (dict(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, lora_bias=True), "lora_bias"),
    "with-dora": (dict(target_modules=["q_proj"], lora_bias=True, use_dora=True), "lora_bias"),
    "on-an-embedding": (dict(target_modules=["embed_tokens"], lora_bias=True), "Embedding"),
    "dora-on-parameters": (dict(target_parameters=EXPERT_PARAMS, use_dora=True), "use_dora"),
    "dropout-on-parameters": (dict(target_parameters=EXPERT_PARAMS, lora_dropout=0.1), "lora_dropout"),
}


@pytest.mark.parametrize("case", list(LORA_BIAS_REFUSED))
def test_combinations_peft_does_not_define_are_lora_errors_naming_the_field(case):
    fields, word = LORA_BIAS_REFUSED[case]
    model = lora_loader.attach(ARCHS["qwen3_moe"].build())
    before = state(model)
    with pytest.raises(LoraError, match=word):
        model.add_adapter(LoraConfig(r=2, **fields), adapter_name="x")
    assert_same_state(model, before)
    assert model.get_list_adapters() == {}


# -- other PEFT fields that change the math: still refused, named ---------------------------------------------------------

UNIMPLEMENTED = {
    "use_qalora": True,
    "layer_replication": [[0, 2], [1, 2]],
    "trainable_token_indices": [3, 4],
    "alora_invocation_tokens": [5, 6],
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"r": 2},
    "velora_config": {"rank": 2},
    "monteclora_config": {"n": 2},
    "lora_ga_config": {"bsz": 2},
    "loftq_config": {"loftq_bits": 4},
    "eva_config": {"rho": 2.0},
    "corda_config": {"cache_file": "x"},
    "megatron_config": {"tp": 2},
}


@pytest.mark.parametrize("field", list(UNIMPLEMENTED))
def test_a_file_whose_config_sets_an_unimplemented_math_field_is_a_lora_error_naming_it(field, tmp_path):
    folder = peft_adapter(ARCHS["qwen3"].build(), dict(r=2, target_modules=["q_proj"]), tmp_path / "src")
    path = os.path.join(folder, "adapter_config.json")
    config = json.loads(open(path).read())
    config[field] = UNIMPLEMENTED[field]
    with open(path, "w") as f:
        json.dump(config, f)
    model = lora_loader.attach(ARCHS["qwen3"].build())
    before = state(model)
    with pytest.raises(LoraError, match=field):
        model.load_adapter(folder)
    with pytest.raises(LoraError, match=field):
        model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"], **{field: UNIMPLEMENTED[field]}), adapter_name="x")
    assert_same_state(model, before)
    assert model.get_list_adapters() == {}


# -- adapters of transformers 4's per-expert modules on transformers 5's stacked experts ---------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_an_adapter_of_per_expert_modules_loads_as_peft_converts_it(arch, tmp_path, base_logits):
    """peft 0.21 converts such an adapter on loading (transformers' checkpoint conversion: experts stacked, gate
    and up fused with a block-diagonal lora_B, Mixtral's block_sparse_moe renamed, the router's LoRA on its
    weight); lora_loader gives peft's tensors, peft's logits, per-row batches, and saves what peft reads."""
    folder = v4_moe_adapter(arch, tmp_path / "v4")
    model = lora_loader.attach(ARCHS[arch].build())
    model.load_adapter(folder, adapter_name="old")
    oracle = peft.PeftModel.from_pretrained(ARCHS[arch].build(), folder, adapter_name="old").eval()
    ids = input_ids()
    got = logits(model, ids)
    assert_close_and_moved(got, logits(oracle, ids), base_logits[arch], f"{arch} transformers 4 adapter")
    want = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(oracle, adapter_name="old").items()}
    ours_tensors = model.get_adapter_state_dict("old")
    assert sorted(ours_tensors) == sorted(want)
    assert all(torch.equal(ours_tensors[k], want[k]) for k in want)
    mixed = logits(model, ids, adapter_names=["old", "__base__", "old"])
    assert (mixed[[0, 2]] - got[[0, 2]]).abs().max() <= TOL
    assert (mixed[1] - base_logits[arch][1]).abs().max() <= 1e-5
    model.save_adapter(str(tmp_path / "v5"), adapter_name="old")
    reread = peft.PeftModel.from_pretrained(ARCHS[arch].build(), str(tmp_path / "v5")).eval()
    assert (logits(reread, ids) - got).abs().max() <= TOL
    model.fuse_lora()
    assert (logits(model, ids) - got).abs().max() <= TOL
