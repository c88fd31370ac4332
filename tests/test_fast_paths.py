"""What the fast paths must keep exact: narrow storage, incremental blend pushes, the cached
module index, the concatenation cache, the direct safetensors reader and the one-addmm fuse.

Each test compares against an independent reference: the dense math computed here,
the same file converted to fp32 before loading, ``safetensors.torch.load_file``, or a
model that never took the fast path.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_loader
from lora_loader import LoraError
from lora_loader.hub import _read_safetensors_direct


def layers(n: int = 4, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def lora_on(indices, seed: int, width: int = 16, rank: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in indices:
        sd[f"{i}.lora_A.weight"] = torch.randn(rank, width, generator=g).to(dtype)
        sd[f"{i}.lora_B.weight"] = torch.randn(width, rank, generator=g).to(dtype)
    return sd


def dense_forward(model: nn.Sequential, x: torch.Tensor, blend: list[tuple[dict, float]]) -> torch.Tensor:
    """The reference: each layer's ``W + sum_i w_i * B_i @ A_i`` (alpha = rank), computed densely."""
    for i, layer in enumerate(model):
        weight = layer.weight.detach().clone()
        for sd, w in blend:
            if f"{i}.lora_A.weight" in sd:
                weight += w * sd[f"{i}.lora_B.weight"].float() @ sd[f"{i}.lora_A.weight"].float()
        x = nn.functional.linear(x, weight, layer.bias)
    return x


def test_switching_between_adapters_on_different_layers_resets_the_layers_left_behind():
    model = lora_loader.attach(layers())
    x = torch.randn(3, 16)
    a, b = lora_on([0, 1], seed=1), lora_on([1, 2, 3], seed=2)
    model.load_lora_weights(a, adapter_name="a")
    model.load_lora_weights(b, adapter_name="b")
    for names, weights, blend in [
        (["a"], [0.5], [(a, 0.5)]),
        (["b"], [0.7], [(b, 0.7)]),  # layer 0 must drop a
        (["a", "b"], [1.0, -1.0], [(a, 1.0), (b, -1.0)]),
        (["a"], [0.5], [(a, 0.5)]),  # layers 2 and 3 must drop b
    ]:
        model.set_adapters(names, weights)
        torch.testing.assert_close(model(x), dense_forward(model, x, blend), rtol=1e-4, atol=1e-4)
    model.disable_lora()
    torch.testing.assert_close(model(x), dense_forward(model, x, []), rtol=0, atol=0)
    model.enable_lora()
    torch.testing.assert_close(model(x), dense_forward(model, x, [(a, 0.5)]), rtol=1e-4, atol=1e-4)


def test_a_load_activates_the_new_adapter_alone_and_every_other_layer_goes_back_to_base():
    """A load makes the new adapter the only active one (diffusers' and transformers' rule): the layers
    of the adapters active before are reset, those of the new one get it; fused weights stay."""
    model = lora_loader.attach(layers())
    x = torch.randn(3, 16)
    a, b, c, d = lora_on([0, 1], seed=1), lora_on([1, 2, 3], seed=2), lora_on([0, 3], seed=3), lora_on([2], seed=4)
    model.load_lora_weights(a, adapter_name="a")
    model.load_lora_weights(b, adapter_name="b")
    model.set_adapters(["a", "b"], [0.5, -0.7])
    torch.testing.assert_close(model(x), dense_forward(model, x, [(a, 0.5), (b, -0.7)]), rtol=1e-4, atol=1e-4)
    model.load_lora_weights(c, adapter_name="c")
    assert model.get_active_adapters() == ["c"]
    torch.testing.assert_close(model(x), dense_forward(model, x, [(c, 1.0)]), rtol=1e-4, atol=1e-4)
    model.set_adapters(["a", "b"], [0.5, -0.7])
    model.fuse_lora(adapter_names=["a"])  # layers 0 and 1 now hold 0.5 a in their weights
    model.load_lora_weights(d, adapter_name="d")
    torch.testing.assert_close(model(x), dense_forward(model, x, [(d, 1.0)]), rtol=1e-4, atol=1e-4)  # reads the fused weights
    model.unfuse_lora()
    torch.testing.assert_close(model(x), dense_forward(model, x, [(d, 1.0)]), rtol=1e-4, atol=1e-4)
    model.set_adapters([])  # nothing active: the next load takes the path that visits only its own layers
    model.load_lora_weights(b, adapter_name="b2")
    torch.testing.assert_close(model(x), dense_forward(model, x, [(b, 1.0)]), rtol=1e-4, atol=1e-4)
    model.disable_lora()
    model.load_lora_weights(a, adapter_name="a2")  # loaded while disabled: still off
    torch.testing.assert_close(model(x), dense_forward(model, x, []), rtol=0, atol=0)
    model.enable_lora()
    torch.testing.assert_close(model(x), dense_forward(model, x, [(a, 1.0)]), rtol=1e-4, atol=1e-4)


