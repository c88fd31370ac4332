"""lora_loader on transformers causal LMs against the reference implementation: ``peft.PeftModel``.

Each adapter is created and saved by peft itself (``get_peft_model`` +
``save_pretrained``, every trainable tensor randomised; see ``llm_tiny.py``),
loaded once by ``peft.PeftModel.from_pretrained`` and once by lora_loader
(``attach(model).load_adapter(dir)``) into identical tiny Llama, GPT-2 and OPT
models, and the logits must agree to 1e-4 in fp32. Every comparison also checks
that the adapter moved the logits by more than 1e-3, so a loader that silently
loads nothing (or ignores a magnitude vector, a pattern or a saved module) cannot
pass. The contract is ``shared/API.md`` sections 1, 3 and 4, and issue 3.
"""

from __future__ import annotations

import peft
import pytest
import torch
from llm_tiny import MODELS, logits, peft_adapter, peft_oracle, tiny_llama
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

import lora_loader
from lora_loader import LoraError

# peft warns about saving embedding layers and about fan_in_fan_out on the configs below; all intended.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
]

TOLERANCE = 1e-4  # max abs difference between lora_loader and peft
MOVED = 1e-3  # min max abs difference between the adapted and the base logits

# One PEFT config per case: (model kind, peft.LoraConfig kwargs). init_lora_weights=False and the
# producer's noise make every tensor non-trivial (B non-zero, magnitude != weight norm, copies != original).
CASES = {
    "llama-q-v": ("llama", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])),
    "llama-alpha-not-rank": (
        "llama",
        dict(r=4, lora_alpha=13, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    "llama-rslora": (
        "llama",
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"])),
    "llama-dora-rslora": (
        "llama",
        dict(r=2, lora_alpha=5, use_dora=True, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
    ),
    "llama-rank-alpha-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"q_proj": 3, "down_proj": 16},
        ),
    ),
    "llama-all-linear": ("llama", dict(r=3, lora_alpha=7, target_modules="all-linear")),
    "llama-regex-targets": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.gate_proj)"),
    ),
    "llama-layers-to-transform": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1]),
    ),
    "llama-modules-to-save-lm-head": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    # PEFT's modules_to_save is a plain suffix match: "norm" copies model.norm and every *_layernorm.
    "llama-modules-to-save-suffix": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
    ),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-conv1d-dora": (
        "gpt2",
        dict(r=4, lora_alpha=6, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "gpt2-embedding": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "gpt2-layers-to-transform": (
        "gpt2",
        dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], layers_to_transform=[0], fan_in_fan_out=True),
    ),
    "opt-q-v-fc1": ("opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])),
    "opt-lora-only-bias": ("opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], bias="lora_only")),
}

# Cases whose adapter carries more than LoRA layers (a saved module, base biases): the report's
# per-component count of "modules adapted" is only compared with peft's LoRA-layer count without them.
ONLY_LORA_LAYERS = [c for c, (_, kw) in CASES.items() if "modules_to_save" not in kw and "bias" not in kw]
# Adapters that change the base model in place (bias="lora_only" overwrites base biases, in peft too)
# have no "disabled = base model" to check.
DISABLEABLE = [
    "llama-dora",
    "llama-modules-to-save-lm-head",
    "llama-modules-to-save-suffix",
    "llama-embedding",
    "gpt2-conv1d",
    "gpt2-embedding",
    "opt-q-v-fc1",
]

# Two adapters per model for blending; they overlap on some modules and differ in rank, alpha and scaling.
BLENDS = {
    "llama": (
        ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        ("llama", dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["v_proj", "o_proj", "up_proj"])),
    ),
    "llama-dora": (
        ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])),
        ("llama", dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"])),
    ),
    "gpt2": (
        ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
        ("gpt2", dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    ),
}


# -- helpers ---------------------------------------------------------------------------------------


def peft_config(kwargs: dict) -> peft.LoraConfig:
    return peft.LoraConfig(init_lora_weights=False, **kwargs)


