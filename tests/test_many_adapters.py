"""Many adapters: 50 loaded, a cap on how many stay resident, parking on another device and back.

The policy (lora_loader/residency.py): active adapters are always resident;
while more than ``cap`` adapters are resident, the least recently activated
inactive one (activation: a load, or being named in ``set_adapters``) is moved
to the park device; activating a parked adapter moves it back to the device
of each of its base layers first.

This machine may have no GPU, so the park device and the model's device can be
the same (the CPU), where a move changes no ``tensor.device``. The CPU tests
therefore check the moves themselves: every ``nn.Module.to`` call on an
adapter's tensors is recorded, so an implementation that moves the wrong
adapters, the wrong layers, to the wrong device, or nothing at all, fails. The
CUDA test at the end checks real devices where a GPU exists.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from tiny import outputs, tiny_sd_pipeline, unet_inputs
from torch import nn

import lora_loader
from lora_loader import LoraError, LoraNameError

CPU = torch.device("cpu")


# -- small helpers ---------------------------------------------------------------------------------------


def seq_model() -> nn.Sequential:
    torch.manual_seed(0)
    return lora_loader.attach(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))


def seq_lora(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{i}.{part}.weight": torch.randn(shape, generator=g) * 0.5
        for i in (0, 2)
        for part, shape in (("lora_A", (rank, 8)), ("lora_B", (8, rank)))
    }


def load_seq(model, names) -> None:
    for i, name in enumerate(names):
        model.load_lora_weights(seq_lora(100 + i), adapter_name=name)


def residency(host) -> tuple[list[str], list[str]]:
    state = host.lora_residency()
    return state["resident"], state["parked"]


def adapter_modules(host, name: str) -> set[int]:
    """ids of every module that holds adapter ``name``'s tensors (one per layer, plus full copies)."""
    registry = host._lora_registry_to_read()
    record = registry.adapters[name]
    found = set()
    for _, _, module in record.layers + record.copies:
        for container in ("lora_adapters", "lora_copies", "lora_biases"):
            holder = module._modules.get(container)
            if holder is not None and name in holder:
                found.add(id(holder[name]))
    assert found
    return found