def test_fifty_adapters_switch_one_at_a_time_to_the_right_output():
    model = lora_loader.attach(layers())
    x = torch.randn(2, 16)
    files = [lora_on(range(4), seed=10 + i, rank=1) for i in range(50)]
    for i, sd in enumerate(files):
        model.load_lora_weights(sd, adapter_name=f"s{i}")
    for i in (0, 49, 17, 0):
        model.set_adapters([f"s{i}"], [0.3])
        torch.testing.assert_close(model(x), dense_forward(model, x, [(files[i], 0.3)]), rtol=1e-4, atol=1e-4)


def test_an_fp16_file_in_an_fp32_model_stays_fp16_and_computes_as_if_converted():
    x = torch.randn(3, 16)
    sd16 = lora_on(range(4), seed=3, dtype=torch.float16)
    narrow = lora_loader.attach(layers())
    narrow.load_lora_weights(sd16, adapter_name="x")
    converted = lora_loader.attach(layers())
    converted.load_lora_weights({k: v.float() for k, v in sd16.items()}, adapter_name="x")
    assert narrow[0].lora_adapters["x"].down.dtype == torch.float16  # half the memory
    assert converted[0].lora_adapters["x"].down.dtype == torch.float32
    torch.testing.assert_close(narrow(x), converted(x), rtol=0, atol=0)  # fp16 -> fp32 is exact
    narrow.set_adapters(["x"], [0.25])
    converted.set_adapters(["x"], [0.25])
    torch.testing.assert_close(narrow(x), converted(x), rtol=0, atol=0)


def test_an_fp32_file_in_an_fp16_model_is_converted_to_fp16():
    model = lora_loader.attach(layers().half())
    model.load_lora_weights(lora_on(range(4), seed=3), adapter_name="x")
    assert model[0].lora_adapters["x"].down.dtype == torch.float16


def test_training_a_loaded_fp16_adapter_widens_it_to_the_model_dtype(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = lora_loader.attach(LlamaForCausalLM(config))
    g = torch.Generator().manual_seed(0)
    sd = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16, generator=g).half(),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 2, generator=g).half(),
    }
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    model.load_adapter(str(folder), adapter_name="t", is_trainable=True)
    adapter = model.model.layers[0].self_attn.q_proj.lora_adapters["t"]
    assert adapter.down.dtype == torch.float32 and adapter.down.requires_grad
    torch.testing.assert_close(adapter.down.detach(), sd[next(iter(sd))].float(), rtol=0, atol=0)


def test_a_module_replaced_between_loads_gets_the_next_adapter():
    model = lora_loader.attach(layers())
    model.load_lora_weights(lora_on([0], seed=1), adapter_name="a")
    model.delete_adapters("a")
    torch.manual_seed(5)
    model[1] = nn.Linear(16, 16)  # the cached index still points at the old layer 1
    sd = lora_on([1], seed=2)
    model.load_lora_weights(sd, adapter_name="b")
    assert "b" in model[1].lora_adapters
    x = torch.randn(2, 16)
    torch.testing.assert_close(model(x), dense_forward(model, x, [(sd, 1.0)]), rtol=1e-4, atol=1e-4)


