"""diffusers code runs unchanged on an attached pipeline (issue 16): the calls diffusers' own LoRA tests
and training scripts make, checked against diffusers+peft doing the same on an identical pipeline.

- component-level adapters (``pipe.unet.add_adapter(cfg, "a")`` + ``pipe.text_encoder.add_adapter(cfg, "a")``)
  are one adapter of the pipeline: listed per component, blended, disabled, deleted, fused and unloaded by
  the pipeline's calls, while component-level calls act on their component only;
- after a load the new adapter alone is active in the components it adapts, and deleting the active
  adapter activates the remaining one (peft's rule), for pipelines and for transformers models;
- ``num_fused_loras`` / ``fused_loras`` report lora_loader's fuses;
- the errors diffusers raises as ``ValueError`` are ``ValueError``s;
- the training flow: ``add_adapter`` on the components, train, the pipeline class's
  ``save_lora_weights(dir, unet_lora_layers=..., text_encoder_lora_layers=...)``, load in a fresh pipeline;
  and the classmethods ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``.
"""

from __future__ import annotations

import peft
import pytest
import torch
from diffusers import StableDiffusionPipeline
from llm_tiny import input_ids, logits, peft_adapter, tiny_llama
from peft.utils import set_peft_model_state_dict
from producers import peft_lora, save_diffusers_lora
from tiny import outputs, tiny_sd_pipeline, tiny_sdxl_pipeline
from tiny_dit import run, tiny_flux_pipeline, tiny_sd3_pipeline

import lora_loader
from lora_loader import LoraConfig, LoraError, LoraFileError

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TOLERANCE = 1e-4


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=TOLERANCE, rtol=0, msg=key)


def differs(a: dict, b: dict) -> bool:
    return any((a[k] - b[k]).abs().max() > 1e-3 for k in a)


def sd_file(folder, seed: int, components=("unet", "text_encoder"), alpha: int = 8, rank: int = 4):
    """A diffusers-layout file written by peft + StableDiffusionPipeline.save_lora_weights."""
    configs = {
        "unet": peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False),
        "text_encoder": peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_TARGETS, init_lora_weights=False),
    }
    configs = {c: configs[c] for c in components}
    state_dicts = peft_lora(tiny_sd_pipeline, seed, configs)
    folder.mkdir(parents=True, exist_ok=True)
    return save_diffusers_lora(folder, StableDiffusionPipeline, state_dicts, configs, f"lora{seed}.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return {"a": sd_file(root / "a", 1), "b": sd_file(root / "b", 2), "unet_only": sd_file(root / "u", 3, ("unet",)),
            "unet_rank8": sd_file(root / "u8", 4, ("unet",), rank=8, alpha=4)}


def both():
    """An attached pipeline and diffusers+peft's, with identical weights."""
    return lora_loader.attach(tiny_sd_pipeline(0)), tiny_sd_pipeline(0)


# -- activation after loads and deletes -----------------------------------------------------------------


def test_after_two_loads_the_second_is_active_as_in_diffusers(files):
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
        pipe.load_lora_weights(files["b"], adapter_name="b")
    assert mine.get_active_adapters() == theirs.get_active_adapters() == ["b"]
    assert_same(outputs(mine), outputs(theirs))


def test_a_load_that_skips_a_component_leaves_that_components_adapter_on_as_in_diffusers(files):
    """peft keeps an active list per component: a UNet-only load does not switch the text encoder's adapter."""
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
        pipe.load_lora_weights(files["unet_only"], adapter_name="u")
    # diffusers reports the last adapted component's list (the text encoder's): "a" is still on there.
    assert mine.get_active_adapters() == theirs.get_active_adapters() == ["a"]
    assert mine.unet.active_adapters() == theirs.unet.active_adapters() == ["u"]
    got, want = outputs(mine), outputs(theirs)
    assert_same(got, want)
    assert differs(got, outputs(tiny_sd_pipeline(0)))


def test_deleting_the_active_adapter_activates_the_remaining_one_as_in_diffusers(files):
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
        pipe.load_lora_weights(files["b"], adapter_name="b")
        pipe.delete_adapters("b")
    assert mine.get_active_adapters() == theirs.get_active_adapters() == ["a"]
    assert_same(outputs(mine), outputs(theirs))


def test_a_model_activates_after_two_load_adapter_calls_as_transformers(tmp_path):
    folders = {
        name: peft_adapter(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / name, seed)
        for seed, name in enumerate(["x", "y"], start=1)
    }
    mine, theirs = lora_loader.attach(tiny_llama(0)), tiny_llama(0)
    for model in (mine, theirs):
        for name, folder in folders.items():
            model.load_adapter(folder, adapter_name=name)
    assert mine.active_adapters() == theirs.active_adapters() == ["y"]
    ids = input_ids()
    torch.testing.assert_close(logits(mine, ids), logits(theirs, ids), atol=TOLERANCE, rtol=0)
    for model in (mine, theirs):
        model.delete_adapter("y")
    assert mine.active_adapters() == theirs.active_adapters() == ["x"]
    torch.testing.assert_close(logits(mine, ids), logits(theirs, ids), atol=TOLERANCE, rtol=0)


