"""An adapter algorithm is one declaration in algorithms/; one whose delta depends on the layer's
weight (as OFT's rotation does) is given that weight, in the unfused forward and in fusing alike."""

import pytest
import torch
from torch import nn

from lora_loader import algorithms
from lora_loader.algorithms import ALGORITHMS, Algorithm, algorithm_of_suffixes
from lora_loader.delta import FactorDelta
from lora_loader.fuse import dense_delta
from lora_loader.layers import adapter_from_delta, show_active, wrap


class GrowBase(Algorithm):
    """A toy algorithm: the delta is ``g`` times the layer's own weight."""

    kind, title = "grow_base", "grow-base (test)"
    factor_keys = required_keys = ("grow.g",)
    uses_base_weight = True

    def claims(self, factors):
        return "grow.g" in factors

    def scale(self, factors, alpha):
        return 1.0

    def dense(self, factors, base_weight=None):
        return factors["grow.g"] * base_weight

    def dense_shape(self, shapes):
        return None  # unknown until the layer is known


@pytest.fixture
def grow_base(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, GrowBase.kind, GrowBase())


def test_a_registered_algorithm_is_found_by_its_suffixes(grow_base):
    assert algorithm_of_suffixes({"grow.g", "alpha"}).kind == "grow_base"
    assert algorithms.algorithm("grow_base").title == "grow-base (test)"


def test_an_algorithm_that_uses_the_base_weight_gets_it_in_the_forward_and_in_fusing(grow_base):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    adapter = adapter_from_delta(FactorDelta("grow_base", {"grow.g": torch.tensor(0.5)}), layer)
    wrap(layer)
    layer.lora_adapters["t"] = adapter
    adapter.set_blend_weight(1.0)
    show_active({layer: [(adapter, adapter.weighted_scale)]})
    x = torch.randn(4, 3)

    assert torch.allclose(layer(x), nn.functional.linear(x, 1.5 * weight, bias), atol=1e-6)
    delta, _ = dense_delta(layer, adapter, 1.0)
    assert torch.allclose(delta, 0.5 * weight)
