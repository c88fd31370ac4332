"""LyCORIS files (LoCon with Tucker, LoHa, LoKr, full diffs, DoRA) load as switchable adapters.

The oracle is the ``lycoris-lora`` package's **forward** pass: the producer
wraps a fresh copy of the model, its factors are randomised (its own init
zeroes one side), its output is recorded, and it writes the file with
``save_weights``. lora_loader must load that file and give the same output,
and every lifecycle step (blend, disable, fuse/unfuse, save, hotswap) must hold
for every kind. LyCORIS' ``merge_to`` / ``get_diff_weight`` scale LoHa and LoKr
twice when alpha != rank, so they are never used as a reference here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_loader
from lora_loader import LoraError

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e .[test])")


class Net(nn.Module):
    """A Linear, a 3x3 conv and a 1x1 conv: every layer kind LyCORIS algorithms treat differently
    (``proj_out``: the Linear's width; BOFT's butterfly needs a power of two)."""

    def __init__(self, proj_out: int = 48):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.point = nn.Conv2d(32, 32, 1)
        self.proj = nn.Linear(32, proj_out)

    def forward(self, x):
        h = self.point(torch.relu(self.conv(x)))
        return self.proj(h.mean(dim=(2, 3)))


def base_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


INPUT = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))

# (id, create_lycoris kwargs, suffixes the file must hold): each exercises another key layout.
CASES = [
    ("locon", dict(algo="locon"), {"lora_down.weight", "lora_up.weight"}),
    ("locon-tucker", dict(algo="locon", use_tucker=True), {"lora_mid.weight"}),
    ("loha", dict(algo="loha"), {"hada_w1_a", "hada_w2_b"}),
    ("loha-tucker", dict(algo="loha", use_tucker=True), {"hada_t1", "hada_t2"}),
    ("lokr", dict(algo="lokr", factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-decompose-both", dict(algo="lokr", factor=8, decompose_both=True, linear_dim=1), {"lokr_w1_a", "lokr_w1_b"}),
    ("lokr-tucker", dict(algo="lokr", factor=2, use_tucker=True, linear_dim=2), {"lokr_t2"}),
    ("lokr-full", dict(algo="lokr", factor=4, full_matrix=True), {"lokr_w1", "lokr_w2"}),
    ("full", dict(algo="full"), {"diff", "diff_b"}),
    ("dora-locon", dict(algo="locon", dora_wd=True), {"dora_scale"}),
    ("dora-loha", dict(algo="loha", dora_wd=True), {"dora_scale"}),
    ("dora-lokr", dict(algo="lokr", factor=4, dora_wd=True), {"dora_scale"}),
    ("dora-locon-input-axis", dict(algo="locon", dora_wd=True, wd_on_output=False), {"dora_scale"}),
]


class NormNet(Net):
    """Net with a GroupNorm after the conv and a LayerNorm before the projection (LyCORIS' train_norm)."""

    def __init__(self):
        super().__init__()
        self.group = nn.GroupNorm(4, 32)
        self.layer = nn.LayerNorm(32)

    def forward(self, x):
        h = self.point(torch.relu(self.group(self.conv(x))))
        return self.proj(self.layer(h.mean(dim=(2, 3))))


def norm_net(seed: int = 0) -> NormNet:
    torch.manual_seed(seed)
    net = NormNet().eval()
    with torch.no_grad():  # affine parameters away from (1, 0), so a wrong formula shows
        for norm in (net.group, net.layer):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return net


def produce(kwargs: dict, path, seed: int, model_seed: int = 0, factory=None) -> tuple[str, torch.Tensor]:
    """Write a LyCORIS file for ``base_net(model_seed)``; return its path and the producer's forward output."""
    kwargs = dict(kwargs)
    dim = kwargs.pop("linear_dim", 4)
    model = (factory or base_net)(model_seed)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=2.0, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=g)))  # near the norm LyCORIS starts from
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        expected = model(INPUT)
    net.save_weights(str(path), torch.float32, {})
    net.restore()
    return str(path), expected