# -- component-level adapters ---------------------------------------------------------------------------


def add_on_components(mine, theirs, name: str, seed: int, targets_by_component=None) -> None:
    """``add_adapter`` on each component (default: the UNet and the text encoder) of both pipelines, with
    the same factors: ours are randomised (lora_B starts at zero), read back with
    ``get_adapter_state_dict`` and given to peft's."""
    gen = torch.Generator().manual_seed(seed)
    targets_by_component = targets_by_component or {"unet": UNET_TARGETS, "text_encoder": TE_TARGETS}
    for component, targets in targets_by_component.items():
        ours, reference = getattr(mine, component), getattr(theirs, component)
        before = {id(p) for p in ours.parameters()}
        ours.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name=name)
        added = [p for p in ours.parameters() if id(p) not in before]
        assert added and all(p.requires_grad for p in added)
        with torch.no_grad():
            for p in added:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        reference.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name=name)
        set_peft_model_state_dict(reference, ours.get_adapter_state_dict(name), adapter_name=name)


def test_an_adapter_added_on_two_components_is_one_adapter_of_the_pipeline():
    mine, theirs = both()
    base = outputs(tiny_sd_pipeline(0))
    add_on_components(mine, theirs, "a", 1)
    add_on_components(mine, theirs, "b", 2)
    assert mine.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}
    assert mine.get_active_adapters() == theirs.get_active_adapters() == ["b"]
    assert_same(outputs(mine), outputs(theirs))
    for pipe in (mine, theirs):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.6, {"unet": 0.3, "text_encoder": 1.2}])
    blended = outputs(mine)
    assert_same(blended, outputs(theirs))
    for pipe in (mine, theirs):
        pipe.disable_lora()
    assert all(torch.equal(v, base[k]) for k, v in outputs(mine).items())
    assert_same(outputs(mine), outputs(theirs))
    for pipe in (mine, theirs):
        pipe.enable_lora()
    assert_same(outputs(mine), blended)
    for pipe in (mine, theirs):
        pipe.delete_adapters("b")
    assert mine.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    assert_same(outputs(mine), outputs(theirs))
    for pipe in (mine, theirs):
        pipe.unload_lora_weights()
    assert mine.get_list_adapters() == {} and all(torch.equal(v, base[k]) for k, v in outputs(mine).items())


def test_component_level_calls_act_on_their_component_only():
    mine, theirs = both()
    add_on_components(mine, theirs, "a", 1)
    add_on_components(mine, theirs, "b", 2)
    for pipe in (mine, theirs):
        pipe.unet.set_adapters(["a"])  # the text encoder keeps "b"
    assert_same(outputs(mine), outputs(theirs))
    for pipe in (mine, theirs):
        pipe.text_encoder.disable_adapters()
    assert_same(outputs(mine), outputs(theirs))
    assert torch.equal(outputs(mine)["text_encoder"], outputs(tiny_sd_pipeline(0))["text_encoder"])
    for pipe in (mine, theirs):
        pipe.text_encoder.enable_adapters()
        pipe.unet.delete_adapters("a")
    assert mine.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["b"], "text_encoder": ["a", "b"]}
    assert_same(outputs(mine), outputs(theirs))


# -- fuse counters ---------------------------------------------------------------------------------------


def test_num_fused_loras_and_fused_loras_count_as_in_diffusers(files):
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
        pipe.load_lora_weights(files["b"], adapter_name="b")
    assert mine.num_fused_loras == theirs.num_fused_loras == 0
    for pipe in (mine, theirs):
        # As diffusers' own fuse tests do: with a fused adapter in a layer, peft runs no unfused adapter
        # there (lora_loader keeps the active ones running), so only the fused adapter is active here.
        pipe.set_adapters(["a"])
    steps = [
        lambda p: p.fuse_lora(components=["unet", "text_encoder"], adapter_names=["a"]),
        lambda p: p.unfuse_lora(components=["unet", "text_encoder"]),
        lambda p: p.set_adapters(["a", "b"]),
        lambda p: p.unfuse_lora(components=["unet", "text_encoder"]),
        lambda p: p.fuse_lora(components=["unet", "text_encoder"], adapter_names=["b", "a"]),
        lambda p: p.unfuse_lora(components=["text_encoder"]),
        lambda p: p.unfuse_lora(components=["unet"]),
    ]
    for step in steps:
        for pipe in (mine, theirs):
            step(pipe)
        assert (mine.num_fused_loras, mine.fused_loras) == (theirs.num_fused_loras, theirs.fused_loras)
        assert_same(outputs(mine), outputs(theirs))
    assert mine.num_fused_loras == 0


