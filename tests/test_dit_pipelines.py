"""SD3 and Flux pipelines, end to end, against diffusers+peft.

Files are written by PEFT + each pipeline's own ``save_lora_weights`` (diffusers
layout, rank and alpha in the header), loaded once by diffusers into a tiny
pipeline and once by lora_loader into an identical one; two denoising steps
from the same generator (text encoders included) must agree to 1e-4. Every
comparison also checks that the LoRA moved the output, so a loader that loads
nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from producers import add_peft_adapter, peft_lora, save_diffusers_lora
from tiny import text_ids
from tiny_dit import run, tiny_flux_pipeline, tiny_sd3_pipeline

import lora_loader
from lora_loader import LoraError

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TOLERANCE = 1e-4
MOVED = 1e-3

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
JOINT = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2"]
PIPELINES = {
    "flux": (tiny_flux_pipeline, FluxPipeline, ("text_encoder",), JOINT + ["proj_mlp", "proj_out", "norm1.linear", "x_embedder"]),
    "sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline, ("text_encoder", "text_encoder_2"), JOINT + ["proj_out", "pos_embed.proj", "norm1.linear"]),
}  # fmt: skip


def configs(kind: str, seed: int) -> dict[str, LoraConfig]:
    _, _, encoders, targets = PIPELINES[kind]
    out = {
        "transformer": LoraConfig(
            r=4, lora_alpha=8 + seed, target_modules=targets, rank_pattern={"to_k": 2}, alpha_pattern={"proj_out": 3},
            init_lora_weights=False,
        )
    }  # fmt: skip
    for encoder in encoders:
        out[encoder] = LoraConfig(r=2, lora_alpha=6, target_modules=TE_TARGETS, init_lora_weights=False)
    return out


def diffusers_file(kind: str, directory, seed: int = 1) -> str:
    factory, cls, _, _ = PIPELINES[kind]
    cfg = configs(kind, seed)
    return save_diffusers_lora(directory, cls, peft_lora(factory, seed, cfg), cfg, f"{kind}-{seed}.safetensors")


def both(kind: str):
    """A pipeline for diffusers+peft and an identical one with lora_loader attached."""
    factory = PIPELINES[kind][0]
    return factory(), lora_loader.attach(factory())


def assert_close(got, want, base):
    assert (want - base).abs().max() > MOVED, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= TOLERANCE


@pytest.mark.parametrize("kind", PIPELINES)
def test_a_diffusers_file_gives_the_outputs_diffusers_gives(kind, tmp_path):
    path = diffusers_file(kind, tmp_path)
    ref, mine = both(kind)
    base = run(ref)
    ref.load_lora_weights(path, adapter_name="a")
    report = mine.load_lora_weights(path, adapter_name="a")
    assert set(report.modules) == {"transformer", *PIPELINES[kind][2]}
    assert_close(run(mine), run(ref), base)


@pytest.mark.parametrize("kind", PIPELINES)
def test_two_adapters_blend_and_scale_per_call_as_in_diffusers(kind, tmp_path):
    a, b = diffusers_file(kind, tmp_path, 1), diffusers_file(kind, tmp_path, 2)
    ref, mine = both(kind)
    base = run(ref)
    for pipe in (ref, mine):
        pipe.load_lora_weights(a, adapter_name="a")
        pipe.load_lora_weights(b, adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, -0.4])
    assert_close(run(mine), run(ref), base)
    # Per-call scale: joint_attention_kwargs scales the denoiser's adapters for one call only.
    assert_close(run(mine, joint_attention_kwargs={"scale": 0.5}), run(ref, joint_attention_kwargs={"scale": 0.5}), base)
    assert_close(run(mine), run(ref), base)
    # Per component: the text encoders at weight 0 leave only the transformer's adapters.
    weights = [{"transformer": 0.7, **{e: 0.0 for e in PIPELINES[kind][2]}}, {"transformer": -0.4, **{e: 0.0 for e in PIPELINES[kind][2]}}]
    for pipe in (ref, mine):
        pipe.set_adapters(["a", "b"], weights)
    assert_close(run(mine), run(ref), base)


@pytest.mark.parametrize("kind", PIPELINES)
def test_disable_fuse_unfuse_and_unload_give_back_the_base_exactly(kind, tmp_path):
    path = diffusers_file(kind, tmp_path)
    _, mine = both(kind)
    base = run(mine)
    mine.load_lora_weights(path, adapter_name="a")
    with_lora = run(mine)
    mine.disable_lora()
    assert torch.equal(run(mine), base)
    mine.enable_lora()
    mine.fuse_lora(components=["transformer", *PIPELINES[kind][2]])
    assert (run(mine) - with_lora).abs().max() <= TOLERANCE
    mine.unfuse_lora(components=["transformer", *PIPELINES[kind][2]])
    assert torch.equal(run(mine), with_lora)
    mine.unload_lora_weights()
    assert torch.equal(run(mine), base)


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
@pytest.mark.parametrize("kind", PIPELINES)
def test_a_saved_adapter_loads_back_with_the_same_outputs(kind, fmt, tmp_path):
    _, mine = both(kind)
    mine.load_lora_weights(diffusers_file(kind, tmp_path), adapter_name="a")
    want = run(mine)
    saved = mine.save_lora_weights(tmp_path / "out", "a", format=fmt)
    _, again = both(kind)
    again.load_lora_weights(saved, adapter_name="a")
    if fmt == "kohya":
        # Kohya layout is the original names, as sd-scripts writes Flux (BFL's) and SD3 (Stability's): q, k and
        # v trained apart are joined into
        # one qkv LoRA (their lora_down stacked, their lora_up on the block diagonal, as sd-scripts' split_qkv
        # saves them): the same product, summed in another order.
        torch.testing.assert_close(run(again), want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(run(again), want)


@pytest.mark.parametrize("kind", PIPELINES)
def test_the_diffusers_file_lora_loader_saves_loads_in_diffusers(kind, tmp_path):
    ref, mine = both(kind)
    base = run(ref)
    mine.load_lora_weights(diffusers_file(kind, tmp_path), adapter_name="a")
    ref.load_lora_weights(mine.save_lora_weights(tmp_path / "out", "a", format="diffusers"), adapter_name="a")
    assert_close(run(mine), run(ref), base)


def t5_lora_file(pipe_kind: str, directory) -> tuple[str, dict]:
    """A LoRA on the T5 encoder alone, in diffusers layout under the pipeline's T5 component name."""
    component = "text_encoder_3" if pipe_kind == "sd3" else "text_encoder_2"
    # No header: scale 1 (alpha = r), as diffusers infers it for a file without rank/alpha metadata.
    cfg = {component: LoraConfig(r=2, lora_alpha=2, target_modules=["q", "v", "wi"], init_lora_weights=False)}
    factory, cls = PIPELINES[pipe_kind][:2]
    sds = peft_lora(factory, 5, cfg)
    tensors = {f"{component}.{k}": v for k, v in sds[component].items()}
    from safetensors.torch import save_file

    path = str(directory / f"{pipe_kind}-t5.safetensors")
    save_file(tensors, path)
    return path, cfg