def mine(kind: str, adapters: dict[str, str], call: str = "load_adapter"):
    """A fresh tiny model of ``kind`` with ``{name: folder}`` loaded by lora_loader; returns (model, reports)."""
    model = lora_loader.attach(MODELS[kind](0))
    reports = [getattr(model, call)(folder, adapter_name=name) for name, folder in adapters.items()]
    return model.eval(), reports


def peft_lora_layer_count(peft_model, adapter: str) -> int:
    return sum(
        1
        for m in peft_model.modules()
        if isinstance(m, BaseTunerLayer) and (adapter in m.lora_A or adapter in getattr(m, "lora_embedding_A", {}))
    )


def peft_blend(peft_model, weights: dict[str, float]):
    """Activate ``weights``' adapters together in peft, each scaled by its weight.

    peft has no weighted multi-adapter forward on a PeftModel, so this does what diffusers'
    ``set_adapters`` does with peft (the definition API.md section 2 refers to): activate all of
    them (``base_model.set_adapter([...])``) and multiply each LoRA layer's scaling by the adapter's
    weight (``LoraLayer.set_scale``, which keeps alpha/r or alpha/sqrt(r) for rsLoRA). This is not
    ``add_weighted_adapter``, which builds a new merged adapter with different math.
    """
    peft_model.base_model.set_adapter(list(weights))
    for module in peft_model.modules():
        if isinstance(module, PeftLoraLayer):
            for name, weight in weights.items():
                module.set_scale(name, weight)
    return peft_model


def assert_close_and_moved(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, what: str) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= TOLERANCE, f"{what}: lora_loader's logits differ from peft's by {diff:.3g}"
    change = (want - base).abs().max().item()
    assert change > MOVED, f"{what}: the adapter moves the logits by only {change:.3g}; the check proves nothing"


def fingerprint(model) -> tuple:
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        list(model.active_adapters()),
    )


def assert_same_fingerprint(after: tuple, before: tuple) -> None:
    assert after[0] == before[0], "the module tree changed"
    assert after[1].keys() == before[1].keys(), "the state dict keys changed"
    changed = [k for k in before[1] if not torch.equal(after[1][k], before[1][k])]
    assert not changed, f"these tensors changed: {changed}"
    assert after[2] == before[2], "requires_grad flags changed"
    assert after[3] == before[3], "the active adapters changed"


# -- adapters, written by peft once per module ------------------------------------------------------------


