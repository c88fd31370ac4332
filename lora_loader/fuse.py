"""Fusing: the current blend written into the base weights, and undone bit for bit.

`fuse` computes each layer's dense delta in fp32 and gives the parameter a
new tensor ``W + delta``; the original tensor object is kept, not a copy of
it, so `unfuse` is an exact, O(1) swap back (diffusers+peft subtract a
recomputed delta instead, which drifts in fp16/bf16). `disable_lora` on a
fused model swaps the original tensors in, `enable_lora` the fused ones:
nothing is recomputed at forward time.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LoraAdapter, LoraLayer, supported_kind


def _base_dense(module: nn.Module) -> torch.Tensor:
    """The base weight as ``[out, in...]`` (Conv1D and Embedding store it transposed)."""
    weight = module.weight.detach().float()
    return weight.T if supported_kind(module) in ("conv1d", "embedding") else weight


def dense_delta(module: nn.Module, adapter: LoraAdapter, weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight delta in the base layout, bias delta or None)`` of one adapter at blend weight ``weight``, in fp32."""
    kind = supported_kind(module)
    up, down = adapter.up.detach().float(), adapter.down.detach().float()
    if kind == "conv2d":
        product = torch.einsum("or,rihw->oihw", up.flatten(1), down)
    else:
        product = up @ down
    if adapter.magnitude is None:
        delta = weight * adapter.scale * product
    else:  # DoRA: rows of W + s*BA rescaled to the magnitude; weight w interpolates from W to that
        base = _base_dense(module)
        combined = base + adapter.scale * product
        norm = torch.linalg.norm(combined.flatten(1), dim=1).view(-1, *([1] * (combined.dim() - 1)))
        delta = weight * (adapter.magnitude.detach().float().view_as(norm) / norm * combined - base)
    if kind in ("conv1d", "embedding"):
        delta = delta.T
    bias = None if adapter.bias_delta is None else weight * adapter.bias_delta.detach().float()
    return delta, bias


def fuse_layer(module: LoraLayer, adapters: list[tuple[LoraAdapter, float]]) -> None:
    """Write ``sum(w * delta)`` into the module's weight (and bias); keep the original tensors to restore."""
    weight_delta, bias_delta = None, None
    for adapter, w in adapters:
        d, b = dense_delta(module, adapter, w)
        weight_delta = d if weight_delta is None else weight_delta + d
        if b is not None:
            bias_delta = b if bias_delta is None else bias_delta + b
    original_weight = module.weight.data
    fused_weight = (original_weight.float() + weight_delta.to(original_weight.device)).to(original_weight.dtype)
    original_bias = fused_bias = None
    if bias_delta is not None:
        original_bias = module.bias.data
        fused_bias = (original_bias.float() + bias_delta.to(original_bias.device)).to(original_bias.dtype)
    module._lora_fusion = {"base": (original_weight, original_bias), "fused": (fused_weight, fused_bias)}
    show_fused(module, True)


def show_fused(module: LoraLayer, fused: bool) -> None:
    """Point the parameters at the fused or at the original tensors (an O(1) swap)."""
    fusion = module.__dict__.get("_lora_fusion")
    if fusion is None:
        return
    weight, bias = fusion["fused" if fused else "base"]
    module.weight.data = weight
    if bias is not None:
        module.bias.data = bias


def unfuse_layer(module: LoraLayer) -> None:
    """Restore the exact original tensors and forget the fusion."""
    show_fused(module, False)
    module.__dict__.pop("_lora_fusion", None)


def keep_fused(module: LoraLayer) -> None:
    """Make the fused weights the module's own for good (diffusers' "fuse, then unload")."""
    show_fused(module, True)
    module.__dict__.pop("_lora_fusion", None)