def assert_kohya_round_trip(model, adapter: str, factory, expected: torch.Tensor, tmp_path) -> None:
    """Saved in Kohya layout and loaded into a fresh model, the adapter gives the producer's output."""
    saved = model.save_lora_weights(str(tmp_path / "saved.safetensors"), adapter_name=adapter, format="kohya")
    again = lora_loader.attach(factory())
    again.load_lora_weights(saved, adapter_name=adapter)
    with torch.no_grad():
        torch.testing.assert_close(again(INPUT), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param[:2]


@pytest.mark.parametrize("name, kwargs, suffixes", CASES, ids=[c[0] for c in CASES])
def test_the_producer_writes_the_layout_under_test(name, kwargs, suffixes, tmp_path):
    path, _ = produce(kwargs, tmp_path / "a.safetensors", seed=1)
    written = {k.split(".", 1)[1] for k in load_file(path)}
    assert suffixes <= written, written


def test_loads_and_matches_the_lycoris_forward(case, tmp_path):
    _, kwargs = case
    path, expected = produce(kwargs, tmp_path / "a.safetensors", seed=1)
    model = lora_loader.attach(base_net())
    with torch.no_grad():
        base = model(INPUT)
    model.load_lora_weights(path, adapter_name="a")
    with torch.no_grad():
        got = model(INPUT)
    assert (expected - base).abs().max() > 1e-2  # the adapter really moves the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_blend_disable_fuse_unfuse_and_save_for_every_kind(case, tmp_path):
    name, kwargs = case
    path_a, out_a = produce(kwargs, tmp_path / "a.safetensors", seed=1)
    path_b, out_b = produce(kwargs, tmp_path / "b.safetensors", seed=2)
    model = lora_loader.attach(base_net())
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(INPUT)
    model.load_lora_weights(path_a, adapter_name="a")
    model.load_lora_weights(path_b, adapter_name="b")

    # Each adapter alone reproduces its producer; weight 0 is the base model, whatever the kind.
    for adapter, expected in (("a", out_a), ("b", out_b)):
        model.set_adapters([adapter])
        with torch.no_grad():
            torch.testing.assert_close(model(INPUT), expected, rtol=1e-4, atol=1e-4)
    model.set_adapters(["a"], [0.0])
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), base, rtol=1e-5, atol=1e-5)

    # On each layer the blend adds the weighted changes of the adapters alone (DoRA's change is
    # per adapter against the base weight too, so the rule holds for it as well).
    x_conv, x_lin = torch.randn(2, 8, 5, 5), torch.randn(3, 32)

    def layer_outputs():
        with torch.no_grad():
            return model.conv(x_conv), model.proj(x_lin)

    model.disable_lora()
    base_layers = layer_outputs()
    model.enable_lora()
    model.set_adapters(["a"])
    only_a = layer_outputs()
    model.set_adapters(["b"])
    only_b = layer_outputs()
    model.set_adapters(["a", "b"], [0.6, 0.4])
    for got, o, a, b in zip(layer_outputs(), base_layers, only_a, only_b):
        torch.testing.assert_close(got, o + 0.6 * (a - o) + 0.4 * (b - o), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        blended = model(INPUT)
    model.disable_lora()
    with torch.no_grad():
        assert torch.equal(model(INPUT), base)
    model.enable_lora()
    model.fuse_lora()
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), blended, rtol=1e-4, atol=1e-4)
    model.unfuse_lora()
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), key

    assert_kohya_round_trip(model, "a", base_net, out_a, tmp_path)
    model.unload_lora_weights()
    with torch.no_grad():
        assert torch.equal(model(INPUT), base)