@pytest.mark.parametrize("kind", PIPELINES)
def test_a_lora_on_the_t5_encoder_is_applied_like_peft_applies_it(kind, tmp_path):
    """diffusers has no loader for T5 LoRAs (Flux drops them at INFO level); lora_loader applies them."""
    path, cfg = t5_lora_file(kind, tmp_path)
    component = next(iter(cfg))
    factory = PIPELINES[kind][0]
    ref = factory()
    mine = lora_loader.attach(factory())
    ids = text_ids()
    with torch.no_grad():
        base = getattr(ref, component)(ids).last_hidden_state
        add_peft_adapter(getattr(ref, component), cfg[component])
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        prefix = component + "."
        set_peft_model_state_dict(getattr(ref, component), {k[len(prefix):]: v for k, v in load_file(path).items()})
        want = getattr(ref, component)(ids).last_hidden_state
        report = mine.load_lora_weights(path, adapter_name="t5")
        got = getattr(mine, component)(ids).last_hidden_state
    assert report.modules == {component: 6}  # q, v and wi in each of the 2 blocks
    assert_close(got, want, base)


def test_sd3_without_t5_refuses_a_file_for_the_t5_encoder_and_changes_nothing(tmp_path):
    path, _ = t5_lora_file("sd3", tmp_path)
    pipe = lora_loader.attach(tiny_sd3_pipeline(with_t5=False))
    before = run(pipe)
    with pytest.raises(LoraError, match="text_encoder_3"):
        pipe.load_lora_weights(path, adapter_name="t5")
    assert pipe.get_list_adapters() == {}
    assert torch.equal(run(pipe), before)


def test_dit_block_weights_match_block_indices_exactly(tmp_path):
    """``transformer_blocks.1`` is that block only: not ``single_transformer_blocks.1`` (diffusers' substring rule)."""
    _, mine = both("flux")
    mine.load_lora_weights(diffusers_file("flux", tmp_path), adapter_name="a")
    mine.set_adapters("a", {"transformer": {"transformer_blocks.1": 0.25, "single_transformer_blocks": 0.5}})
    got = run(mine)
    # The same blend built by hand: the LoRA's B scaled per block in a second copy of the file.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "flux-1.safetensors")
    for key in tensors:
        if ".lora_B." in key and key.startswith("transformer.transformer_blocks.1."):
            tensors[key] = tensors[key] * 0.25
        elif ".lora_B." in key and key.startswith("transformer.single_transformer_blocks."):
            tensors[key] = tensors[key] * 0.5
    from safetensors import safe_open

    with safe_open(str(tmp_path / "flux-1.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "by-hand.safetensors"), metadata=metadata)
    ref, _ = both("flux")
    base = run(ref)
    ref.load_lora_weights(str(tmp_path / "by-hand.safetensors"), adapter_name="a")
    assert_close(got, run(ref), base)


def test_dit_block_weights_that_name_no_module_are_refused_and_change_nothing(tmp_path):
    _, mine = both("sd3")
    mine.load_lora_weights(diffusers_file("sd3", tmp_path), adapter_name="a")
    mine.set_adapters("a", 0.5)
    before = run(mine)
    with pytest.raises(LoraError, match="transformer_blocks.7"):
        mine.set_adapters("a", {"transformer": {"transformer_blocks.7": 0.0}})
    assert torch.equal(run(mine), before)
