"""Fuse, unfuse, unload and the per-call scale (API.md section 2).

References: the unfused forward of the same adapters, diffusers+peft's own
fuse of the same file, and the never-loaded pipeline's tensors.
"""

from __future__ import annotations

import pytest
import torch
from test_api import kohya_lora
from tiny import outputs, tiny_sd_pipeline, unet_inputs

import lora_loader
from lora_loader import LoraError


def _blend(pipe):
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.load_lora_weights(kohya_lora(pipe, 2, alpha=1.0), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])


def _equal(left: dict, right: dict) -> bool:
    return all(torch.equal(left[k], right[k]) for k in left)


def _close(left: dict, right: dict, atol=1e-4) -> None:
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=1e-4)


def test_fused_outputs_equal_the_unfused_blend_and_unfuse_restores_bit_for_bit():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    unfused = outputs(pipe)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.fuse_lora()
    assert not _equal({k: v for k, v in pipe.unet.state_dict().items()}, weights)
    _close(outputs(pipe), unfused)
    pipe.unfuse_lora()
    assert _equal(dict(pipe.unet.state_dict()), weights)
    assert _equal(outputs(pipe), unfused)


def test_fused_outputs_match_diffusers_fuse_of_the_same_files(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from producers import peft_lora, save_diffusers_lora

    files = []
    for seed, alpha in ((1, 8), (2, 2)):
        configs = {
            "unet": LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False),
            "text_encoder": LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj"], init_lora_weights=False),
        }
        state_dicts = peft_lora(tiny_sd_pipeline, seed, configs)
        files.append(save_diffusers_lora(tmp_path, StableDiffusionPipeline, state_dicts, configs, f"l{seed}.safetensors"))
    oracle, pipe = tiny_sd_pipeline(0), lora_loader.attach(tiny_sd_pipeline(0))
    for name, path in zip("ab", files):
        oracle.load_lora_weights(path, adapter_name=name)
        pipe.load_lora_weights(path, adapter_name=name)
    oracle.set_adapters(["a", "b"], [0.7, 0.3])
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    oracle.fuse_lora()
    pipe.fuse_lora()
    assert not _equal(outputs(pipe), outputs(tiny_sd_pipeline(0)))
    _close(outputs(pipe), outputs(oracle))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_five_fuse_unfuse_cycles_leave_zero_changed_tensors(dtype):
    pipe = lora_loader.attach(tiny_sd_pipeline(0).to(dtype))
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in ("unet", "text_encoder")}
    _blend(pipe)
    for _ in range(5):
        pipe.fuse_lora()
        pipe.unfuse_lora()
    for name, tensors in before.items():
        changed = [k for k, v in getattr(pipe, name).state_dict().items() if not torch.equal(v, tensors[k])]
        assert changed == []


@pytest.mark.parametrize("disabled_while_moved", [False, True])
def test_moving_a_fused_pipeline_moves_what_unfuse_restores(disabled_while_moved):
    """`pipe.to(...)` after `fuse_lora()`: unfuse and disable give the converted base model exactly.

    A dtype change stands in for a device move (both are `nn.Module._apply`); the
    reference is the never-loaded pipeline converted the same way.
    """
    base = tiny_sd_pipeline(0).to(torch.float64)
    unfused = lora_loader.attach(tiny_sd_pipeline(0).to(torch.float64))
    _blend(unfused)
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    pipe.fuse_lora()
    if disabled_while_moved:
        pipe.disable_lora()
    pipe.to(torch.float64)
    if disabled_while_moved:
        pipe.enable_lora()
    _close(outputs(pipe), outputs(unfused))  # the fused weights moved with the model
    pipe.disable_lora()
    assert _equal(outputs(pipe), outputs(base))
    pipe.enable_lora()
    pipe.unfuse_lora()
    for name in ("unet", "text_encoder"):
        tensors = getattr(base, name).state_dict()
        assert all(torch.equal(v, tensors[k]) for k, v in getattr(pipe, name).state_dict().items())
    _close(outputs(pipe), outputs(unfused))  # unfused again (blend factors rounded in fp32 before the move)


def test_lora_scale_applies_to_that_fuse_only():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    before = outputs(pipe)
    pipe.fuse_lora(lora_scale=0.5)
    fused_half = outputs(pipe)
    pipe.unfuse_lora()
    assert _equal(outputs(pipe), before)  # the set_adapters weights are untouched
    pipe.set_adapters(["a", "b"], [0.35, 0.15])
    _close(fused_half, outputs(pipe))