@pytest.fixture(scope="module")
def base_logits():
    return {kind: logits(factory(0)) for kind, factory in MODELS.items()}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """``adapter(kind, kwargs, seed)`` -> folder of a PEFT adapter written by peft (memoised)."""
    cache = {}

    def make(kind: str, kwargs: dict, seed: int = 1) -> str:
        key = (kind, repr(sorted(kwargs.items())), seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"peft-{kind}")
            cache[key] = peft_adapter(MODELS[kind](0), peft_config(kwargs), folder, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def case(adapter):
    """``case(name)`` -> (kind, folder, peft oracle with the adapter loaded as "x", its logits) (memoised)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            kind, kwargs = CASES[name]
            folder = adapter(kind, kwargs)
            oracle = peft_oracle(MODELS[kind], {"x": folder})
            cache[name] = (kind, folder, oracle, logits(oracle))
        return cache[name]

    return get


# -- one adapter against peft ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_a_peft_adapter_gives_the_same_logits_as_peft(name, case, base_logits):
    kind, folder, _, want = case(name)
    model, _ = mine(kind, {"x": folder})
    assert_close_and_moved(logits(model), want, base_logits[kind], name)


@pytest.mark.parametrize("name", ["llama-q-v", "llama-dora", "gpt2-conv1d", "llama-modules-to-save-lm-head"])
def test_load_lora_weights_is_the_same_as_load_adapter(name, case):
    kind, folder, _, want = case(name)
    via_adapter, _ = mine(kind, {"x": folder}, "load_adapter")
    via_lora_weights, _ = mine(kind, {"x": folder}, "load_lora_weights")
    assert torch.equal(logits(via_lora_weights), logits(via_adapter))
    assert (logits(via_lora_weights) - want).abs().max().item() <= TOLERANCE
    assert via_lora_weights.active_adapters() == via_adapter.active_adapters() == ["x"]


@pytest.mark.parametrize("name", ONLY_LORA_LAYERS)
def test_the_load_report_counts_the_modules_peft_adapts(name, case):
    kind, folder, oracle, _ = case(name)
    _, (report,) = mine(kind, {"x": folder})
    assert report.adapter_name == "x"
    assert report.modules == {"model": peft_lora_layer_count(oracle, "x")}
    assert not report.skipped


STATE_DICT_CASES = [
    "llama-q-v",
    "llama-rank-alpha-patterns",
    "llama-dora",
    "llama-modules-to-save-lm-head",
    "gpt2-conv1d",
    "gpt2-embedding",
    "opt-lora-only-bias",
]


@pytest.mark.parametrize("name", STATE_DICT_CASES)
def test_get_adapter_state_dict_has_peft_keys_and_the_loaded_tensors(name, case):
    """Keys as transformers' ``get_adapter_state_dict`` gives them (peft's, without ``base_model.model.``)."""
    kind, folder, oracle, _ = case(name)
    model, _ = mine(kind, {"x": folder})
    peft_state = peft.get_peft_model_state_dict(oracle, adapter_name="x")
    want = {k.removeprefix("base_model.model."): v for k, v in peft_state.items()}
    got = model.get_adapter_state_dict("x")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key].float(), want[key].float()), key


@pytest.mark.parametrize("name", STATE_DICT_CASES + ["llama-modules-to-save-suffix"])
def test_the_model_state_dict_stays_the_base_models_with_an_adapter_loaded(name, case):
    """Adapters (factors, full module copies, bias deltas) stay out of ``model.state_dict()``, so
    ``save_pretrained`` and ``load_state_dict(strict=True)`` see the base model."""
    kind, folder, _, _ = case(name)
    model, _ = mine(kind, {"x": folder})
    base = MODELS[kind](0).state_dict()
    state = model.state_dict()
    assert list(state) == list(base)
    assert all(torch.equal(state[k], base[k]) for k in base)


# -- several adapters: blends, set_adapter, active_adapters -----------------------------------------------


@pytest.fixture(scope="module")
def blend_folders(adapter):
    return {blend: {"a": adapter(*a, seed=2), "b": adapter(*b, seed=3)} for blend, (a, b) in BLENDS.items()}


def blend_kind(blend: str) -> str:
    return BLENDS[blend][0][0]


# DoRA at a weight other than 1 is specified differently (base + w * (dora - base), see the DoRA test below).
PLAIN_BLENDS = [b for b in BLENDS if "dora" not in b]


@pytest.mark.parametrize("blend", PLAIN_BLENDS)
def test_set_adapters_with_weights_equals_peft_with_both_active_and_each_scaled(blend, blend_folders, base_logits):
    kind, folders = blend_kind(blend), blend_folders[blend]
    want = logits(peft_blend(peft_oracle(MODELS[kind], folders), {"a": 0.7, "b": 0.3}))
    model, _ = mine(kind, folders)
    model.set_adapters(["a", "b"], [0.7, 0.3])
    assert model.active_adapters() == ["a", "b"]
    assert_close_and_moved(logits(model), want, base_logits[kind], f"{blend} blend")
    # The blend is neither adapter alone at full weight.
    for only in ("a", "b"):
        alone = logits(peft_oracle(MODELS[kind], {only: folders[only]}))
        assert (alone - want).abs().max().item() > MOVED


@pytest.mark.parametrize("name", ["llama-q-v", "llama-rslora", "llama-embedding", "gpt2-conv1d"])
def test_one_adapter_at_weight_one_half_equals_peft_with_its_scaling_halved(name, case, base_logits):
    """The weight multiplies the adapter's scaling, as diffusers' ``set_adapters`` does with peft (``set_scale``)."""
    kind, folder, _, full = case(name)
    want = logits(peft_blend(peft_oracle(MODELS[kind], {"x": folder}), {"x": 0.5}))
    model, _ = mine(kind, {"x": folder})
    model.set_adapters("x", 0.5)
    assert_close_and_moved(logits(model), want, base_logits[kind], f"{name} at 0.5")
    assert (want - full).abs().max().item() > MOVED, "weight 0.5 should differ from weight 1.0"


@pytest.mark.parametrize("blend", list(BLENDS))
def test_both_adapters_active_at_full_weight_equal_peft_with_both_active(blend, blend_folders, base_logits):
    kind, folders = blend_kind(blend), blend_folders[blend]
    oracle = peft_oracle(MODELS[kind], folders)
    oracle.base_model.set_adapter(["a", "b"])
    model, _ = mine(kind, folders)
    model.set_adapter(["a", "b"])
    assert model.active_adapters() == ["a", "b"]
    assert_close_and_moved(logits(model), logits(oracle), base_logits[kind], f"{blend} a+b")


def test_set_adapters_accepts_diffusers_adapter_weights_keyword(blend_folders):
    folders = blend_folders["llama"]
    by_weights, _ = mine("llama", folders)
    by_weights.set_adapters(["a", "b"], weights=[0.7, 0.3])
    by_keyword, _ = mine("llama", folders)
    by_keyword.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    assert torch.equal(logits(by_keyword), logits(by_weights))


@pytest.mark.parametrize("blend", list(BLENDS))
def test_set_adapter_after_a_blend_activates_exactly_that_adapter_at_weight_one(blend, blend_folders, base_logits):
    kind, folders = blend_kind(blend), blend_folders[blend]
    model, _ = mine(kind, folders)
    model.set_adapters(["a", "b"], [0.7, 0.3])
    for name in ("b", "a"):
        model.set_adapter(name)
        assert model.active_adapters() == [name]
        want = logits(peft_oracle(MODELS[kind], {name: folders[name]}))
        assert_close_and_moved(logits(model), want, base_logits[kind], f"{blend} set_adapter({name!r})")


def test_loading_two_adapters_with_load_lora_weights_leaves_the_second_active_as_transformers(blend_folders, base_logits):
    """API.md section 2: a newly loaded adapter becomes the only active one, as after transformers'
    ``load_adapter`` (measured here on transformers' own integration)."""
    folders = blend_folders["llama"]
    model, _ = mine("llama", folders, "load_lora_weights")
    reference = MODELS["llama"](0)
    for name, folder in folders.items():
        reference.load_adapter(folder, adapter_name=name)
    assert model.active_adapters() == reference.active_adapters() == ["b"]
    oracle = peft_oracle(MODELS["llama"], folders)
    oracle.base_model.set_adapter("b")
    assert_close_and_moved(logits(model), logits(oracle), base_logits["llama"], "b after loading a then b")


def test_set_adapter_with_an_unknown_name_is_a_lora_error_and_changes_nothing(blend_folders):
    model, _ = mine("llama", blend_folders["llama"])
    model.set_adapters(["a", "b"], [0.7, 0.3])
    before, before_logits = fingerprint(model), logits(model)
    with pytest.raises(LoraError, match="nope"):
        model.set_adapter("nope")
    with pytest.raises(LoraError, match="nope"):
        model.set_adapters(["a", "nope"], [0.5, 0.5])
    assert_same_fingerprint(fingerprint(model), before)
    assert torch.equal(logits(model), before_logits)


# -- disabling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("calls", [("disable_lora", "enable_lora"), ("disable_adapters", "enable_adapters")])
@pytest.mark.parametrize("name", DISABLEABLE)
def test_disabled_adapters_give_exactly_the_base_logits_and_enabling_restores_them(name, calls, case, base_logits):
    disable, enable = calls
    kind, folder, _, want = case(name)
    model, _ = mine(kind, {"x": folder})
    adapted = logits(model)
    assert_close_and_moved(adapted, want, base_logits[kind], name)
    getattr(model, disable)()
    assert torch.equal(logits(model), base_logits[kind]), f"{disable}() must give exactly the base model's logits"
    getattr(model, enable)()
    assert torch.equal(logits(model), adapted), f"{enable}() must restore the adapted logits"


def test_enabling_restores_the_last_weighted_blend(blend_folders, base_logits):
    model, _ = mine("llama", blend_folders["llama"])
    model.set_adapters(["a", "b"], [0.7, 0.3])
    blended = logits(model)
    model.disable_adapters()
    assert torch.equal(logits(model), base_logits["llama"])
    model.enable_adapters()
    assert torch.equal(logits(model), blended)
    assert model.active_adapters() == ["a", "b"]


# -- an adapter for another architecture -------------------------------------------------------------------
#
# Each wrong adapter is loaded into a model that already has a fitting adapter "ok" active: the load must
# raise a LoraError naming the file and the first module (in the file's and the model's order alike) that
# does not fit, and leave modules, tensors, requires_grad flags, active adapters and logits exactly as they were.

WRONG = {
    # hidden 32 instead of 16: every targeted module misfits; the first is layer 0's q_proj.
    "llama-hidden-32": (
        lambda: tiny_llama(0, hidden_size=32),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "model.layers.0.self_attn.q_proj",
    ),
    # intermediate 64 instead of 32: q_proj and v_proj fit, down_proj does not (and sorts first).
    "llama-intermediate-64": (
        lambda: tiny_llama(0, intermediate_size=64),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "model.layers.0.mlp.down_proj",
    ),
    # a GPT-2 adapter: its modules do not exist in Llama.
    "gpt2-into-llama": (
        lambda: MODELS["gpt2"](0),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "transformer.h.0.attn.c_attn",
    ),
}


@pytest.fixture(scope="module")
def wrong_folders(tmp_path_factory):
    out = {}
    for name, (factory, kwargs, _) in WRONG.items():
        folder = tmp_path_factory.mktemp(f"wrong-{name}")
        out[name] = peft_adapter(factory(), peft_config(kwargs), folder, seed=4)
    return out


@pytest.mark.parametrize("call", ["load_adapter", "load_lora_weights"])
@pytest.mark.parametrize("wrong", list(WRONG))
def test_an_adapter_for_another_architecture_names_the_first_misfit_and_changes_nothing(
    wrong, call, wrong_folders, case
):
    first_misfit = WRONG[wrong][2]
    _, ok_folder, _, ok_logits = case("llama-q-v")
    model, _ = mine("llama", {"ok": ok_folder})
    before = fingerprint(model)
    with pytest.raises(LoraError) as err:
        getattr(model, call)(wrong_folders[wrong], adapter_name="bad")
    assert first_misfit in str(err.value), f"the message should name {first_misfit}: {err.value}"
    assert wrong_folders[wrong] in str(err.value), f"the message should name the file: {err.value}"
    assert_same_fingerprint(fingerprint(model), before)
    assert torch.equal(logits(model), logits(mine("llama", {"ok": ok_folder})[0]))
    assert (logits(model) - ok_logits).abs().max().item() <= TOLERANCE
    # Nothing of "bad" was registered: the name is free for an adapter that fits.
    getattr(model, call)(ok_folder, adapter_name="bad")
    assert model.get_list_adapters() == {"model": ["ok", "bad"]}



@pytest.mark.parametrize("name", ["llama-dora", "gpt2-conv1d-dora"])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.5])
def test_a_dora_adapter_at_weight_w_gives_base_plus_w_times_the_dora_change_on_every_layer(name, weight, case):
    """The project's rule for DoRA blends (issue 5): ``W + w * (W_dora - W)``, so weight 0 is off.

    peft puts the weight inside the DoRA norm instead, which leaves a DoRA adapter partly on at weight 0;
    the reference here is built from peft's own layers at full weight: ``base(x) + w * (peft(x) - base(x))``.
    """
    kind, folder, oracle, _ = case(name)
    model, _ = mine(kind, {"x": folder})
    model.set_adapters("x", weight)
    checked = 0
    for path, module in model.named_modules():
        adapters = getattr(module, "lora_adapters", None)
        if adapters is None or adapters["x"].magnitude is None:
            continue
        peft_layer = oracle.get_submodule("base_model.model." + path)
        in_features = module.weight.shape[0 if kind == "gpt2" else 1]
        x = torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(checked))
        with torch.no_grad():
            base, full = peft_layer.base_layer(x), peft_layer(x)
            torch.testing.assert_close(module(x), base + weight * (full - base), atol=1e-5, rtol=1e-5)
            assert (full - base).abs().max().item() > MOVED
        checked += 1
    assert checked >= 2