def test_dora_weight_interpolates_from_the_base_to_the_lycoris_output(tmp_path):
    """Weight m gives W + m * (W_dora - W): checked on the Linear alone against the producer's dense weights."""
    path, _ = produce(dict(algo="loha", dora_wd=True), tmp_path / "a.safetensors", seed=3)
    sd = load_file(path)
    model = lora_loader.attach(base_net())
    model.load_lora_weights(path, adapter_name="d")
    w0 = model.proj.weight.detach().clone()
    p = "lycoris_proj"
    scale = float(sd[f"{p}.alpha"]) / sd[f"{p}.hada_w1_b"].shape[0]
    delta = (sd[f"{p}.hada_w1_a"] @ sd[f"{p}.hada_w1_b"]) * (sd[f"{p}.hada_w2_a"] @ sd[f"{p}.hada_w2_b"]) * scale
    merged = w0 + delta
    w_dora = merged * sd[f"{p}.dora_scale"] / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    x = torch.randn(3, 32)
    for m in (0.0, 0.5, 1.0, 1.5):
        model.set_adapters(["d"], [m])
        with torch.no_grad():
            got = model.proj(x)
        torch.testing.assert_close(got, nn.functional.linear(x, w0 + m * (w_dora - w0), model.proj.bias), rtol=1e-5, atol=1e-5)


def test_lokr_with_both_factors_whole_ignores_alpha_as_lycoris_does(tmp_path):
    path, expected = produce(dict(algo="lokr", factor=2, full_matrix=True), tmp_path / "a.safetensors", seed=4)
    sd = load_file(path)
    for key in [k for k in sd if k.endswith(".alpha")]:
        sd[key] = torch.tensor(123.0)  # any alpha: both halves whole means scale 1
    model = lora_loader.attach(base_net())
    model.load_lora_weights(sd, adapter_name="k")
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), expected, rtol=1e-4, atol=1e-4)


def test_a_lycoris_file_for_another_model_is_refused_and_leaves_the_model_untouched(tmp_path):
    path, _ = produce(dict(algo="loha"), tmp_path / "a.safetensors", seed=1)
    sd = load_file(path)
    sd["lycoris_proj.hada_w1_a"] = torch.randn(13, 4)  # out 13 where the Linear has 48
    model = lora_loader.attach(base_net())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoraError, match="lycoris_proj.hada_w1_a"):
        model.load_lora_weights(sd, adapter_name="x")
    assert not any(hasattr(m, "lora_adapters") for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_loha_missing_a_factor_is_reported_by_key(tmp_path):
    path, _ = produce(dict(algo="loha"), tmp_path / "a.safetensors", seed=1)
    sd = load_file(path)
    del sd["lycoris_proj.hada_w2_b"]
    model = lora_loader.attach(base_net())
    with pytest.raises(LoraError, match="hada_w2_b"):
        model.load_lora_weights(sd, adapter_name="x")


def test_hotswap_replaces_a_loha_in_place_with_outputs_of_a_fresh_load(tmp_path):
    path_a, _ = produce(dict(algo="loha"), tmp_path / "a.safetensors", seed=1)
    path_b, out_b = produce(dict(algo="loha"), tmp_path / "b.safetensors", seed=2)
    model = lora_loader.attach(base_net())
    model.load_lora_weights(path_a, adapter_name="x")
    tensors = {id(p) for p in model.proj.lora_adapters["x"].parameters()}
    model.load_lora_weights(path_b, adapter_name="x", hotswap=True)
    assert {id(p) for p in model.proj.lora_adapters["x"].parameters()} == tensors
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), out_b, rtol=1e-4, atol=1e-4)