def test_disable_on_a_fused_model_gives_the_base_and_enable_the_fused_outputs():
    base = outputs(tiny_sd_pipeline(0))
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    pipe.fuse_lora()
    fused = outputs(pipe)
    pipe.disable_lora()
    assert _equal(outputs(pipe), base)
    pipe.enable_lora()
    assert _equal(outputs(pipe), fused)


def test_a_fused_adapter_cannot_be_deleted_until_unfused():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    pipe.fuse_lora(adapter_names=["a"])
    with pytest.raises(LoraError, match="unfuse_lora"):
        pipe.delete_adapters("a")
    pipe.unfuse_lora()
    pipe.delete_adapters("a")
    assert pipe.get_active_adapters() == ["b"]


def test_unload_gives_back_the_never_loaded_model_structure_keys_and_tensors():
    reference = tiny_sd_pipeline(0)
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    pipe.unload_lora_weights()
    for name in ("unet", "text_encoder"):
        ours, theirs = getattr(pipe, name), getattr(reference, name)
        # The component itself stays attached (its class a subclass of its own, with its name in the
        # pipeline and the pipeline's registry), so pipe.unet.add_adapter(...) keeps working; every
        # module inside is the plain one again.
        assert type(ours).__bases__ == (lora_loader.LoraModelMixin, type(theirs))
        assert {k for k in vars(ours) if k.startswith("_lora")} == {"_lora_component_name", "_lora_registry_state"}
        inner = lambda model: [(n, type(m)) for n, m in model.named_modules() if n]  # noqa: E731
        assert inner(ours) == inner(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
        assert not any(k.startswith("_lora") for n, m in ours.named_modules() if n for k in vars(m))
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []


def test_fuse_then_unload_bakes_the_lora_into_plain_modules():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    unfused = outputs(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert {type(m).__name__ for m in pipe.unet.modules()}.isdisjoint({"LoraLinear", "LoraConv2d"})
    _close(outputs(pipe), unfused)


def test_a_per_call_scale_scales_that_call_only():
    base = tiny_sd_pipeline(0)

    def run(p, **kwargs):
        return p("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0), **kwargs).images

    base_image = run(base)
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    full = run(pipe)
    assert (run(pipe, cross_attention_kwargs={"scale": 0.0}) == base_image).all()
    half = run(pipe, cross_attention_kwargs={"scale": 0.5})
    assert not (half == full).all()
    pipe.set_adapters(["a", "b"], [0.35, 0.15])
    assert abs(run(pipe) - half).max() < 1e-4
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    assert (run(pipe) == full).all()  # neither call changed the set_adapters weights


def test_a_unet_call_with_a_scale_scales_only_that_call():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    unet = lora_loader.attach(pipe.unet)
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        full = unet(**inputs).sample
        zero = unet(**inputs, cross_attention_kwargs={"scale": 0.0}).sample
        again = unet(**inputs).sample
    assert torch.equal(zero, tiny_sd_pipeline(0).unet(**inputs).sample)
    assert torch.equal(again, full)


def test_set_lora_device_moves_the_named_adapters_and_checks_names():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    _blend(pipe)
    before = outputs(pipe)
    pipe.set_lora_device(["a"], torch.device("cpu"))
    assert _equal(outputs(pipe), before)
    with pytest.raises(LoraError, match="'nope'"):
        pipe.set_lora_device(["nope"], "cpu")


def _rss_bytes() -> int:
    """Resident memory, after handing the allocator's free pages back to the OS (glibc keeps freed
    heap memory otherwise, and what it keeps depends on what ran before: the test would be flaky)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


def test_delete_adapters_gives_the_memory_back():
    """RSS after delete_adapters returns to where it was before the load, within a tenth of the adapter's size."""
    import gc

    model = lora_loader.attach(torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]))
    gc.collect()
    before = _rss_bytes()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(8):
        sd[f"{i}.lora_A.weight"] = torch.randn(512, 1024, generator=g)
        sd[f"{i}.lora_B.weight"] = torch.randn(1024, 512, generator=g)
    adapter_bytes = sum(t.numel() * t.element_size() for t in sd.values())  # 32 MiB
    model.load_lora_weights(sd, adapter_name="big")
    del sd
    gc.collect()
    loaded = _rss_bytes()
    model.delete_adapters("big")
    gc.collect()
    after = _rss_bytes()
    assert loaded - before > 0.5 * adapter_bytes  # the load really held the adapter
    assert after - before < 0.1 * adapter_bytes