def test_a_module_added_between_loads_can_be_targeted():
    model = lora_loader.attach(layers(2))
    model.load_lora_weights(lora_on([0], seed=1), adapter_name="a")
    torch.manual_seed(5)
    model.append(nn.Linear(16, 16))
    model.load_lora_weights(lora_on([2], seed=2), adapter_name="b")
    assert "b" in model[2].lora_adapters


def test_the_concatenation_cache_follows_a_deleted_and_reloaded_adapter():
    model = lora_loader.attach(layers())
    x = torch.randn(3, 16)
    a, b, c = (lora_on(range(4), seed=s) for s in (1, 2, 3))
    model.load_lora_weights(a, adapter_name="a")
    model.load_lora_weights(b, adapter_name="b")
    model.set_adapters(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_forward(model, x, [(a, 1.0), (b, 1.0)]), rtol=1e-4, atol=1e-4)
        model.delete_adapters("b")
        model.load_lora_weights(c, adapter_name="b")  # same name, same shapes, maybe the same addresses
        model.set_adapters(["a", "b"])
        torch.testing.assert_close(model(x), dense_forward(model, x, [(a, 1.0), (c, 1.0)]), rtol=1e-4, atol=1e-4)
        model.set_adapters(["a", "b"], [0.5, 2.0])
        torch.testing.assert_close(model(x), dense_forward(model, x, [(a, 0.5), (c, 2.0)]), rtol=1e-4, atol=1e-4)


ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def test_the_direct_safetensors_reader_gives_what_safetensors_gives(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, 5, generator=g) * 4).to(dtype) for i, dtype in enumerate(ALL_DTYPES)}
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 7), odd=torch.arange(3, dtype=torch.uint8))
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "k": "v"})
    direct = _read_safetensors_direct(path)
    assert direct is not None
    read, metadata = direct
    expected = load_file(path)
    assert list(read) == sorted(expected) and metadata == {"format": "pt", "k": "v"}
    for key, tensor in expected.items():
        assert read[key].dtype == tensor.dtype and read[key].shape == tensor.shape
        assert torch.equal(read[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def _rewrite_header(path: str, change) -> None:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    encoded = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["a.lora_A.weight"].update(data_offsets=[0, 10**9]),  # past the end of the file
        lambda h: h["a.lora_A.weight"].update(shape=[3, 3]),  # size does not match the offsets
        lambda h: h["a.lora_A.weight"].update(dtype="F12"),  # no such dtype
    ],
    ids=["out-of-bounds", "wrong-size", "bad-dtype"],
)
def test_a_broken_header_is_refused_with_a_lora_error_naming_the_file(tmp_path, change):
    path = str(tmp_path / "broken.safetensors")
    save_file({"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.ones(4, 2)}, path)
    _rewrite_header(path, change)
    assert _read_safetensors_direct(path) is None  # left to safetensors, which says what is wrong
    model = lora_loader.attach(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(LoraError, match="broken.safetensors"):
        model.load_lora_weights(path, adapter_name="x")
    assert not hasattr(model[0], "lora_adapters")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fuse_equals_the_dense_update_for_linear_conv_and_gpt2_conv1d(dtype):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = lora_loader.attach(nn.ModuleDict({"lin": nn.Linear(8, 6), "conv": nn.Conv2d(4, 6, 3), "c1d": Conv1D(6, 8)}).to(dtype))
    g = torch.Generator().manual_seed(1)
    sd = {
        "lin.lora_A.weight": torch.randn(2, 8, generator=g), "lin.lora_B.weight": torch.randn(6, 2, generator=g),
        "conv.lora_A.weight": torch.randn(2, 4, 3, 3, generator=g), "conv.lora_B.weight": torch.randn(6, 2, 1, 1, generator=g),
        "c1d.lora_A.weight": torch.randn(2, 8, generator=g), "c1d.lora_B.weight": torch.randn(6, 2, generator=g),
    }  # fmt: skip
    base = {name: m.weight.detach().clone() for name, m in model.items()}
    model.load_lora_weights(sd, adapter_name="x")
    model.set_adapters(["x"], [0.5])
    model.fuse_lora(lora_scale=2.0)  # 0.5 * 2.0 = 1.0 in total
    for name, module in model.items():
        down, up = sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).view(base[name].shape if name != "c1d" else (6, 8))
        expected = base[name].float() + (delta.T if name == "c1d" else delta)
        tolerance = 0 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(module.weight.float(), expected.to(dtype).float(), rtol=tolerance, atol=1e-5 if dtype == torch.float32 else tolerance)
    model.unfuse_lora()
    for name, module in model.items():
        assert torch.equal(module.weight, base[name])


@pytest.mark.parametrize("call_scale", [None, 0.5])
@pytest.mark.parametrize("names", [["a"], ["a", "b"]])
def test_inference_adds_in_place_and_equals_the_dense_blend_for_every_layer_kind(names, call_scale):
    """Under no_grad the up-projection accumulates straight into the base output; it must give
    the dense ``W + scale * sum_i w_i B_i A_i`` result for Linear, Conv2d, GPT-2 Conv1D and Embedding."""
    from transformers.pytorch_utils import Conv1D

    from lora_loader.host import call_scale as scaled

    torch.manual_seed(0)
    model = lora_loader.attach(nn.ModuleDict({
        "lin": nn.Linear(8, 6), "conv": nn.Conv2d(4, 6, 3, padding=1), "c1d": Conv1D(6, 8), "emb": nn.Embedding(10, 6),
    }))  # fmt: skip
    shapes = {"lin": ((2, 8), (6, 2)), "conv": ((2, 4, 3, 3), (6, 2, 1, 1)), "c1d": ((2, 8), (6, 2)), "emb": ((2, 10), (6, 2))}
    files = {}
    for seed, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(seed + 1)
        files[name] = {f"{m}.lora_{ab}.weight": torch.randn(*shape, generator=g) for m, pair in shapes.items() for ab, shape in zip("AB", pair)}
        model.load_lora_weights(files[name], adapter_name=name)
    weights = {"a": 0.7, "b": -0.4}
    model.set_adapters(names, [weights[n] for n in names])
    factor = 1.0 if call_scale is None else call_scale

    def dense(m: str) -> torch.Tensor:
        w = model[m].weight.detach().clone()
        for n in names:
            delta = files[n][f"{m}.lora_B.weight"].flatten(1) @ files[n][f"{m}.lora_A.weight"].flatten(1)
            delta = delta.T if m in ("c1d", "emb") else delta.view(w.shape)
            w += factor * weights[n] * delta
        return w

    x_lin, x_conv, ids = torch.randn(3, 5, 8), torch.randn(2, 4, 5, 5), torch.tensor([[1, 4, 9], [0, 0, 3]])
    with torch.no_grad(), scaled(call_scale):
        got = {"lin": model["lin"](x_lin), "conv": model["conv"](x_conv), "c1d": model["c1d"](x_lin), "emb": model["emb"](ids)}
    expected = {
        "lin": nn.functional.linear(x_lin, dense("lin"), model["lin"].bias),
        "conv": nn.functional.conv2d(x_conv, dense("conv"), model["conv"].bias, padding=1),
        "c1d": x_lin @ dense("c1d") + model["c1d"].bias,
        "emb": nn.functional.embedding(ids, dense("emb")),
    }
    for m in got:
        torch.testing.assert_close(got[m], expected[m], rtol=1e-5, atol=1e-5)