def test_fuse_of_one_component_then_another_is_two_fuses_unfused_exactly(files):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.load_lora_weights(files["a"], adapter_name="a")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unfused = outputs(pipe)
    pipe.fuse_lora(components=["unet"])
    pipe.fuse_lora(components=["text_encoder"])
    assert pipe.fused_loras == {"a"}
    assert_same(outputs(pipe), unfused)
    with pytest.raises(LoraError, match="already fused"):
        pipe.fuse_lora(components=["unet"])
    pipe.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


# -- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.set_adapters("not-loaded"),
        lambda p: p.set_adapters(["a"], [0.5, 0.5]),
        lambda p: p.set_adapters(["a", "not-loaded"]),
    ],
    ids=["unknown-name", "weights-length", "one-unknown-of-two"],
)
def test_what_diffusers_raises_as_value_error_is_a_value_error_here_too(files, call):
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
    with pytest.raises(ValueError):
        call(theirs)
    with pytest.raises(ValueError) as caught:
        call(mine)
    assert isinstance(caught.value, LoraError)


def test_an_unknown_adapter_name_is_reported_in_diffusers_words(files):
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
        with pytest.raises(ValueError, match="not in the list of present adapters"):
            pipe.set_adapters("test")


def test_a_missing_file_is_a_lora_file_error_and_an_os_error(tmp_path):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    with pytest.raises(OSError) as caught:
        pipe.load_lora_weights(str(tmp_path / "missing.safetensors"))
    assert isinstance(caught.value, LoraFileError) and "missing.safetensors" in str(caught.value)


# -- the training flow and diffusers' classmethods ---------------------------------------------------------


def test_training_flow_saves_with_the_pipeline_classmethod_and_loads_as_diffusers_loads_it(tmp_path):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    te_config = LoraConfig(r=4, lora_alpha=16, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(te_config)
    params = [p for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()) if p.requires_grad]
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    from tiny import text_ids, unet_inputs

    for step in range(3):  # a plain training loop on a made-up target
        inputs = unet_inputs(pipe, seed=step)
        inputs["encoder_hidden_states"] = pipe.text_encoder(text_ids(step)).last_hidden_state
        loss = pipe.unet(**inputs).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v.detach() for k, v in outputs(pipe).items()}
    assert differs(trained, outputs(tiny_sd_pipeline(0)))
    type(pipe).save_lora_weights(
        tmp_path,
        unet_lora_layers=pipe.unet.get_adapter_state_dict(),
        text_encoder_lora_layers=pipe.text_encoder.get_adapter_state_dict(),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    fresh = lora_loader.attach(tiny_sd_pipeline(0))
    fresh.load_lora_weights(tmp_path, adapter_name="trained")
    reference = tiny_sd_pipeline(0)
    reference.load_lora_weights(tmp_path, adapter_name="trained")
    with torch.no_grad():
        assert_same(outputs(fresh), trained)
        assert_same(outputs(reference), trained)


def test_lora_state_dict_and_load_lora_into_each_component_as_diffusers(files):
    mine, theirs = both()
    for pipe in (mine, theirs):
        cls = type(pipe)
        state_dict, network_alphas, metadata = cls.lora_state_dict(files["a"], return_lora_metadata=True)
        assert metadata  # rank and alpha (8 != 4) come from the header
        cls.load_lora_into_unet(state_dict, network_alphas, pipe.unet, adapter_name="a", metadata=metadata)
        cls.load_lora_into_text_encoder(state_dict, network_alphas, pipe.text_encoder, adapter_name="a", metadata=metadata)
    assert mine.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    assert_same(outputs(mine), outputs(theirs))
    whole = lora_loader.attach(tiny_sd_pipeline(0))
    whole.load_lora_weights(files["a"])
    assert_same(outputs(mine), outputs(whole))


def test_peft_config_lists_each_components_own_config_as_diffusers_models_do():
    mine, theirs = both()
    assert getattr(mine.unet, "peft_config", None) is None and getattr(theirs.unet, "peft_config", None) is None
    for pipe, config_cls in ((mine, LoraConfig), (theirs, peft.LoraConfig)):
        pipe.unet.add_adapter(config_cls(r=4, lora_alpha=8, target_modules=UNET_TARGETS), adapter_name="a")
        pipe.text_encoder.add_adapter(config_cls(r=2, lora_alpha=3, target_modules=TE_TARGETS), adapter_name="a")
    for component in ("unet", "text_encoder"):
        ours, reference = getattr(mine, component).peft_config, getattr(theirs, component).peft_config
        assert list(ours) == list(reference) == ["a"]
        assert (ours["a"].r, ours["a"].lora_alpha) == (reference["a"].r, reference["a"].lora_alpha)
        assert set(ours["a"].target_modules) == set(reference["a"].target_modules)


def test_enable_lora_hotswap_before_the_first_load_lets_a_higher_rank_swap_in_as_in_diffusers(files):
    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.enable_lora_hotswap(target_rank=8)
        pipe.load_lora_weights(files["unet_only"], adapter_name="x")
    assert_same(outputs(mine), outputs(theirs))
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["unet_rank8"], adapter_name="x", hotswap=True)
    got = outputs(mine)
    assert_same(got, outputs(theirs))
    fresh = lora_loader.attach(tiny_sd_pipeline(0))
    fresh.load_lora_weights(files["unet_rank8"], adapter_name="x")
    assert_same(got, outputs(fresh))


