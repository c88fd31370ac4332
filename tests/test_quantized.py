"""Adapters on bitsandbytes-quantized bases (8-bit ``Linear8bitLt``, 4-bit ``Linear4bit``), against peft.

The base is a tiny Llama saved once and loaded by transformers with
``BitsAndBytesConfig(load_in_8bit=True)`` or ``load_in_4bit=True`` (nf4, fp32
compute) on the CPU: bitsandbytes' CPU backend runs the same quantization and
kernels as on a GPU. Each test loads the same quantized base twice, once for
lora_loader and once for ``peft`` (the oracle; peft has its own bnb LoRA layers),
so both sides compute on bit-identical quantized weights. Issue 7, part 1.
"""

from __future__ import annotations

import peft
import pytest
import torch
from llm_tiny import input_ids, peft_adapter, tiny_llama
from safetensors.torch import load_file

import lora_loader

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional extra lora-loader[bnb]")
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
    pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes"),
]

TOLERANCE = 1e-4
SIZES = dict(hidden_size=64, intermediate_size=128)  # bitsandbytes quantizes in blocks of 64
QUANT = {
    8: lambda: BitsAndBytesConfig(load_in_8bit=True),
    4: lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=8, lora_alpha=5, target_modules=["k_proj", "o_proj", "q_proj", "up_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    tiny_llama(0, **SIZES).save_pretrained(root / "base")
    out = {"base": str(root / "base")}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        config = peft.LoraConfig(init_lora_weights=False, **kwargs)
        out[name] = peft_adapter(tiny_llama(0, **SIZES), config, root / name, seed=seed)
    return out


def quantized_llama(files, bits: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(files["base"], quantization_config=QUANT[bits](), device_map="cpu")
    return model.eval()


def ours(files, bits: int, *names: str) -> LlamaForCausalLM:
    model = lora_loader.attach(quantized_llama(files, bits))
    for name in names:
        model.load_adapter(files[name], adapter_name=name)
    return model


def oracle(files, bits: int, *names: str) -> peft.PeftModel:
    first, *rest = names
    model = peft.PeftModel.from_pretrained(quantized_llama(files, bits), files[first], adapter_name=first)
    for name in rest:
        model.load_adapter(files[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=input_ids()).logits


def assert_close(actual, expected, moved_from=None):
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)
    if moved_from is not None:
        assert (expected - moved_from).abs().max() > 1e-3, "the adapter did not change the output: the check proves nothing"


def linear_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.startswith("Lora") and hasattr(m, "lora_adapters")]


@pytest.mark.parametrize("bits", [8, 4])
def test_the_base_really_is_quantized(files, bits):
    model = ours(files, bits, "a")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    assert not q_proj.weight.dtype.is_floating_point
    assert q_proj.lora_adapters["a"].down.dtype == torch.float32  # QLoRA: the adapter computes in full precision


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["a", "b", "dora"])
def test_load_matches_peft_on_the_same_quantized_base(files, bits, name):
    base = logits(quantized_llama(files, bits))
    assert_close(logits(ours(files, bits, name)), logits(oracle(files, bits, name)), moved_from=base)


def set_peft_blend(model: peft.PeftModel, weights: dict[str, float]) -> None:
    """The blend diffusers builds with peft: both adapters active, each layer's scaling times its weight."""
    model.base_model.set_adapter(list(weights))
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, weight in weights.items():
                if name in module.scaling:
                    module.set_scale(name, weight)


def computes_in_float32(layer) -> bool:
    """Whether bitsandbytes' 4-bit kernel for ``layer`` computes as a float32 matmul with its dequantized weight does
    (the CPU kernel computes in bfloat16 on CPUs that have it, whatever the compute dtype: steps of 2^-6 near 3)."""
    x = torch.randn(2, 8, layer.in_features, generator=torch.Generator().manual_seed(0))
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    with torch.no_grad():
        return float((layer(x) - x @ dense.T).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("bits", [8, 4])
def test_blend_disable_enable(files, bits):
    model = ours(files, bits, "a", "b")
    reference = oracle(files, bits, "a", "b")
    base = logits(quantized_llama(files, bits))
    model.set_adapters(["a", "b"], [0.7, -0.4])
    set_peft_blend(reference, {"a": 0.7, "b": -0.4})
    blended = logits(model)
    # The layer both adapters share computes base + 0.7 s_a B_a A_a x - 0.4 s_b B_b A_b x, to float32 rounding.
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
        model.disable_adapters()
        base_out = layer(x)
        model.enable_adapters()
        want = base_out + sum(weight * layer.lora_adapters[name].scale * (x @ layer.lora_adapters[name].down.T @ layer.lora_adapters[name].up.T)
                              for name, weight in (("a", 0.7), ("b", -0.4)))  # fmt: skip
    assert_close(got, want, moved_from=base_out)
    if bits == 8 or not computes_in_float32(quantized_llama(files, bits).model.layers[0].mlp.gate_proj):
        # The base kernel rounds every activation row (LLM.int8 to int8, a step of row_max / 127; the 4-bit CPU
        # kernel on some CPUs to bfloat16): the 1e-7 by which two adapters summed in another order differ can
        # flip one rounding downstream, which the following layers carry to the logits.
        torch.testing.assert_close(blended, logits(reference), atol=2e-2, rtol=0)
    else:
        assert_close(blended, logits(reference), moved_from=base)
    model.disable_adapters()
    assert torch.equal(logits(model), base)  # bitsandbytes' own kernels, untouched
    model.enable_adapters()
    assert torch.equal(logits(model), blended)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["a", "dora"])
def test_fuse_requantizes_like_peft_merge(files, bits, name):
    """Fusing dequantizes, adds in fp32 and quantizes again: lossy (the sum is rounded to the 8-/4-bit grid),
    exactly as peft's merge. (One adapter at a time: peft requantizes after each adapter it merges.)"""
    model = ours(files, bits, name)
    base = logits(quantized_llama(files, bits))
    model.fuse_lora()
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.weight.dtype.is_floating_point and isinstance(layer.weight, (bnb.nn.Int8Params, bnb.nn.Params4bit))
    reference = oracle(files, bits, name)
    reference.merge_adapter()
    assert_close(logits(model), logits(reference), moved_from=base)


@pytest.mark.parametrize("bits", [8, 4])
def test_disable_and_unfuse_restore_the_quantized_weights_exactly(files, bits):
    model = ours(files, bits, "a", "b", "dora")
    base = logits(quantized_llama(files, bits))
    unfused = logits(model)
    layer = model.model.layers[0].self_attn.q_proj
    before = (layer.weight, layer.weight.data.clone())

    model.fuse_lora()
    fused = logits(model)
    assert layer.weight is not before[0] and (fused - base).abs().max() > 1e-3
    model.disable_lora()
    assert torch.equal(logits(model), base)
    model.enable_lora()
    assert torch.equal(logits(model), fused)

    model.unfuse_lora()
    assert layer.weight is before[0] and torch.equal(layer.weight.data, before[1])
    assert torch.equal(logits(model), unfused)
    model.disable_lora()
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("bits", [8, 4])
def test_fuse_then_unload_keeps_the_quantized_fused_weights(files, bits):
    model = ours(files, bits, "a")
    model.fuse_lora()
    fused = logits(model)
    model.unload_lora_weights()
    assert not linear_layers(model)
    assert torch.equal(logits(model), fused)


@pytest.mark.parametrize("bits", [8, 4])
def test_saved_adapter_loads_in_peft_on_a_quantized_base(files, bits, tmp_path):
    model = ours(files, bits, "b")
    model.save_adapter(str(tmp_path / "b"), "b")
    original = load_file(f"{files['b']}/adapter_model.safetensors")
    saved = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert saved.keys() == original.keys()
    for key in original:
        assert torch.equal(saved[key], original[key]), key
    reloaded = peft.PeftModel.from_pretrained(quantized_llama(files, bits), str(tmp_path / "b")).eval()
    assert_close(logits(reloaded), logits(model))


def training_batch():
    ids = input_ids(batch=4, seed=3)
    return ids, ids.roll(-1, dims=1)


def train(model, parameters, steps: int = 4) -> list[float]:
    optimizer = torch.optim.SGD(parameters, lr=0.05)
    ids, labels = training_batch()
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_training_matches_peft_and_leaves_the_quantized_base_alone(files, bits):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    model = lora_loader.attach(quantized_llama(files, bits))
    model.add_adapter(lora_loader.LoraConfig(**config), adapter_name="qlora")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(not p.dtype.is_floating_point for p in frozen.values())  # the 8-/4-bit weights are among them

    reference = peft.get_peft_model(quantized_llama(files, bits), peft.LoraConfig(**config), adapter_name="qlora")
    ours_init = {k: v.clone() for k, v in model.get_adapter_state_dict("qlora").items()}
    # Same start: peft's freshly initialised factors replaced by ours (B is zero in both).
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".qlora.weight", ".weight")
                p.copy_(ours_init[key])

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    our_losses = train(model, trainable)
    peft_losses = train(reference, [p for p in reference.parameters() if p.requires_grad])
    assert our_losses[-1] < our_losses[0]
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(peft_losses), atol=1e-4, rtol=0)

    trained = model.get_adapter_state_dict("qlora")
    for name, p in reference.named_parameters():
        if ".lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".qlora.weight", ".weight")
            torch.testing.assert_close(trained[key], p.detach(), atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(trained[k], ours_init[k]) for k in trained if "lora_B" in k)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), f"{name} changed during training"


