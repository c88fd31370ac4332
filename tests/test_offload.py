"""Adapters on models dispatched and offloaded by accelerate, and on offloaded diffusers pipelines (issue 7, part 2).

The reference is always the same model, not dispatched, with the same adapters.
Dispatching here puts layers on the CPU and on disk (``offload_dir``): their
weights are meta tensors between calls and accelerate's ``AlignDevicesHook``
loads them for each forward, exactly as with a GPU as the execution device.
Every test also checks that lora_loader leaves accelerate's hooks as they were
(diffusers#10914: diffusers' loader removes and re-adds them, and can leave
sequential offloading switched on behind the user's back).
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from accelerate import cpu_offload, dispatch_model, disk_offload
from llm_tiny import input_ids, peft_adapter, tiny_llama, tiny_opt
from test_api import kohya_lora
from tiny import outputs, tiny_sd_pipeline

import lora_loader

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

# Layer 1 and the LM head on disk, the rest in CPU memory: both kinds of offload in one model.
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
    "b": dict(r=2, lora_alpha=3, target_modules=["k_proj", "o_proj", "up_proj"]),
    "dora": dict(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj", "gate_proj"]),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_adapters")
    return {
        name: peft_adapter(tiny_llama(0), peft.LoraConfig(init_lora_weights=False, **kwargs), root / name, seed=seed)
        for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1)
    }


def hooks(model: torch.nn.Module) -> dict[str, object]:
    return {name: module._hf_hook for name, module in model.named_modules() if hasattr(module, "_hf_hook")}


def offloaded_files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=input_ids()).logits


def reference(adapters, *names, weights=None):
    model = lora_loader.attach(tiny_llama(0))
    for name in names:
        model.load_adapter(adapters[name], adapter_name=name)
    if weights is not None:
        model.set_adapters(list(names), weights)
    return model


def dispatched(tmp_path, how: str = "device_map"):
    model = tiny_llama(0)
    folder = str(tmp_path / "offload")
    if how == "device_map":
        model = dispatch_model(model, device_map=DEVICE_MAP, main_device="cpu", offload_dir=folder)
    elif how == "cpu_offload":
        model = cpu_offload(model, execution_device="cpu")
    else:
        model = disk_offload(model, offload_dir=folder, execution_device="cpu")
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta  # really offloaded
    return lora_loader.attach(model), folder


@pytest.mark.parametrize("how", ["device_map", "cpu_offload", "disk_offload"])
def test_load_onto_an_offloaded_model_gives_the_undispatched_outputs(adapters, tmp_path, how):
    model, _ = dispatched(tmp_path, how)
    before = hooks(model)
    model.load_adapter(adapters["a"], adapter_name="a")
    model.load_adapter(adapters["dora"], adapter_name="dora")
    base = logits(tiny_llama(0))
    expected = logits(reference(adapters, "a", "dora"))
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    assert hooks(model) == before  # the same hook objects on the same modules
    q_proj = model.model.layers[1].self_attn.q_proj
    assert q_proj.weight.is_meta  # still offloaded
    assert q_proj.lora_adapters["a"].down.device == torch.device(q_proj._hf_hook.execution_device)


def test_offloading_a_model_that_already_has_adapters(adapters, tmp_path):
    """accelerate hooks every child holding tensors; adapters stay the adapters' own (not turned into meta)."""
    model = lora_loader.attach(tiny_llama(0))
    model.load_adapter(adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    model.set_adapters(["a", "b"], [0.6, 0.9])
    expected = logits(model)
    model = dispatch_model(model, device_map=DEVICE_MAP, main_device="cpu", offload_dir=str(tmp_path / "off"))
    adapter = model.model.layers[1].self_attn.q_proj.lora_adapters["a"]
    assert not adapter.down.is_meta and not hasattr(adapter, "_hf_hook")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_blend_disable_and_delete_on_an_offloaded_model(adapters, tmp_path):
    model, _ = dispatched(tmp_path)
    for name in ("a", "b"):
        model.load_adapter(adapters[name], adapter_name=name)
    model.set_adapters(["a", "b"], [0.5, -1.5])
    torch.testing.assert_close(logits(model), logits(reference(adapters, "a", "b", weights=[0.5, -1.5])), atol=1e-5, rtol=0)
    model.disable_adapters()
    assert torch.equal(logits(model), logits(tiny_llama(0)))
    model.enable_adapters()
    model.delete_adapters("a")
    torch.testing.assert_close(logits(model), logits(reference(adapters, "b", weights=[-1.5])), atol=1e-5, rtol=0)


def test_fuse_writes_the_weights_map_and_unfuse_restores_it_without_touching_the_files_on_disk(adapters, tmp_path):
    model, folder = dispatched(tmp_path)
    for name in ("a", "dora"):
        model.load_adapter(adapters[name], adapter_name=name)
    unfused, files, before = logits(model), offloaded_files(folder), hooks(model)
    expected = reference(adapters, "a", "dora")
    expected.fuse_lora()

    model.fuse_lora()
    fused = logits(model)
    torch.testing.assert_close(fused, logits(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)
    model.disable_lora()
    assert torch.equal(logits(model), logits(tiny_llama(0)))
    model.enable_lora()
    assert torch.equal(logits(model), fused)

    model.unfuse_lora()
    assert torch.equal(logits(model), unfused)
    model.disable_lora()
    assert torch.equal(logits(model), logits(tiny_llama(0)))  # the original weights, from memory and from disk
    assert offloaded_files(folder) == files
    assert hooks(model) == before


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_offloading_a_fused_model_then_unfusing_gives_the_unfused_model_back(adapters, tmp_path, how):
    """Offloading after fuse_lora: the hook's weights map holds the fused weights; unfuse and disable
    put the originals there (in memory: the files accelerate wrote are not touched)."""
    model = reference(adapters, "a", "dora")
    unfused = logits(model)
    model.fuse_lora()
    fused = logits(model)
    folder = str(tmp_path / "off")
    model = cpu_offload(model, execution_device="cpu") if how == "cpu_offload" else disk_offload(model, offload_dir=folder, execution_device="cpu")
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    files = offloaded_files(folder) if how == "disk_offload" else None
    assert torch.equal(logits(model), fused)
    model.disable_lora()
    assert torch.equal(logits(model), logits(tiny_llama(0)))
    model.enable_lora()
    assert torch.equal(logits(model), fused)
    model.unfuse_lora()
    torch.testing.assert_close(logits(model), unfused, atol=1e-6, rtol=0)
    model.disable_lora()
    assert torch.equal(logits(model), logits(tiny_llama(0)))
    if files is not None:
        assert offloaded_files(folder) == files


def test_unload_gives_the_hooks_back_the_plain_forward(adapters, tmp_path):
    model, _ = dispatched(tmp_path)
    model.load_adapter(adapters["a"], adapter_name="a")
    model.unload_lora_weights()
    q_proj = model.model.layers[1].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj._old_forward.__func__ is torch.nn.Linear.forward
    assert torch.equal(logits(model), logits(tiny_llama(0)))


def test_transformers_from_pretrained_with_an_auto_device_map_and_disk_offload(adapters, tmp_path):
    """The map accelerate's "auto" computes for a CPU budget too small for the model (the rest on disk), given
    to ``from_pretrained``: transformers ignores ``max_memory`` when no accelerator exists, so "auto" itself
    would put everything on the CPU here."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import LlamaForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(tiny_llama(0).config)
    device_map = infer_auto_device_map(
        skeleton, max_memory={"cpu": 20_000, "disk": 10**9}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert {"cpu", "disk"} <= set(device_map.values())
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map, offload_folder=str(tmp_path / "off"))
    lora_loader.attach(model).load_adapter(adapters["a"], adapter_name="a")
    torch.testing.assert_close(logits(model), logits(reference(adapters, "a")), atol=1e-5, rtol=0)


# -- full module copies (modules_to_save) and bias deltas -------------------------------------------------


def _offloaded_opt(how: str, folder: str, model=None):
    model = tiny_opt(0) if model is None else model
    if how == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    return disk_offload(model, offload_dir=folder, execution_device="cpu")


@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
@pytest.mark.parametrize("order", ["offload-then-load", "load-then-offload"])
def test_module_copies_and_bias_deltas_on_an_offloaded_model(tmp_path, bias, how, order):
    """PEFT's modules_to_save copies and bias deltas read their base tensors from the hook's weights map:
    a copy made of an offloaded module is a real module (not the module's meta tensors and hook)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], modules_to_save=["lm_head"],
                             bias=bias, init_lora_weights=False)
    folder = peft_adapter(tiny_opt(0), config, tmp_path / "adapter", seed=3)
    expected = lora_loader.attach(tiny_opt(0))
    expected.load_adapter(folder, adapter_name="a")
    if order == "offload-then-load":
        model = lora_loader.attach(_offloaded_opt(how, str(tmp_path / "off")))
        model.load_adapter(folder, adapter_name="a")
    else:
        model = lora_loader.attach(tiny_opt(0))
        model.load_adapter(folder, adapter_name="a")
        model = _offloaded_opt(how, str(tmp_path / "off"), model)
    assert model.lm_head.weight.is_meta and model.model.decoder.layers[0].fc1.bias.is_meta  # really offloaded
    assert (logits(expected) - logits(tiny_opt(0))).abs().max() > 1e-3
    torch.testing.assert_close(logits(model), logits(expected), atol=1e-5, rtol=0)
    mine, theirs = model.get_adapter_state_dict("a"), expected.get_adapter_state_dict("a")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    model.disable_adapters()
    assert torch.equal(logits(model), logits(tiny_opt(0)))


def test_training_an_adapter_with_copies_and_biases_on_an_offloaded_model_matches_the_plain_model(tmp_path):
    config = lora_loader.LoraConfig(r=4, target_modules=["q_proj", "fc1"], modules_to_save=["lm_head"], bias="all")
    models = {"plain": lora_loader.attach(tiny_opt(0)),
              "offloaded": lora_loader.attach(_offloaded_opt("disk_offload", str(tmp_path / "off")))}
    for model in models.values():
        torch.manual_seed(0)
        model.add_adapter(config, adapter_name="mine")
        model.set_adapter("mine")
        assert torch.equal(logits(model), logits(tiny_opt(0)))  # a new adapter starts as the base model
        copy = model.lm_head.lora_copies["mine"]
        assert not copy.weight.is_meta and torch.equal(copy.weight, tiny_opt(0).lm_head.weight)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ids = input_ids()
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    trained = {name: model.get_adapter_state_dict("mine") for name, model in models.items()}
    assert trained["plain"].keys() == trained["offloaded"].keys()
    assert not torch.equal(trained["plain"]["lm_head.weight"], tiny_opt(0).lm_head.weight)  # the copy trained
    for key, value in trained["offloaded"].items():
        torch.testing.assert_close(value, trained["plain"][key], atol=1e-6, rtol=0)


# -- diffusers pipelines --------------------------------------------------------------------------------


def _offload(pipe, how: str) -> None:
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
        return
    # What pipe.enable_sequential_cpu_offload() does to each component, with the CPU as execution device:
    # diffusers itself refuses a CPU there (and its "cpu:0" trips accelerate's tied-weight bookkeeping).
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)


@pytest.mark.parametrize("how", ["model", "sequential"])
@pytest.mark.parametrize("order", ["offload-then-load", "load-then-offload"])
def test_offloaded_pipelines_load_blend_and_fuse_like_the_plain_pipeline(how, order):
    expected = lora_loader.attach(tiny_sd_pipeline(0))
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    files = [kohya_lora(expected, 1), kohya_lora(expected, 2, alpha=1.0)]
    if order == "offload-then-load":
        _offload(pipe, how)
    for target in (expected, pipe):
        target.load_lora_weights(files[0], adapter_name="a")
        target.load_lora_weights(files[1], adapter_name="b")
        target.set_adapters(["a", "b"], [0.7, 0.3])
    if order == "load-then-offload":
        _offload(pipe, how)
    before = hooks(pipe.unet)
    assert before  # offloading is on
    if how == "sequential":
        assert pipe.unet.conv_in.weight.is_meta

    blend = outputs(expected)
    for key, value in outputs(pipe).items():
        torch.testing.assert_close(value, blend[key], atol=1e-5, rtol=0)
    expected.fuse_lora()
    pipe.fuse_lora()
    fused = outputs(expected)
    for key, value in outputs(pipe).items():
        torch.testing.assert_close(value, fused[key], atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    for key, value in outputs(pipe).items():
        torch.testing.assert_close(value, blend[key], atol=1e-6, rtol=0)
    assert hooks(pipe.unet) == before  # offloading neither switched off nor re-done behind the user's back


def test_a_pipeline_without_offloading_gets_no_hooks():
    """diffusers#10914: diffusers' loader switched sequential offloading on for a model that never had it."""
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        assert not hooks(component)
