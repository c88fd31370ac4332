"""transformers models and any torch.nn.Module: the whole model is one component, "model"."""

from __future__ import annotations

from torch import nn

from .adapters import ComponentWeight
from .host import LoraHost, block_or_number

MODEL = "model"


class LoraModelMixin(LoraHost):
    """LoRA calls for a single model (a transformers ``PreTrainedModel``, a diffusers UNet, any ``nn.Module``).

    >>> import torch, lora_loader
    >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    >>> isinstance(model, lora_loader.LoraModelMixin)
    True
    """

    def _lora_components(self) -> dict[str, nn.Module]:
        return {MODEL: self}

    def _lora_resolve_component(self, symbolic: str) -> str | None:
        # Whatever component a file names (unet., transformer., or none), it targets this model.
        return MODEL

    def _lora_component_weights(self, name: str, weights: dict) -> dict[str, ComponentWeight]:
        # A bare block dict ({"down": ..., "up": ...}) is what diffusers' UNet.set_adapters takes.
        if set(weights) <= {"down", "mid", "up"}:
            return {MODEL: block_or_number(MODEL, weights, self, name)}
        if set(weights) == {MODEL}:
            return {MODEL: block_or_number(MODEL, weights[MODEL], self, name)}
        from .errors import LoraError

        raise LoraError(f"adapter '{name}': a model takes a number or UNet block weights, got keys {sorted(weights)}")