def test_enable_lora_hotswap_refuses_a_later_adapter_above_the_target_rank_and_changes_nothing(files):
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    pipe.enable_lora_hotswap(target_rank=4)
    before = outputs(pipe)
    with pytest.raises(LoraError, match="target_rank=4"):
        pipe.load_lora_weights(files["unet_rank8"], adapter_name="x")
    assert pipe.get_list_adapters() == {} and all(torch.equal(v, before[k]) for k, v in outputs(pipe).items())


def test_from_pipe_takes_the_attached_components_and_their_adapters_along_as_with_peft(files):
    from diffusers import StableDiffusionImg2ImgPipeline

    mine, theirs = both()
    for pipe in (mine, theirs):
        pipe.load_lora_weights(files["a"], adapter_name="a")
    mine2 = StableDiffusionImg2ImgPipeline.from_pipe(mine)
    theirs2 = StableDiffusionImg2ImgPipeline.from_pipe(theirs)
    assert mine2.unet is mine.unet and mine2.text_encoder is mine.text_encoder
    assert lora_loader.attach(mine2).get_list_adapters() == theirs2.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    assert_same(outputs(mine2), outputs(theirs2))
    mine2.disable_lora()  # one registry: the first pipeline sees it too
    assert all(torch.equal(v, w) for v, w in zip(outputs(mine).values(), outputs(tiny_sd_pipeline(0)).values()))


# -- the same component-level flow on SDXL, SD3 and Flux ------------------------------------------------------

DIT_TARGETS = ["to_q", "to_k", "to_v"]
FAMILIES = {
    "sdxl": (tiny_sdxl_pipeline, outputs, {"unet": UNET_TARGETS, "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}),
    "sd3": (tiny_sd3_pipeline, lambda pipe: {"latents": run(pipe)},
            {"transformer": DIT_TARGETS, "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}),
    "flux": (tiny_flux_pipeline, lambda pipe: {"latents": run(pipe)}, {"transformer": DIT_TARGETS, "text_encoder": TE_TARGETS}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_component_level_adapters_blend_disable_fuse_delete_and_unload_as_diffusers(family):
    factory, forward, targets = FAMILIES[family]
    mine, theirs = lora_loader.attach(factory(0)), factory(0)
    with torch.no_grad():
        base = forward(factory(0))
    add_on_components(mine, theirs, "a", 1, targets)
    add_on_components(mine, theirs, "b", 2, targets)
    everywhere = {component: ["a", "b"] for component in targets}
    assert mine.get_list_adapters() == theirs.get_list_adapters() == everywhere
    assert mine.get_active_adapters() == theirs.get_active_adapters() == ["b"]
    steps = [
        ("after two adds", lambda p: None),
        ("blend", lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])),
        ("disabled", lambda p: p.disable_lora()),
        ("enabled", lambda p: p.enable_lora()),
        ("a alone, fused", lambda p: (p.set_adapters("a"), p.fuse_lora(components=list(targets), adapter_names=["a"]))),
        ("unfused", lambda p: p.unfuse_lora(components=list(targets))),
        ("b deleted", lambda p: p.delete_adapters("b")),
    ]
    with torch.no_grad():
        for what, step in steps:
            for pipe in (mine, theirs):
                step(pipe)
            got = forward(mine)
            assert_same(got, forward(theirs))
            assert (mine.num_fused_loras, mine.fused_loras) == (theirs.num_fused_loras, theirs.fused_loras), what
            assert differs(got, base) != (what == "disabled"), what
        assert all(torch.equal(v, base[k]) for k, v in _disabled(mine, forward).items())
        for pipe in (mine, theirs):
            pipe.unload_lora_weights()
        assert mine.get_list_adapters() == {} and all(torch.equal(v, base[k]) for k, v in forward(mine).items())


def _disabled(pipe, forward) -> dict:
    pipe.disable_lora()
    try:
        return forward(pipe)
    finally:
        pipe.enable_lora()