def test_kohya_named_loha_on_a_tiny_sd_pipeline_matches_lycoris(tmp_path):
    """LyCORIS' kohya-compatible network (``lora_unet_*`` / ``lora_te_*`` names) on SD 1.5 blocks."""
    from lycoris.kohya import create_network

    from tiny import text_ids, tiny_sd_pipeline, unet_inputs

    producer = tiny_sd_pipeline(seed=0)
    preset = tmp_path / "preset.toml"  # attention, MLP and resnet convs (the built-in presets' name list
    preset.write_text(  # repeats time_embedding, which LyCORIS 4.1.3 then refuses as a duplicate)
        'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\nunet_target_name = []\n'
        'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n'
    )
    net = create_network(1.0, 4, 2.0, producer.vae, producer.text_encoder, producer.unet, algo="loha", preset=str(preset))
    net.apply_to(producer.text_encoder, producer.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        inputs = unet_inputs(producer)
        expected = producer.unet(**inputs).sample
    path = str(tmp_path / "kohya_loha.safetensors")
    net.save_weights(path, torch.float32, {})
    keys = load_file(path)
    assert any(k.startswith("lora_unet_") and ".hada_w1_a" in k for k in keys)
    assert any(k.startswith("lora_te_") and ".hada_w1_a" in k for k in keys)
    assert any("resnets" in k and k.endswith("conv1.hada_w1_b") and keys[k].shape[1] > 16 for k in keys)  # a 3x3 conv

    pipe = lora_loader.attach(tiny_sd_pipeline(seed=0))
    pipe.load_lora_weights(path, adapter_name="loha")
    with torch.no_grad():
        got = pipe.unet(**inputs).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ids = text_ids()
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], producer.text_encoder(ids)[0], rtol=1e-4, atol=1e-4)
        pipe.disable_lora()  # and the adapter really moved both components
        assert (pipe.unet(**inputs).sample - expected).abs().max() > 1e-3
        assert (pipe.text_encoder(ids)[0] - producer.text_encoder(ids)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_norm_diffs_on_layer_norm_and_group_norm_match_lycoris(algo, tmp_path):
    path_a, out_a = produce(dict(algo=algo, train_norm=True), tmp_path / "a.safetensors", seed=1, factory=norm_net)
    path_b, out_b = produce(dict(algo=algo, train_norm=True), tmp_path / "b.safetensors", seed=2, factory=norm_net)
    written = load_file(path_a)
    assert {"lycoris_group.w_norm", "lycoris_group.b_norm", "lycoris_layer.w_norm", "lycoris_layer.b_norm"} <= set(written)
    model = lora_loader.attach(norm_net())
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(INPUT)
    model.load_lora_weights(path_a, adapter_name="a")
    model.load_lora_weights(path_b, adapter_name="b")
    assert "a" in model.layer.lora_adapters and "a" in model.group.lora_adapters
    model.set_adapters(["a"])
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), out_a, rtol=1e-4, atol=1e-4)
    # The norms alone: normalize(x) * (w + 0.7 dw_a + 0.3 dw_b) + (b + 0.7 db_a + 0.3 db_b).
    b_file = load_file(path_b)
    model.set_adapters(["a", "b"], [0.7, 0.3])
    x = torch.randn(3, 32)
    mixed_w = model.layer.weight + 0.7 * written["lycoris_layer.w_norm"] + 0.3 * b_file["lycoris_layer.w_norm"]
    mixed_b = model.layer.bias + 0.7 * written["lycoris_layer.b_norm"] + 0.3 * b_file["lycoris_layer.b_norm"]
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), nn.functional.layer_norm(x, (32,), mixed_w, mixed_b), rtol=1e-5, atol=1e-5)
        blended = model(INPUT)
    model.fuse_lora()
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), blended, rtol=1e-4, atol=1e-4)
    model.unfuse_lora()
    model.disable_lora()
    with torch.no_grad():
        assert torch.equal(model(INPUT), base)
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), key
    assert_kohya_round_trip(model, "b", norm_net, out_b, tmp_path)


def test_lora_factors_aimed_at_a_norm_are_refused_by_key():
    model = lora_loader.attach(norm_net())
    sd = {"lora_unet_layer.lora_down.weight": torch.randn(2, 32), "lora_unet_layer.lora_up.weight": torch.randn(32, 2)}
    with pytest.raises(LoraError, match="lora_unet_layer.lora_down.weight"):
        model.load_lora_weights(sd, adapter_name="x")
    assert not hasattr(model.layer, "lora_adapters")
