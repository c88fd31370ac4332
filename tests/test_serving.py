"""Adapters served by name: a resolver loads them on first use, pinning exempts them from the residency cap,
and the eviction policy (LRU or FIFO) is chosen with the cap.

Outputs are checked against each adapter loaded the ordinary way (``load_adapter`` then ``set_adapter``),
and residency against the order of loads, uses and evictions the policy defines.
"""

from __future__ import annotations

import peft
import pytest
import torch
from llm_tiny import input_ids, logits, peft_adapter, tiny_llama
from torch import nn

import lora_loader
from lora_loader import LoraError, LoraNameError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")
NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder of PEFT adapters, one sub-folder per name (as a serving engine's adapter directory)."""
    root = tmp_path_factory.mktemp("served")
    for i, name in enumerate(NAMES):
        config = peft.LoraConfig(r=4, lora_alpha=4 + 2 * i, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_adapter(tiny_llama(0), config, root / name, seed=40 + i)
    return root


def alone(folder, name: str, ids=None) -> torch.Tensor:
    model = lora_loader.attach(tiny_llama(0))
    model.load_adapter(str(folder / name), adapter_name=name)
    return logits(model, ids)


def test_set_adapters_loads_an_adapter_the_resolver_knows_on_first_use(folder):
    model = lora_loader.attach(tiny_llama(0))
    model.set_adapter_resolver(str(folder))
    model.set_adapters(["b"])
    assert model.get_list_adapters() == {"model": ["b"]} and model.active_adapters() == ["b"]
    torch.testing.assert_close(logits(model), alone(folder, "b"), rtol=0, atol=0)
    model.set_adapter("c")  # transformers' name too
    assert sorted(model.get_list_adapters()["model"]) == ["b", "c"]
    torch.testing.assert_close(logits(model), alone(folder, "c"), rtol=0, atol=0)


def test_a_name_the_resolver_does_not_know_is_refused_and_changes_nothing(folder):
    model = lora_loader.attach(tiny_llama(0))
    model.set_adapter_resolver(str(folder))
    model.set_adapters("a")
    with pytest.raises(LoraNameError, match="nope"):
        model.set_adapters(["a", "nope"])
    with pytest.raises(LoraNameError, match="nope"):
        model(input_ids(), adapter_names=["a", "nope"])
    for escape in ("../a", "/etc/passwd", ".hidden"):
        with pytest.raises(LoraNameError):
            model.set_adapters(escape)
    assert model.get_list_adapters() == {"model": ["a"]} and model.active_adapters() == ["a"]


def test_a_mixed_batch_loads_its_adapters_on_first_use_without_changing_the_active_set(folder):
    model = lora_loader.attach(tiny_llama(0))
    model.set_adapter_resolver(str(folder))
    model.set_adapters("a")
    ids = input_ids(batch=3)
    out = model(input_ids=ids, adapter_names=["b", "__base__", "c"]).logits.detach()
    assert model.active_adapters() == ["a"]
    assert sorted(model.get_list_adapters()["model"]) == ["a", "b", "c"]
    torch.testing.assert_close(out[0:1], alone(folder, "b", ids[0:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2], logits(tiny_llama(0), ids[1:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:3], alone(folder, "c", ids[2:3]), rtol=1e-5, atol=1e-5)


def test_each_adapter_is_loaded_once_whatever_the_resolver_is(folder):
    asked: list[str] = []

    def resolver(name):
        asked.append(name)
        return str(folder / name) if name in NAMES else None

    model = lora_loader.attach(tiny_llama(0))
    model.set_adapter_resolver(resolver)
    model.set_adapters(["a", "b"])
    model(input_ids(batch=3), adapter_names=["b", "c", "c"])
    model.set_adapters("c")
    assert asked == ["a", "b", "c"]
    with pytest.raises(LoraError, match="resolver must be"):
        model.set_adapter_resolver(42)


def test_a_hub_namespace_resolves_a_name_to_its_repo(folder, tmp_path, monkeypatch):
    import huggingface_hub
    from test_sources import hub_cache_add

    cache = tmp_path / "hub"
    files = {p.name: p for p in (folder / "d").iterdir() if p.is_file()}
    hub_cache_add(cache, "my-org/d", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = lora_loader.attach(tiny_llama(0))
    model.set_adapter_resolver("my-org")
    model.set_adapters("d")
    torch.testing.assert_close(logits(model), alone(folder, "d"), rtol=0, atol=0)


# -- residency: pinning and the eviction policy ----------------------------------------------------------


def loaded(folder, names=NAMES, **cap):
    model = lora_loader.attach(tiny_llama(0))
    if cap:
        model.set_max_resident_adapters(**cap)
    for name in names:
        model.load_adapter(str(folder / name), adapter_name=name)
    return model


def test_lru_parks_the_least_recently_used_and_fifo_the_first_loaded(folder):
    lru, fifo = loaded(folder, max_resident=2), loaded(folder, max_resident=2, policy="fifo")
    for model in (lru, fifo):
        model.set_adapters("a")  # a used again: the most recent under LRU, still the first loaded under FIFO
        model.set_adapters("c")
    assert lru.lora_residency() == {"resident": ["a", "c"], "parked": ["b", "d"]}
    assert sorted(fifo.lora_residency()["resident"]) == ["c", "d"] and sorted(fifo.lora_residency()["parked"]) == ["a", "b"]
    with pytest.raises(LoraError, match="policy"):
        lru.set_max_resident_adapters(2, policy="random")
    assert lru.lora_residency() == {"resident": ["a", "c"], "parked": ["b", "d"]}


def test_pinned_adapters_are_never_parked_and_do_not_count_against_the_cap(folder):
    model = loaded(folder, names=("a", "b"))
    model.pin_adapters(["a"])
    model.set_max_resident_adapters(1)
    for name in ("c", "d"):
        model.load_adapter(str(folder / name), adapter_name=name)
        model.set_adapters(name)
    residency = model.lora_residency()
    assert "a" in residency["resident"] and sorted(residency["parked"]) == ["b", "c"]
    assert model.pinned_adapters() == ["a"]
    model.unpin_adapters("a")
    assert model.pinned_adapters() == [] and model.lora_residency()["resident"] == ["d"]
    model.set_adapters("a")  # a parked adapter comes back when used, with its outputs
    torch.testing.assert_close(logits(model), alone(folder, "a"), rtol=0, atol=0)


@pytest.fixture
def homecomings(monkeypatch):
    """Names of the adapters brought home (moved back to their layers), one entry per move."""
    from lora_loader import residency

    calls: list[str] = []
    original = residency._move

    def recording(record, device):
        if device is None:
            calls.append(record.name)
        return original(record, device)

    monkeypatch.setattr(residency, "_move", recording)
    return calls


def test_a_mixed_batch_over_more_adapters_than_the_cap_brings_each_home_once(folder, homecomings):
    model = loaded(folder, max_resident=1)
    model.set_adapters("d")
    assert sorted(model.lora_residency()["parked"]) == ["a", "b", "c"]
    ids = input_ids(batch=6)
    names = ["a", "b", "a", "c", "b", "__base__"]
    homecomings.clear()
    out = model(input_ids=ids, adapter_names=names).logits.detach()
    assert sorted(homecomings) == ["a", "b", "c"], "each adapter of the batch comes home once, not once per layer or row"
    for row, name in enumerate(names):
        want = logits(tiny_llama(0), ids[row : row + 1]) if name == "__base__" else alone(folder, name, ids[row : row + 1])
        torch.testing.assert_close(out[row : row + 1], want, rtol=1e-5, atol=1e-5)
    # After the batch the cap holds again: the active adapter stays, the batch's adapters are parked (LRU order).
    assert model.lora_residency() == {"resident": ["d"], "parked": ["a", "b", "c"]}