@pytest.fixture
def moves(monkeypatch):
    """Every ``nn.Module.to`` call, as ``(id(module), device)``, in order."""
    calls: list[tuple[int, torch.device | None]] = []
    original = nn.Module.to

    def recording_to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        calls.append((id(self), None if device is None or isinstance(device, torch.dtype) else torch.device(device)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recording_to)
    return calls


def moved(calls, modules: set[int]) -> list[torch.device | None]:
    return [device for module, device in calls if module in modules]


# -- the LRU policy ------------------------------------------------------------------------------------


def test_the_least_recently_activated_inactive_adapters_are_parked():
    model = seq_model()
    model.set_max_resident_adapters(2)
    model.load_lora_weights(seq_lora(1), adapter_name="a")
    model.set_adapters("a")
    assert residency(model) == (["a"], [])
    model.load_lora_weights(seq_lora(2), adapter_name="b")
    model.load_lora_weights(seq_lora(3), adapter_name="c")
    # A load activates the new adapter alone (diffusers' rule) and counts as its activation:
    # recency a < b < c; two may stay: a goes.
    assert model.get_active_adapters() == ["c"]
    assert residency(model) == (["b", "c"], ["a"])
    model.set_adapters(["a", "b", "c"])  # all active: active adapters are never parked
    assert residency(model) == (["a", "b", "c"], [])
    model.set_adapters("c")  # recency a < b < c; two may stay: a goes
    assert residency(model) == (["b", "c"], ["a"])
    model.set_adapters(["a"])  # a comes back and is the most recent: b goes
    assert residency(model) == (["c", "a"], ["b"])
    model.set_adapters(["b", "c"])
    assert residency(model) == (["b", "c"], ["a"])
    model.load_lora_weights(seq_lora(4), adapter_name="d")  # active: d alone; b, c, d resident is over the cap
    assert residency(model) == (["c", "d"], ["a", "b"])  # the least recent inactive one (b) goes
    model.set_adapters(["b", "c", "d"])  # over the cap, all active: b comes back
    assert residency(model) == (["b", "c", "d"], ["a"])
    model.set_adapters([])  # nothing active: the least recent resident one (b) goes
    assert residency(model) == (["c", "d"], ["a", "b"])
    model.set_max_resident_adapters(0)
    assert residency(model) == ([], ["a", "b", "c", "d"])
    model.set_max_resident_adapters(None)  # no cap: nothing moves until an adapter is activated
    assert residency(model) == ([], ["a", "b", "c", "d"])
    model.set_adapters("a")
    assert residency(model) == (["a"], ["b", "c", "d"])
    model.delete_adapters(["b"])
    assert residency(model) == (["a"], ["c", "d"])


def test_active_adapters_are_never_parked_and_the_parked_ones_are_the_least_recent():
    """A random walk of set_adapters / loads / cap changes against an independent recency list."""
    model = seq_model()
    rng = random.Random(7)
    names = [f"n{i}" for i in range(8)]
    recency: list[str] = []  # least recently activated first
    cap = 3
    model.set_max_resident_adapters(cap)
    for name in names[:4]:
        model.load_lora_weights(seq_lora(hash(name) % 1000), adapter_name=name)
        recency = [n for n in recency if n != name] + [name]
    loaded = names[:4]
    for step in range(60):
        roll = rng.random()
        if roll < 0.1 and len(loaded) < len(names):
            name = names[len(loaded)]
            model.load_lora_weights(seq_lora(step), adapter_name=name)
            loaded.append(name)
            recency = [n for n in recency if n != name] + [name]
        elif roll < 0.2:
            cap = rng.choice([0, 1, 2, 3, 5])
            model.set_max_resident_adapters(cap)
        else:
            chosen = rng.sample(loaded, rng.randint(0, min(3, len(loaded))))
            model.set_adapters(chosen)
            recency = [n for n in recency if n not in chosen] + chosen
        active = model.get_active_adapters()
        resident, parked = residency(model)
        assert sorted(resident + parked) == sorted(loaded), step
        assert set(active) <= set(resident), (step, active, parked)
        assert len(resident) <= max(cap, len(active)), (step, cap, resident)
        inactive_resident = [n for n in resident if n not in active]
        if parked and inactive_resident:  # every parked adapter is less recent than every inactive resident one
            assert max(recency.index(n) for n in parked) < min(recency.index(n) for n in inactive_resident), step


def test_parked_adapters_are_moved_to_the_park_device_and_back_layer_by_layer(moves):
    model = seq_model()
    model.set_max_resident_adapters(1, park_device="cpu")
    load_seq(model, ["a", "b"])
    model.set_adapters(["a", "b"])  # both active, both resident
    a, b = adapter_modules(model, "a"), adapter_modules(model, "b")
    assert len(a) == 2  # two layers
    moves.clear()
    model.set_adapters("b")  # a is parked: each of its layers moves to the park device, b stays
    assert residency(model) == (["b"], ["a"])
    assert sorted(moved(moves, a), key=str) == [CPU, CPU]
    assert moved(moves, b) == []
    moves.clear()
    model.set_adapters("b")  # nothing to move
    assert moves == []
    model.set_adapters("a")  # a back to each layer's device, b parked
    assert moved(moves, a) == [CPU, CPU]
    assert moved(moves, b) == [CPU, CPU]
    assert residency(model) == (["a"], ["b"])
    moves.clear()
    model.set_max_resident_adapters(None)
    model.set_adapters(["a", "b"])  # no cap, but b is still parked: it comes back
    assert moved(moves, b) == [CPU, CPU] and moved(moves, a) == []
    assert residency(model) == (["a", "b"], [])


def test_a_layer_with_its_weight_on_the_meta_device_and_no_hook_keeps_its_adapter_where_it_is(moves):
    model = seq_model()
    model[2].to("meta")  # a config-only layer: no values, no accelerate hook, computes nowhere
    model.set_max_resident_adapters(0)
    load_seq(model, ["a"])
    on_real = {id(model[0].lora_adapters["a"])}
    on_meta = {id(model[2].lora_adapters["a"])}
    moves.clear()
    model.set_adapters([])
    assert residency(model) == ([], ["a"])
    assert moved(moves, on_real) == [CPU] and moved(moves, on_meta) == []
    model.set_adapters("a")
    assert moved(moves, on_real) == [CPU, CPU]  # parked, then back to its layer's device
    assert moved(moves, on_meta) == []  # never moved
    assert model[2].lora_adapters["a"].down.device == CPU  # never a meta tensor: values kept


def test_layers_offloaded_by_accelerate_park_and_come_back_to_their_hooks_execution_device(moves):
    from accelerate import cpu_offload

    model = seq_model()
    load_seq(model, ["a", "b"])
    model.set_adapters("a")
    with torch.no_grad():
        before = model(torch.ones(2, 8))
    cpu_offload(model, execution_device="cpu")  # weights are meta between calls, computed on the CPU
    assert model[0].weight.is_meta and model[2].weight.is_meta
    model.set_max_resident_adapters(0)
    a = adapter_modules(model, "a")
    moves.clear()
    model.set_adapters("b")
    assert residency(model) == (["b"], ["a"])
    assert moved(moves, a) == [CPU, CPU]  # both offloaded layers' adapters are parked
    moves.clear()
    model.set_adapters("a")
    assert moved(moves, a) == [CPU, CPU]  # and come back to the hooks' execution device
    with torch.no_grad():
        assert torch.equal(model(torch.ones(2, 8)), before)


def test_outputs_after_parking_and_reactivating_are_bit_identical():
    sources = {}
    for i, name in enumerate(["p", "q", "r"]):
        pipe0 = tiny_sd_pipeline(0)
        g = torch.Generator().manual_seed(i)
        sd = {}
        for prefix, model in (("unet", pipe0.unet), ("text_encoder", pipe0.text_encoder)):
            for path, module in model.named_modules():
                if re.fullmatch(r".*\.(to_q|to_v|q_proj|v_proj)", path):
                    sd[f"{prefix}.{path}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.3
                    sd[f"{prefix}.{path}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.3
        sources[name] = sd
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    plain = lora_loader.attach(tiny_sd_pipeline(0))
    for name, sd in sources.items():
        pipe.load_lora_weights(sd, adapter_name=name)
        plain.load_lora_weights(sd, adapter_name=name)
    pipe.set_max_resident_adapters(1)
    blend = (["p", "q"], [0.7, 0.5])
    pipe.set_adapters(*blend)
    plain.set_adapters(*blend)
    before = outputs(pipe)  # two adapters: the concatenated path
    base = outputs(tiny_sd_pipeline(0))
    assert all((before[k] - base[k]).abs().max() > 1e-3 for k in before)  # the adapters do something
    pipe.set_adapters("r")
    assert residency(pipe) == (["r"], ["p", "q"])
    outputs(pipe)
    pipe.set_adapters(*blend)
    assert residency(pipe) == (["p", "q"], ["r"])
    after = outputs(pipe)
    reference = outputs(plain)
    for key in before:
        assert torch.equal(after[key], before[key]), key
        assert torch.equal(after[key], reference[key]), key
    pipe.disable_lora()
    assert all(torch.equal(v, base[k]) for k, v in outputs(pipe).items())
    pipe.enable_lora()
    assert all(torch.equal(v, before[k]) for k, v in outputs(pipe).items())


def test_a_transformers_model_parks_its_adapters_and_full_copies(moves):
    from llm_tiny import input_ids, logits, tiny_llama

    model = lora_loader.attach(tiny_llama(0))
    config = dict(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    for i, name in enumerate(["a", "b", "c"]):
        torch.manual_seed(i)
        model.add_adapter(lora_loader.LoraConfig(**config), adapter_name=name)
    with torch.no_grad():
        model.lm_head.lora_copies["a"].weight.add_(0.5)  # make a's copy differ from the base head
    model.set_max_resident_adapters(1)
    model.set_adapter("a")
    ids = input_ids()
    before = logits(model, ids)
    copy_a = {id(model.lm_head.lora_copies["a"])}
    moves.clear()
    model.set_adapter("b")
    assert residency(model) == (["b"], ["c", "a"])  # recency: c, then a (activated again after c)
    assert moved(moves, copy_a) == [CPU]  # the modules_to_save copy is parked with the factors
    model.set_adapter("c")
    model.set_adapter("a")
    assert residency(model) == (["a"], ["b", "c"])
    assert torch.equal(logits(model, ids), before)
    model.disable_adapters()
    model.enable_adapters()
    assert torch.equal(logits(model, ids), before)


# -- set_lora_device and arguments -----------------------------------------------------------------------


def test_set_lora_device_moves_only_the_named_adapters_and_a_bad_argument_moves_nothing(moves):
    model = seq_model()
    load_seq(model, ["a", "b"])
    model.set_adapters("b")
    a, b = adapter_modules(model, "a"), adapter_modules(model, "b")
    before = model(torch.ones(1, 8))
    moves.clear()
    model.set_lora_device(["a"], "cpu")
    assert moved(moves, a) == [CPU, CPU] and moved(moves, b) == []
    assert residency(model) == (["a", "b"], [])  # the CPU is where these layers compute: a is still resident
    moves.clear()
    for bad in ("meta", "no-such-device", 3.5):
        with pytest.raises(LoraError):
            model.set_lora_device(["a"], bad)
    with pytest.raises(LoraNameError, match="'nope'"):
        model.set_lora_device(["a", "nope"], "cpu")
    assert moves == []
    model.set_adapters(["a", "b"])
    model.set_adapters("b")
    assert torch.equal(model(torch.ones(1, 8)), before)


def test_set_max_resident_adapters_checks_its_arguments_and_a_bad_one_changes_nothing():
    model = seq_model()
    model.set_max_resident_adapters(2)
    load_seq(model, ["a", "b", "c"])
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(LoraError, match="max_resident"):
            model.set_max_resident_adapters(bad)
    with pytest.raises(LoraError, match="meta"):
        model.set_max_resident_adapters(0, park_device="meta")
    with pytest.raises(LoraError, match="park_device"):
        model.set_max_resident_adapters(0, park_device="nowhere")
    model.set_adapters("c")  # the cap is still 2 (not 0 from a refused call)
    assert residency(model) == (["b", "c"], ["a"])


def test_the_cap_outlives_unloading_every_adapter():
    model = seq_model()
    model.set_max_resident_adapters(1)
    load_seq(model, ["a", "b"])
    model.unload_lora_weights()
    assert residency(model) == ([], [])
    assert not any(isinstance(m, lora_loader.layers.LoraLayer) for m in model.modules())
    load_seq(model, ["c", "d"])
    model.set_adapters("d")
    assert residency(model) == (["d"], ["c"])


# -- 50 adapters on a tiny UNet ----------------------------------------------------------------------------

ATTENTION = re.compile(r".*\.(to_q|to_k|to_v|to_out\.0)")


def unet_lora(unet, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers-layout UNet LoRA (``unet.<module>.lora_A/B.weight``) on every attention projection."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, module in unet.named_modules():
        if ATTENTION.fullmatch(path):
            sd[f"unet.{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            sd[f"unet.{path}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return sd


@torch.no_grad()
def unet_out(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


def test_fifty_adapters_switch_to_the_same_outputs_as_loading_only_that_adapter():
    pipe = tiny_sd_pipeline(0)
    unet = lora_loader.attach(pipe.unet)
    inputs = unet_inputs(pipe)
    single = lora_loader.attach(tiny_sd_pipeline(0).unet)
    files = [unet_lora(unet, 1000 + i) for i in range(50)]
    unet.set_max_resident_adapters(4)
    for i, sd in enumerate(files):
        unet.load_lora_weights(sd, adapter_name=f"a{i}")
    assert len(unet.get_list_adapters()["model"]) == 50
    base = unet_out(single, inputs)
    for k in (0, 17, 49, 3, 17):
        unet.set_adapters(f"a{k}")
        resident, parked = residency(unet)
        assert f"a{k}" in resident and len(resident) == 4 and len(parked) == 46
        got = unet_out(unet, inputs)
        single.load_lora_weights(files[k], adapter_name="only")
        expected = unet_out(single, inputs)
        single.delete_adapters("only")
        assert (expected - base).abs().max() > 1e-3
        assert torch.equal(got, expected), k
    # a blend of two parked adapters, against a model holding only those two
    unet.set_adapters(["a5", "a40"], [0.7, 0.3])
    single.load_lora_weights(files[5], adapter_name="a5")
    single.load_lora_weights(files[40], adapter_name="a40")
    single.set_adapters(["a5", "a40"], [0.7, 0.3])
    assert torch.allclose(unet_out(unet, inputs), unet_out(single, inputs), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_a_switch_among_fifty_matches_diffusers_and_peft():
    """diffusers+peft (the oracle) holds 5 of the adapters (loading 50 into it takes ~30 s here)."""
    pipe = tiny_sd_pipeline(0)
    inputs = unet_inputs(pipe)
    unet = lora_loader.attach(pipe.unet)
    oracle = tiny_sd_pipeline(0).unet
    unet.set_max_resident_adapters(2)
    for i in range(50):
        unet.load_lora_weights(unet_lora(unet, 2000 + i), adapter_name=f"a{i}")
    for i in range(5):
        oracle.load_lora_adapter(unet_lora(oracle, 2000 + i), prefix="unet", adapter_name=f"a{i}")
    base = unet_out(tiny_sd_pipeline(0).unet, inputs)
    unet.set_adapters("a3", 0.8)
    oracle.set_adapters(["a3"], [0.8])
    ours, theirs = unet_out(unet, inputs), unet_out(oracle, inputs)
    assert (theirs - base).abs().max() > 1e-3
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)


# -- a real second device ------------------------------------------------------------------------------


class TwoDevices(nn.Module):
    """Layer ``a`` on the GPU, layer ``b`` on the CPU, as a dispatched model may place them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8).cuda()
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.cuda())).cpu())


def two_device_lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{layer}.{part}.weight": torch.randn(shape, generator=g) * 0.5
            for layer in ("a", "b") for part, shape in (("lora_A", (2, 8)), ("lora_B", (8, 2)))}


def devices_of(model, name: str) -> dict[str, set[torch.device]]:
    return {layer: {t.device for t in getattr(model, layer).lora_adapters[name].parameters()} | {
        t.device for t in getattr(model, layer).lora_adapters[name].buffers()} for layer in ("a", "b")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to park on an observably different device")
def test_on_a_gpu_parked_tensors_leave_it_and_come_back_to_each_layers_device():
    gpu = torch.device("cuda", torch.cuda.current_device())
    model = lora_loader.attach(TwoDevices())
    for i, name in enumerate(["x", "y", "z"]):
        model.load_lora_weights(two_device_lora(i), adapter_name=name)
    x = torch.randn(3, 8)
    model.set_adapters(["x", "y"], [0.7, 0.4])
    with torch.no_grad():
        blend = model(x)  # two active: the concatenated factors, cached on the GPU
    model.set_adapters("x")
    with torch.no_grad():
        only_x = model(x)
    model.set_max_resident_adapters(1, park_device="cpu")
    model.set_adapters("z")
    assert residency(model) == (["z"], ["y", "x"])  # recency: y, x (the last one active), z
    assert devices_of(model, "x") == {"a": {CPU}, "b": {CPU}}
    assert devices_of(model, "z") == {"a": {gpu}, "b": {CPU}}
    model.set_adapters(["x", "y"], [0.7, 0.4])
    assert devices_of(model, "x") == {"a": {gpu}, "b": {CPU}}
    with torch.no_grad():
        assert torch.equal(model(x), blend)
    model.set_max_resident_adapters(None)
    model.set_adapters("x")
    model.set_lora_device(["x"], "cpu")  # an active adapter moved off its GPU layer by hand
    assert "x" in residency(model)[1]
    model.disable_lora()
    model.enable_lora()  # enabling brings it back before any forward
    assert devices_of(model, "x") == {"a": {gpu}, "b": {CPU}}
    with torch.no_grad():
        assert torch.equal(model(x), only_x)
