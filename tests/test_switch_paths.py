"""What the switch fast paths must keep exact (issue 22 item 3): a ``set_adapters`` that only changes
weights writes the adapters' scales in place (on the CPU through a numpy view of each 0-d scale) and
keeps every layer's list, and ``disable_lora`` / ``enable_lora`` flip one gate per component.

Each test compares against a model that never took the fast path: a fresh copy of the same base with
the same adapters, set once to the state under test (``torch.equal``), or the base model itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_loader
from lora_loader import LoraConfig


def base_model(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).to(dtype)


def lora(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in (0, 2, 4):
        out[f"{i}.lora_A.weight"] = torch.randn(2, 16, generator=g).to(dtype)
        out[f"{i}.lora_B.weight"] = torch.randn(16, 2, generator=g).to(dtype)
    return out


def loaded(base: nn.Module, names=("a", "b", "c"), dtype=torch.float32) -> nn.Module:
    model = lora_loader.attach(copy.deepcopy(base))
    for i, name in enumerate(names):
        model.load_lora_weights(lora(10 + i, dtype), adapter_name=name)
    return model


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_walk_of_weight_changes_disables_and_enables_equals_setting_each_state_once(dtype):
    """Weights only (the fast path), new active sets, zero weights (a layer list changes), disable and
    enable in between: every state's output equals a fresh model set to that state once."""
    base = base_model(dtype)
    model = loaded(base, dtype=dtype)
    x = torch.randn(3, 16).to(dtype)
    steps = [
        (["a"], [0.5]), (["a"], [1.0]), (["a"], [0.3]), "disable", (["a"], [0.7]), "enable", (["a", "b"], [0.2, 0.9]),
        (["a", "b"], [0.9, 0.2]), (["a", "b"], [0.0, 0.4]), (["a", "b"], [0.6, 0.4]), "disable", "enable",
        (["c"], [1.0]), (["c"], [-0.5]), (["b", "c"], [1.0, 1.0]), (["b", "c"], [0.25, 1.5]),
    ]
    enabled, state = True, None
    for step in steps:
        if step == "disable":
            model.disable_lora()
            enabled = False
        elif step == "enable":
            model.enable_lora()
            enabled = True
        else:
            model.set_adapters(*step)
            state = step
        reference = loaded(base, dtype=dtype)
        reference.set_adapters(*state)
        if not enabled:
            reference.disable_lora()
        assert torch.equal(run(model, x), run(reference, x)), f"after {step}"
    model.disable_lora()
    assert torch.equal(run(model, x), run(base, x))


def test_a_weight_change_reaches_the_concatenation_of_two_adapters():
    """Two active adapters run as one concatenated pair, cached against their scales: a weight-only change
    (which moves no version counter on the CPU) must make a new one."""
    base = base_model()
    model, x = loaded(base), torch.randn(3, 16)
    model.set_adapters(["a", "b"], [0.5, 0.5])
    run(model, x)  # builds the cache
    model.set_adapters(["a", "b"], [0.5, 1.5])
    reference = loaded(base)
    reference.set_adapters(["a", "b"], [0.5, 1.5])
    assert torch.equal(run(model, x), run(reference, x))


@pytest.mark.parametrize("how", ["deepcopy", "to"])
def test_a_copied_or_converted_model_writes_its_own_scales(how):
    """The numpy view of a scale belongs to one tensor: a deepcopy or a ``.to()`` of the model gets its
    own, so a switch of the copy leaves the original alone and reaches the copy."""
    base = base_model()
    model, x = loaded(base), torch.randn(3, 16)
    model.set_adapters(["a"], [0.5])
    before = run(model, x)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        model.to(torch.float64)
        model.set_adapters(["a"], [0.25])
        reference = loaded(base.to(torch.float64))
        reference.set_adapters(["a"], [0.25])
        assert torch.equal(run(model, x.double()), run(reference, x.double()))
        return
    other.set_adapters(["a"], [0.25])
    assert torch.equal(run(model, x), before)
    reference = loaded(base)
    reference.set_adapters(["a"], [0.25])
    assert torch.equal(run(other, x), run(reference, x))


def test_a_switch_between_forward_and_backward_leaves_the_recorded_forward_as_it_ran():
    """A forward that autograd records keeps a copy of each scale, so a ``set_adapters`` before the
    backward (whose write moves no version counter) gives the gradients of the forward that ran."""
    base = base_model()
    x = torch.randn(3, 16)

    def trained(switch: bool):
        model = lora_loader.attach(copy.deepcopy(base))
        torch.manual_seed(1)
        model.add_adapter(LoraConfig(r=2, target_modules=["0", "2", "4"], init_lora_weights=False), adapter_name="a")
        model.add_adapter(LoraConfig(r=2, target_modules=["0", "2", "4"], init_lora_weights=False), adapter_name="b")
        for name in ("a", "b"):
            for _, module in model.named_modules():
                if hasattr(module, "lora_adapters") and name in module.lora_adapters:
                    for p in module.lora_adapters[name].parameters():
                        p.requires_grad_(True)
        model.set_adapters(["a", "b"], [0.5, 2.0])
        loss = model(x).square().sum()
        if switch:
            model.set_adapters(["a", "b"], [3.0, -1.0])
        loss.backward()
        return [p.grad.clone() for name, p in model.named_parameters() if "lora_adapters" in name and p.grad is not None]

    switched, plain = trained(True), trained(False)
    assert len(plain) == 12
    assert all(torch.equal(g, h) for g, h in zip(switched, plain))


def test_disable_of_one_component_leaves_the_others_running():
    """A pipeline's component-level ``disable_lora`` closes that component's gate only."""
    from diffusers import StableDiffusionPipeline  # noqa: F401  (the tiny pipeline below is diffusers')
    from tiny import tiny_sd_pipeline  # tests/tiny.py

    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    unet, te = pipe.unet, pipe.text_encoder
    layer_u = next(m for m in unet.modules() if isinstance(m, nn.Linear))
    layer_t = next(m for m in te.modules() if isinstance(m, nn.Linear))
    names = {m: n for n, m in unet.named_modules()} | {m: n for n, m in te.named_modules()}
    sd = {}
    g = torch.Generator().manual_seed(3)
    for prefix, layer in (("unet", layer_u), ("text_encoder", layer_t)):
        sd[f"{prefix}.{names[layer]}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g)
        sd[f"{prefix}.{names[layer]}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g)
    pipe.load_lora_weights(sd, adapter_name="a")
    xu, xt = torch.randn(2, layer_u.in_features), torch.randn(2, layer_t.in_features)
    on_u, on_t = run(layer_u, xu), run(layer_t, xt)
    unet.disable_lora()
    off_u = run(layer_u, xu)
    assert torch.equal(off_u, nn.functional.linear(xu, layer_u.weight, layer_u.bias))
    assert torch.equal(run(layer_t, xt), on_t)
    pipe.set_adapters("a", 0.5)  # a weight change while the UNet is disabled
    assert torch.equal(run(layer_u, xu), off_u)
    unet.enable_lora()
    reference = lora_loader.attach(tiny_sd_pipeline(0))
    reference.load_lora_weights(sd, adapter_name="a")
    reference.set_adapters("a", 0.5)
    ref_u = reference.unet.get_submodule(names[layer_u])
    assert torch.equal(run(layer_u, xu), run(ref_u, xu))
    assert not torch.equal(run(layer_u, xu), on_u)