def test_lycoris_kinds_add_the_same_change_on_a_quantized_base():
    """A LoHa or a full diff does not read the base weight: its output change on a 4-bit layer is the
    change it makes on the float layer it was quantized from (checked against lycoris elsewhere)."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantized = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"))
    quantized.load_state_dict(plain.state_dict())
    quantized = quantized.to("cpu")
    gen = torch.Generator().manual_seed(1)
    files = {
        "loha": {f"lora_unet_0.{k}": torch.randn(s, generator=gen) for k, s in
                 [("hada_w1_a", (64, 4)), ("hada_w1_b", (4, 64)), ("hada_w2_a", (64, 4)), ("hada_w2_b", (4, 64))]},
        "full": {"lora_unet_0.diff": torch.randn(64, 64, generator=gen) * 0.1},
    }
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        base_plain, base_quantized = plain(x), quantized(x)
        for model in (plain, quantized):
            lora_loader.attach(model)
            for name, tensors in files.items():
                tensors = dict(tensors, **{"lora_unet_0.alpha": torch.tensor(2.0)} if name == "loha" else {})
                model.load_lora_weights(tensors, adapter_name=name)
        for name in files:
            plain.set_adapters(name)
            quantized.set_adapters(name)
            change = plain(x) - base_plain
            assert change.abs().max() > 1e-2
            torch.testing.assert_close(quantized(x) - base_quantized, change, atol=1e-4, rtol=1e-4)
