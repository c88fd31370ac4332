"""The pipeline calls' contract (API.md sections 1 and 2): attach, load, blend, disable, delete.

Outputs are checked against independent references: the base model's own
output (disable must equal it bit for bit) and the dense math
``W + weight * alpha / r * B @ A`` computed here from the file's tensors.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from tiny import outputs, tiny_sd_pipeline, tiny_sdxl_pipeline, unet_inputs

import lora_loader
from lora_loader import LoraError, LoraNameError

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV1 = "down_blocks.0.resnets.0.conv1"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def kohya_lora(pipe, seed: int, rank: int = 2, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A Kohya-named LoRA on one attention projection, one 3x3 resnet conv and one text-encoder layer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    targets = {
        "lora_unet_" + TO_Q.replace(".", "_"): pipe.unet.get_submodule(TO_Q).weight,
        "lora_unet_" + CONV1.replace(".", "_"): pipe.unet.get_submodule(CONV1).weight,
        "lora_te_" + TE_Q.replace(".", "_"): pipe.text_encoder.get_submodule(TE_Q.removeprefix("text_model.")).weight,
    }
    for prefix, weight in targets.items():
        out_f, in_f, *kernel = weight.shape
        sd[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_f, *kernel, generator=g)
        sd[f"{prefix}.lora_up.weight"] = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g)
        if alpha is not None:
            sd[f"{prefix}.alpha"] = torch.tensor(alpha)
    return sd


def dense_delta(sd: dict, prefix: str) -> torch.Tensor:
    down, up = sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"]
    rank = down.shape[0]
    alpha = float(sd[f"{prefix}.alpha"]) if f"{prefix}.alpha" in sd else rank
    if down.dim() == 4:
        return alpha / rank * torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return alpha / rank * up @ down


@pytest.fixture(scope="module")
def base_outputs():
    return outputs(tiny_sd_pipeline(0))


# -- attach ----------------------------------------------------------------------------------------


def test_attach_returns_the_same_object_and_changes_only_that_instance():
    pipe, other = tiny_sd_pipeline(0), tiny_sd_pipeline(0)
    cls = type(pipe)
    assert lora_loader.attach(pipe) is pipe
    assert isinstance(pipe, lora_loader.LoraPipelineMixin)
    assert not isinstance(other, lora_loader.LoraPipelineMixin)
    assert type(other) is cls and cls is StableDiffusionPipeline
    assert "load_lora_weights" not in vars(StableDiffusionPipeline) or not issubclass(
        StableDiffusionPipeline, lora_loader.LoraPipelineMixin
    )


def test_attach_twice_is_a_no_op():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    cls = type(pipe)
    assert lora_loader.attach(pipe) is pipe and type(pipe) is cls


def test_attached_pipeline_saves_under_its_original_class_name(tmp_path):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_mixin_can_be_used_in_a_class_definition():
    class MyPipeline(lora_loader.LoraPipelineMixin, StableDiffusionPipeline):
        pass

    pipe = MyPipeline(**tiny_sd_pipeline(0).components)
    report = pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="x")
    assert report.adapter_name == "x" and pipe.get_active_adapters() == ["x"]


def test_attach_rejects_what_is_neither_pipeline_nor_module():
    with pytest.raises(LoraError, match="attach"):
        lora_loader.attach(object())


# -- the layer math --------------------------------------------------------------------------------


def test_loaded_lora_equals_the_dense_update_of_the_weights():
    """A loaded adapter gives the same output as W + alpha/r * up @ down written into the weights."""
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    sd = kohya_lora(pipe, 1, rank=2, alpha=1.0)
    pipe.load_lora_weights(sd, adapter_name="x")
    got = outputs(pipe)

    reference = tiny_sd_pipeline(0)
    with torch.no_grad():
        reference.unet.get_submodule(TO_Q).weight += dense_delta(sd, "lora_unet_" + TO_Q.replace(".", "_"))
        reference.unet.get_submodule(CONV1).weight += dense_delta(sd, "lora_unet_" + CONV1.replace(".", "_"))
        reference.text_encoder.get_submodule(TE_Q.removeprefix("text_model.")).weight += dense_delta(
            sd, "lora_te_" + TE_Q.replace(".", "_")
        )
    want = outputs(reference)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)


def test_blend_weights_scale_each_adapter_linearly(base_outputs):
    """With weights w1, w2 the UNet delta is w1 * delta1 + w2 * delta2 (exact up to float error)."""
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    sd1, sd2 = kohya_lora(pipe, 1), kohya_lora(pipe, 2, alpha=4.0)
    # Only the 1x1-free attention projection is linear in the weights end to end; check that layer.
    layer = pipe.unet.get_submodule(TO_Q)
    x = torch.randn(3, layer.in_features)
    pipe.load_lora_weights(sd1, adapter_name="a")
    pipe.load_lora_weights(sd2, adapter_name="b")
    pipe.set_adapters(["a", "b"], weights=[0.7, 0.3])
    prefix = "lora_unet_" + TO_Q.replace(".", "_")
    expected = torch.nn.functional.linear(
        x, layer.weight + 0.7 * dense_delta(sd1, prefix) + 0.3 * dense_delta(sd2, prefix), layer.bias
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# -- active set, weights, disable ---------------------------------------------------------------------


def test_default_names_count_up_and_a_load_activates_the_new_adapter_alone():
    """As diffusers+peft (tests/test_diffusers_compat.py compares with them): the newest load is active."""
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1))
    pipe.load_lora_weights(kohya_lora(pipe, 2))
    assert pipe.get_active_adapters() == ["default_1"]
    assert pipe.get_list_adapters() == {"unet": ["default_0", "default_1"], "text_encoder": ["default_0", "default_1"]}


def test_after_two_loads_the_outputs_are_the_second_adapter_alone():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.load_lora_weights(kohya_lora(pipe, 2), adapter_name="b")
    after_load = outputs(pipe)
    pipe.set_adapters(["a", "b"])
    both = outputs(pipe)
    pipe.set_adapters(["b"])
    for key, value in outputs(pipe).items():
        torch.testing.assert_close(value, after_load[key], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(both[key], after_load[key]), key


def test_disable_gives_the_base_outputs_exactly_and_enable_restores_the_blend(base_outputs):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.load_lora_weights(kohya_lora(pipe, 2), adapter_name="b")
    pipe.set_adapters(["a", "b"], weights=[0.7, 0.3])
    blended = outputs(pipe)
    assert not torch.allclose(blended["unet"], base_outputs["unet"])
    pipe.disable_lora()
    for key, value in outputs(pipe).items():
        assert torch.equal(value, base_outputs[key]), key
    pipe.enable_lora()
    for key, value in outputs(pipe).items():
        assert torch.equal(value, blended[key]), key


def test_full_pipeline_call_disabled_equals_the_never_loaded_pipeline():
    def run(p):
        return p("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    base = run(tiny_sd_pipeline(0))
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    assert not (run(pipe) == base).all()
    pipe.disable_lora()
    assert (run(pipe) == base).all()


def test_weight_zero_and_inactive_adapters_leave_layers_at_base(base_outputs):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.set_adapters("a", 0.0)
    assert all(torch.equal(v, base_outputs[k]) for k, v in outputs(pipe).items())
    pipe.load_lora_weights(kohya_lora(pipe, 2), adapter_name="b")
    pipe.set_adapters([], None)
    assert pipe.get_active_adapters() == []
    assert all(torch.equal(v, base_outputs[k]) for k, v in outputs(pipe).items())


def test_per_component_weights_apply_to_their_component_only(base_outputs):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.set_adapters("a", {"unet": 0.0})  # text_encoder not named: 1.0, as diffusers does
    out = outputs(pipe)
    assert torch.equal(out["unet"], base_outputs["unet"])
    assert not torch.equal(out["text_encoder"], base_outputs["text_encoder"])
    pipe.set_adapters("a", adapter_weights={"unet": 1.0, "text_encoder": 0.0})
    out = outputs(pipe)
    assert torch.equal(out["text_encoder"], base_outputs["text_encoder"])
    assert not torch.equal(out["unet"], base_outputs["unet"])


def test_block_weights_follow_the_transformer_each_layer_lives_in():
    """{"down": 0} silences down-block attentions and their resnets; other blocks keep their LoRA."""
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    sd = kohya_lora(pipe, 1)
    pipe.load_lora_weights(sd, adapter_name="a")
    pipe.set_adapters("a", {"unet": {"down": 0.0}})
    to_q, conv1 = pipe.unet.get_submodule(TO_Q), pipe.unet.get_submodule(CONV1)
    assert to_q._lora_active == [] and conv1._lora_active == []
    pipe.set_adapters("a", {"unet": {"down": {"block_0": [0.25, 1.0]}, "up": 0.0}})
    assert [f for _, f in to_q._lora_active] == [0.25]  # rank 2, no alpha: scale 1
    assert [f for _, f in conv1._lora_active] == [0.25]  # resnet 0 follows transformer 0


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"unet": {"sideways": 1.0}}, "down"),
        ({"unet": {"down": {"block_1": 1.0}}}, "block_1"),
        ({"unet": {"up": {"block_1": [1.0, 0.5]}}}, "expected 3 weights"),
        ({"down": 0.5}, "under 'unet'"),
        ({"text_encoder": {"down": 1.0}}, "block weights"),
        ("strong", "number"),
    ],
)
def test_bad_weights_raise_and_change_nothing(weights, message):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.set_adapters("a", 0.5)
    before = outputs(pipe)
    with pytest.raises(LoraError, match=message):
        pipe.set_adapters("a", weights)
    assert all(torch.equal(v, before[k]) for k, v in outputs(pipe).items())


def test_weights_list_must_match_the_names():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    with pytest.raises(LoraError, match="one weight per adapter"):
        pipe.set_adapters(["a"], [0.5, 0.5])


def test_unknown_adapter_name_in_set_adapters_changes_nothing():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    before = outputs(pipe)
    with pytest.raises(LoraNameError, match="'nope'"):
        pipe.set_adapters(["a", "nope"], [0.1, 0.2])
    assert pipe.get_active_adapters() == ["a"]
    assert all(torch.equal(v, before[k]) for k, v in outputs(pipe).items())


# -- delete --------------------------------------------------------------------------------------------


def test_delete_adapters_removes_tensors_and_unwraps_unused_layers(base_outputs):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    module_types = {n: type(m) for n, m in pipe.unet.named_modules()}
    keys = list(pipe.unet.state_dict())
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    pipe.load_lora_weights(kohya_lora(pipe, 2), adapter_name="b")
    to_q = pipe.unet.get_submodule(TO_Q)
    down_b = to_q.lora_adapters["b"].down
    pipe.delete_adapters("b")
    assert list(to_q.lora_adapters) == ["a"]
    assert pipe.get_active_adapters() == ["a"] and pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    # Nothing of ours holds adapter b's tensor any more.
    assert all(down_b is not p for p in pipe.unet.parameters())
    pipe.delete_adapters(["a"])
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == module_types
    assert list(pipe.unet.state_dict()) == keys
    assert all(torch.equal(v, base_outputs[k]) for k, v in outputs(pipe).items())
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}


def test_deleted_adapter_memory_is_freed():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    import weakref

    ref = weakref.ref(pipe.unet.get_submodule(TO_Q).lora_adapters["a"].down)
    outputs(pipe)
    pipe.delete_adapters("a")
    gc.collect()
    assert ref() is None


def test_a_deleted_name_can_be_loaded_again():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    first = outputs(pipe)
    pipe.delete_adapters("a")
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    assert all(torch.equal(v, first[k]) for k, v in outputs(pipe).items())


# -- pipeline variants and shared components ------------------------------------------------------------


@pytest.mark.parametrize("variant", ["img2img", "inpaint", "controlnet"])
def test_variants_built_from_the_same_components_share_the_adapters(variant):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(kohya_lora(pipe, 1), adapter_name="a")
    if variant == "img2img":
        other = StableDiffusionImg2ImgPipeline(**pipe.components)
    elif variant == "inpaint":
        other = StableDiffusionInpaintPipeline(**pipe.components)
    else:
        other = StableDiffusionControlNetPipeline(**pipe.components, controlnet=ControlNetModel.from_unet(pipe.unet))
    other = lora_loader.attach(other)
    assert other.get_list_adapters() == pipe.get_list_adapters()
    other.load_lora_weights(kohya_lora(pipe, 2), adapter_name="b")
    other.set_adapters(["b"])
    assert pipe.get_active_adapters() == ["b"]
    other.disable_lora()
    assert all(torch.equal(v, outputs(tiny_sd_pipeline(0))[k]) for k, v in outputs(pipe).items())


def test_sdxl_pipeline_components_are_unet_and_both_text_encoders():
    pipe = lora_loader.attach(tiny_sdxl_pipeline(0))
    g = torch.Generator().manual_seed(0)
    path = "encoder.layers.0.self_attn.q_proj"
    sd = {}
    # transformers 5: CLIPTextModel has no .text_model any more, CLIPTextModelWithProjection keeps it;
    # Kohya files spell both with text_model_.
    for prefix, encoder, live in (
        ("lora_te1_text_model_", pipe.text_encoder, path),
        ("lora_te2_text_model_", pipe.text_encoder_2, "text_model." + path),
    ):
        w = encoder.get_submodule(live).weight
        sd[prefix + path.replace(".", "_") + ".lora_down.weight"] = torch.randn(2, w.shape[1], generator=g)
        sd[prefix + path.replace(".", "_") + ".lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g)
    report = pipe.load_lora_weights(sd, adapter_name="te")
    assert report.modules == {"text_encoder": 1, "text_encoder_2": 1}
    assert pipe.get_list_adapters() == {"text_encoder": ["te"], "text_encoder_2": ["te"]}
    before = unet_inputs(pipe)
    assert pipe.unet(**before).sample.shape[0] == 2


# -- any nn.Module -----------------------------------------------------------------------------------------


def test_a_plain_module_is_one_component():
    model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    x = torch.randn(5, 4)
    base = model(x)
    down, up = torch.randn(3, 4), torch.randn(8, 3)
    report = model.load_lora_weights({"0.lora_A.weight": down, "0.lora_B.weight": up}, adapter_name="x")
    assert report.modules == {"model": 1}
    expected = torch.nn.functional.linear(x, model[0].weight + up @ down / 3 * 3, model[0].bias)
    torch.testing.assert_close(model[0](x), expected, atol=1e-5, rtol=1e-5)
    model.disable_lora()
    assert torch.equal(model(x), base)
