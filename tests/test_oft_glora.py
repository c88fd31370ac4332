"""LyCORIS OFT (``diag-oft``), BOFT and GLoRA files: deltas that depend on the layer's own weight.

The oracle is the ``lycoris-lora`` package itself: its network wraps a fresh copy
of the model, its parameters are randomised (its init is the identity), its
forward output is recorded, and ``save_weights`` writes the file exactly as users
get it (``oft_blocks`` [n, b, b] or [m, n, b, b], ``rescale``, ``alpha`` as the
constraint; GLoRA's ``a1.weight`` .. ``b2.weight`` and ``alpha``). A blend is
checked per layer against ``W + w (W' - W)`` with ``W'`` the weight LyCORIS'
own module makes (``make_weight``), computed here, never by lora_loader.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file
from test_lycoris import INPUT, Net
from torch import nn

import lora_loader
from lora_loader import LoraError

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e .[test])")


def base_net(seed: int = 0) -> Net:
    """test_lycoris' net with a Linear of width 64: output widths powers of two, as BOFT's butterfly needs."""
    torch.manual_seed(seed)
    return Net(proj_out=64).eval()
LAYERS = ("conv", "point", "proj")

# (id, create_lycoris kwargs, {suffix: ndim} the file must hold)
CASES = [
    ("oft", dict(algo="diag-oft"), {"oft_blocks": 3, "alpha": 0}),
    ("oft-rescaled-constrained", dict(algo="diag-oft", rescaled=True, constraint=0.02), {"oft_blocks": 3, "rescale": 2, "alpha": 0}),
    ("boft", dict(algo="boft"), {"oft_blocks": 4, "alpha": 0}),
    ("boft-rescaled-constrained", dict(algo="boft", rescaled=True, constraint=0.02, linear_dim=2), {"oft_blocks": 4, "rescale": 2}),
    ("glora", dict(algo="glora"), {"a1.weight": 2, "a2.weight": 2, "b1.weight": 2, "b2.weight": 2, "alpha": 0}),
]


def produce(kwargs: dict, path, seed: int) -> tuple[str, torch.Tensor, dict]:
    """Write a LyCORIS file for ``base_net()``; return its path, the producer's output and its merged weights."""
    kwargs = dict(kwargs)
    dim = kwargs.pop("linear_dim", 4)
    model = base_net()
    net = lycoris.create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=2.0, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("rescale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        expected = model(INPUT)
        merged = {}
        for module in net.loras:
            layer = module.lora_name.removeprefix("lycoris_")
            weight, _ = module.get_merged_weight(multiplier=1.0, shape=getattr(base_net(), layer).weight.shape)
            merged[layer] = weight.detach().clone()
    net.save_weights(str(path), torch.float32, {})
    net.restore()
    return str(path), expected, merged


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param[:2]


@pytest.mark.parametrize("name, kwargs, suffixes", CASES, ids=[c[0] for c in CASES])
def test_the_producer_writes_the_layout_under_test(name, kwargs, suffixes, tmp_path):
    path, _, _ = produce(kwargs, tmp_path / "a.safetensors", seed=1)
    sd = load_file(path)
    for suffix, ndim in suffixes.items():
        for layer in LAYERS:
            key = f"lycoris_{layer}.{suffix}"
            assert key in sd and (sd[key].dim() == ndim or layer != "proj"), (key, sorted(sd))
    if "constraint" in kwargs:
        assert float(sd["lycoris_proj.alpha"]) == pytest.approx(kwargs["constraint"])


def test_loads_and_matches_the_lycoris_forward(case, tmp_path):
    _, kwargs = case
    path, expected, _ = produce(kwargs, tmp_path / "a.safetensors", seed=1)
    model = lora_loader.attach(base_net())
    with torch.no_grad():
        base = model(INPUT)
    model.load_lora_weights(path, adapter_name="a")
    with torch.no_grad():
        got = model(INPUT)
    assert (expected - base).abs().max() > 1e-2  # the adapter really moves the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_constraint_caps_the_rotation_as_lycoris_does(tmp_path):
    """alpha is OFT's constraint, not a scale: the same blocks with alpha 0 (uncapped) give another output."""
    path, expected, _ = produce(dict(algo="diag-oft", constraint=0.001), tmp_path / "a.safetensors", seed=1)
    sd = load_file(path)
    capped = lora_loader.attach(base_net())
    capped.load_lora_weights(sd, adapter_name="a")
    uncapped = lora_loader.attach(base_net())
    uncapped.load_lora_weights({k: (torch.tensor(0.0) if k.endswith(".alpha") else v) for k, v in sd.items()}, adapter_name="a")
    with torch.no_grad():
        torch.testing.assert_close(capped(INPUT), expected, rtol=1e-4, atol=1e-4)
        assert (uncapped(INPUT) - expected).abs().max() > 1e-2


def test_blend_disable_fuse_unfuse_save_and_unload(case, tmp_path):
    _, kwargs = case
    path_a, out_a, merged_a = produce(kwargs, tmp_path / "a.safetensors", seed=1)
    path_b, out_b, merged_b = produce(kwargs, tmp_path / "b.safetensors", seed=2)
    model = lora_loader.attach(base_net())
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(INPUT)
    model.load_lora_weights(path_a, adapter_name="a")
    model.load_lora_weights(path_b, adapter_name="b")
    for adapter, expected in (("a", out_a), ("b", out_b)):
        model.set_adapters([adapter])
        with torch.no_grad():
            torch.testing.assert_close(model(INPUT), expected, rtol=1e-4, atol=1e-4)

    # A blend of 0.7 / 0.3 is W + 0.7 (W_a - W) + 0.3 (W_b - W) on every layer, W_a and W_b LyCORIS' own weights.
    model.set_adapters(["a", "b"], [0.7, 0.3])
    reference = base_net()
    with torch.no_grad():
        for layer in LAYERS:
            w = getattr(reference, layer).weight
            w.copy_(w + 0.7 * (merged_a[layer] - w) + 0.3 * (merged_b[layer] - w))
        want = reference(INPUT)
        blended = model(INPUT)
    assert (want - out_a).abs().max() > 1e-2 and (want - base).abs().max() > 1e-2
    torch.testing.assert_close(blended, want, rtol=1e-4, atol=1e-4)

    model.disable_lora()
    with torch.no_grad():
        assert torch.equal(model(INPUT), base)
    model.enable_lora()
    model.fuse_lora()
    assert not torch.equal(model.proj.weight, originals["proj.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), blended, rtol=1e-4, atol=1e-4)
    model.unfuse_lora()
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), blended, rtol=1e-5, atol=1e-5)

    # Saved in Kohya layout: the same factors under the same suffixes, alpha as written; reloads to the producer's output.
    saved = model.save_lora_weights(str(tmp_path / "saved.safetensors"), adapter_name="a", format="kohya")
    written, source = load_file(saved), load_file(path_a)
    for key, tensor in source.items():
        again = written[key.replace("lycoris_", "lora_unet_")]
        assert torch.equal(again.float(), tensor.float()), key
    fresh = lora_loader.attach(base_net())
    fresh.load_lora_weights(saved, adapter_name="a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(INPUT), out_a, rtol=1e-4, atol=1e-4)

    model.unload_lora_weights()
    with torch.no_grad():
        assert torch.equal(model(INPUT), base)


def test_comfyui_spelling_loads_the_same(tmp_path):
    """ComfyUI reads these kinds under diffusion_model.<dotted path>; the same tensors load to the same output."""
    path, expected, _ = produce(dict(algo="glora"), tmp_path / "a.safetensors", seed=1)
    sd = {k.replace("lycoris_", "diffusion_model."): v for k, v in load_file(path).items()}
    model = lora_loader.attach(base_net())
    report = model.load_lora_weights(sd, adapter_name="a", strict=False)
    assert not getattr(report, "skipped", None), report
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "algo, key, bad",
    [
        ("diag-oft", "lycoris_proj.oft_blocks", torch.randn(12, 4, 4)),  # 48 rows where the Linear has 64
        ("diag-oft", "lycoris_point.oft_blocks", torch.randn(8, 4, 3)),  # blocks not square
        ("boft", "lycoris_proj.oft_blocks", torch.randn(6, 16, 4, 4)),  # 6 butterfly stages need 32 blocks, not 16
        ("glora", "lycoris_proj.b1.weight", torch.randn(48, 4)),
        ("glora", "lycoris_conv.a2.weight", torch.randn(4, 5, 1, 1)),
    ],
)
def test_a_malformed_factor_is_refused_by_key_and_leaves_the_model_untouched(algo, key, bad, tmp_path):
    path, _, _ = produce(dict(algo=algo), tmp_path / "a.safetensors", seed=1)
    sd = load_file(path)
    assert key in sd
    sd[key] = bad
    model = lora_loader.attach(base_net())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoraError, match=re.escape(key.split(".")[0] + ".")) as error:  # the module's keys
        model.load_lora_weights(sd, adapter_name="x")
    assert key.split(".", 1)[1] in str(error.value) or "does not fit" in str(error.value), error.value
    assert not any(getattr(m, "lora_adapters", None) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_glora_missing_a_factor_is_reported_by_key(tmp_path):
    path, _, _ = produce(dict(algo="glora"), tmp_path / "a.safetensors", seed=1)
    sd = load_file(path)
    del sd["lycoris_proj.a2.weight"]
    model = lora_loader.attach(base_net())
    with pytest.raises(LoraError, match=r"a2\.weight"):
        model.load_lora_weights(sd, adapter_name="x")


PRESET = (  # attention, MLP and resnet convs (see tests/test_lycoris.py for why not a built-in preset)
    'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\nunet_target_name = []\n'
    'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n'
)


@pytest.mark.parametrize("algo", ["diag-oft", "glora"])
def test_kohya_named_files_on_a_tiny_sd_pipeline_match_lycoris(algo, tmp_path):
    """LyCORIS' kohya network (``lora_unet_*`` / ``lora_te_*`` names, as sd-scripts trains with it) on SD 1.5 blocks."""
    from lycoris.kohya import create_network

    from tiny import text_ids, tiny_sd_pipeline, unet_inputs

    producer = tiny_sd_pipeline(seed=0)
    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    net = create_network(1.0, 4, 2.0, producer.vae, producer.text_encoder, producer.unet, algo=algo, preset=str(preset))
    net.apply_to(producer.text_encoder, producer.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        inputs = unet_inputs(producer)
        expected = producer.unet(**inputs).sample
        ids = text_ids()
        expected_text = producer.text_encoder(ids)[0]
    path = str(tmp_path / "kohya.safetensors")
    net.save_weights(path, torch.float32, {})
    keys = load_file(path)
    factor = "oft_blocks" if algo == "diag-oft" else "a1.weight"
    assert any(k.startswith("lora_unet_") and k.endswith(factor) for k in keys)
    assert any(k.startswith("lora_te_") and k.endswith(factor) for k in keys)
    assert any("resnets" in k and "conv1" in k for k in keys)  # a 3x3 conv

    pipe = lora_loader.attach(tiny_sd_pipeline(seed=0))
    pipe.load_lora_weights(path, adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pipe.text_encoder(ids)[0], expected_text, rtol=1e-4, atol=1e-4)
        pipe.disable_lora()  # and the adapter really moved both components
        assert (pipe.unet(**inputs).sample - expected).abs().max() > 1e-3
        assert (pipe.text_encoder(ids)[0] - expected_text).abs().max() > 1e-3


def _sd_scripts_oft(blocks: torch.Tensor, alpha: float, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """sd-scripts' OFTModule.get_weight and forward (networks/oft.py), transcribed: the rotated weight."""
    out_dim = weight.shape[0]
    num, size, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=alpha * out_dim) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(size).unsqueeze(0).repeat(num, 1, 1)
    r = multiplier * (torch.matmul(eye + q, (eye - q).float().inverse()) - eye) + eye
    rotated = torch.einsum("k n m, k n ... -> k m ...", r, weight.reshape(num, size, *weight.shape[1:]))
    return rotated.reshape(weight.shape)


def test_sd_scripts_oft_file_on_a_tiny_sd_unet(tmp_path):
    """sd-scripts' own OFT network: ``oft_unet_<path>.oft_blocks`` [dim, out/dim, out/dim] and ``.alpha`` (the
    constraint, x out_dim) on the UNet's CrossAttention Linears. The oracle transcribes its forward; a blend
    weight is its multiplier."""
    from diffusers.models.attention_processor import Attention

    from tiny import tiny_sd_pipeline, unet_inputs

    reference = tiny_sd_pipeline(seed=0)
    g = torch.Generator().manual_seed(3)
    sd = {}
    targets = {}
    for name, module in reference.unet.named_modules():
        if isinstance(module, Attention):
            for child, linear in module.named_modules():
                if isinstance(linear, nn.Linear):
                    key = "oft_unet_" + f"{name}.{child}".replace(".", "_")
                    blocks = torch.randn(4, linear.out_features // 4, linear.out_features // 4, generator=g) * 0.2
                    sd[f"{key}.oft_blocks"] = blocks
                    sd[f"{key}.alpha"] = torch.tensor(1e-2)  # sd-scripts' advice: small; caps some modules here
                    targets[key] = (linear, blocks)
    assert any(k.endswith("to_out_0.oft_blocks") for k in sd) and len(targets) >= 16
    inputs = unet_inputs(reference)
    with torch.no_grad():
        base = reference.unet(**inputs).sample
        for multiplier in (1.0, 0.6):
            for linear, blocks in targets.values():
                if not hasattr(linear, "original"):
                    linear.original = linear.weight.clone()
                linear.weight.copy_(_sd_scripts_oft(blocks, 1e-2, linear.original, multiplier))
            want = reference.unet(**inputs).sample
            pipe = lora_loader.attach(tiny_sd_pipeline(seed=0))
            pipe.load_lora_weights(sd, adapter_name="oft")
            pipe.set_adapters(["oft"], [multiplier])
            got = pipe.unet(**inputs).sample
            assert (want - base).abs().max() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, factors", [
    ("oft", {"oft_blocks": torch.randn(4, 6, 6)}),
    ("glora", {"a1.weight": torch.randn(8, 2), "a2.weight": torch.randn(2, 8), "b1.weight": torch.randn(24, 2), "b2.weight": torch.randn(2, 8)}),
])
def test_a_part_of_a_fused_projection_is_refused(kind, factors):
    """Flux's fused qkv split into to_q/to_k/to_v: a rotation (or W a1 a2) of the whole fused weight has no
    per-part equivalent, so such a part is refused before anything is loaded, not computed wrongly."""
    from lora_loader.delta import FactorDelta
    from lora_loader.inject import factor_delta_problem

    part = FactorDelta(kind, factors, None, rows=((8, 16),))
    problem = factor_delta_problem(part, nn.Linear(8, 8))
    assert problem and "fused projection" in problem
    assert factor_delta_problem(FactorDelta(kind, factors, None), nn.Linear(8, 24)) is None


@pytest.mark.parametrize("algo", ["diag-oft", "glora"])
def test_hotswap_replaces_factors_in_place_with_outputs_of_a_fresh_load(algo, tmp_path):
    path_a, _, _ = produce(dict(algo=algo, constraint=0.05) if algo == "diag-oft" else dict(algo=algo), tmp_path / "a.safetensors", seed=1)
    path_b, out_b, _ = produce(dict(algo=algo, constraint=0.01) if algo == "diag-oft" else dict(algo=algo), tmp_path / "b.safetensors", seed=2)
    model = lora_loader.attach(base_net())
    model.load_lora_weights(path_a, adapter_name="x")
    tensors = {id(p) for p in model.proj.lora_adapters["x"].parameters()}
    model.load_lora_weights(path_b, adapter_name="x", hotswap=True)
    assert {id(p) for p in model.proj.lora_adapters["x"].parameters()} == tensors
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), out_b, rtol=1e-4, atol=1e-4)
