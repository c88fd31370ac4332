"""Fusing: the current blend written into the base weights, and undone bit for bit.

`fuse` computes ``W + delta`` in fp32 with one ``addmm`` per layer and gives
the parameter that new tensor; the original tensor object is kept, not a copy of
it, so `unfuse` is an exact, O(1) swap back (diffusers+peft subtract a
recomputed delta instead, which drifts in fp16/bf16). `disable_lora` on a
fused model swaps the original tensors in, `enable_lora` the fused ones:
nothing is recomputed at forward time. A fused layer moved or cast with the
model (``pipe.to("cuda")``, ``.half()``) converts the tensor it keeps aside too
(`follow_conversion`), so what unfuse restores is on the model's device and dtype.

A bitsandbytes 8-/4-bit layer is fused on its dequantized weight and the sum
quantized again (see `quantized`): lossy, like PEFT's merge, and still undone
exactly, since the original quantized parameter is what `unfuse` puts back.
A layer offloaded by accelerate has its fused weight written into its hook's
weights map instead (see `offload`).
"""

from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

from . import offload, quantized
from .algorithms import dora
from .algorithms.lora import low_rank_product
from . import param_layer
from .layers import FactorAdapter, LoraAdapter, LoraLayer, dense_base_weight, is_plain_lora, layer_type


def _base_dense(module: nn.Module) -> torch.Tensor:
    """The base weight as ``[out, in...]`` in fp32."""
    return dense_base_weight(module).detach().float()


def dense_delta(module: nn.Module, adapter: LoraAdapter, weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight delta in the base layout, bias delta or None)`` of one adapter at blend weight ``weight``, in fp32.
    A LoRA on parameters gives the changes of all its parameters, flattened and concatenated."""
    if isinstance(adapter, param_layer.ParamAdapter):
        changes = [(weight * p.scale * p.delta(torch.float32)).reshape(-1) for p in adapter.parts.values()]
        return torch.cat(changes), None
    if isinstance(adapter, FactorAdapter):
        return _factor_delta(module, adapter, weight)
    product = low_rank_product(adapter.up.detach().float(), adapter.down.detach().float())
    if adapter.magnitude is None:
        delta = weight * adapter.scale * product
    else:  # DoRA: rows of W + s*BA rescaled to the magnitude; weight w interpolates from W to that
        base = _base_dense(module)
        delta = weight * (dora.rescale(base + adapter.scale * product, adapter.magnitude.detach().float()) - base)
    if layer_type(module) in ("conv1d", "embedding"):
        delta = delta.T
    bias = None if adapter.bias_delta is None else weight * adapter.bias_delta.detach().float()
    if adapter.up_bias is not None:  # lora_B.bias, scaled like the LoRA
        up_bias = weight * adapter.scale * adapter.up_bias.detach().float()
        bias = up_bias if bias is None else bias + up_bias
    return delta, bias


def _factor_delta(module: nn.Module, adapter: FactorAdapter, weight: float):
    """A `FactorAdapter`'s ``weight * scale * dense`` (or its DoRA ``weight * (W_dora - W)``), base layout, fp32."""
    with torch.no_grad():
        dense = adapter.dense(torch.float32, module)
        if adapter.dora_scale is None:
            delta = None if dense is None else weight * adapter.scale * dense
        else:
            base = _base_dense(module)
            combined = base if dense is None else base + adapter.scale * dense
            delta = weight * (dora.lycoris_weight(combined, adapter.dora_scale.float()) - base)
        if delta is not None and layer_type(module) in ("conv1d", "embedding"):
            delta = delta.T
        bias = None if adapter.bias_delta is None else weight * adapter.bias_delta.detach().float()
    return delta, bias


def fuse_problem(module: LoraLayer, adapters) -> str | None:
    """Why ``adapters`` cannot be fused into ``module`` (checked for every layer before any is fused), or None."""
    if isinstance(module, param_layer.LoraParamMixin):
        return param_layer.fuse_problem(module)
    if getattr(module, "bias", None) is None and any(getattr(a, "up_bias", None) is not None for a, _ in adapters):
        return "it has no bias for the adapter's lora_B.bias to be fused into (it runs unfused as it is)"
    return None


def fuse_layer(module: LoraLayer, adapters: list[tuple[LoraAdapter, float]]) -> None:
    """Write ``sum(w * delta)`` into the module's weight (and bias); keep the original tensors to restore.

    The plain LoRA adapters of a layer are fused with one ``addmm`` in fp32 over
    their concatenated factors (``W + [w_i s_i B_i] @ [A_i]``): one new tensor per
    layer and no dense delta in between. DoRA adapters add their dense delta. A LoRA on parameters
    writes each adapted parameter (`param_layer.fuse_params`).
    """
    if isinstance(module, param_layer.LoraParamMixin):
        param_layer.fuse_params(module, adapters)
        return
    is_quantized = quantized.is_quantized(module)
    if is_quantized:  # fused in fp32 on the dequantized weight, then quantized again (lossy, as PEFT's merge)
        original_weight = quantized.snapshot(module)
        base = quantized.dequantized_weight(module).float()
    else:  # an offloaded layer (accelerate) holds meta tensors: its weights are in the hook's weights map
        original_weight = offload.real_tensor(module, "weight").data
        base = original_weight if original_weight.dtype == torch.float32 else original_weight.float()
    kind = layer_type(module)
    plain = [(a, w) for a, w in adapters if is_plain_lora(a)]
    if plain:
        up = torch.cat([a.up.detach().flatten(1).float() * (w * a.scale) for a, w in plain], dim=1)
        down = torch.cat([a.down.detach().flatten(1).float() for a, _ in plain], dim=0)
        up, down = up.to(base.device), down.to(base.device)
        if kind in ("conv1d", "embedding"):  # weight stored [in, out]: W + (B A)^T = W + A^T B^T
            fused = torch.addmm(base, down.T, up.T)
        else:
            fused = torch.addmm(base.reshape(base.shape[0], -1), up, down).view(base.shape)
    else:
        fused = base.clone()
    bias_delta = None
    for adapter, w in adapters:
        if type(adapter) is FactorAdapter or adapter.magnitude is not None:
            d, _ = dense_delta(module, adapter, w)
            if d is not None:
                fused += d.to(fused.device).view(fused.shape)
        if adapter.bias_delta is not None:
            b = w * adapter.bias_delta.detach().float()
            bias_delta = b if bias_delta is None else bias_delta + b
        if adapter.up_bias is not None:  # lora_B.bias, scaled like the LoRA (the planner saw the module has a bias)
            b = (w * adapter.scale) * adapter.up_bias.detach().float()
            bias_delta = b if bias_delta is None else bias_delta + b
    if is_quantized:
        fused_weight = quantized.quantized_like(module, fused)
    else:
        fused_weight = fused if fused.dtype == original_weight.dtype else fused.to(original_weight.dtype)
    original_bias = fused_bias = None
    if bias_delta is not None:
        original_bias = offload.real_tensor(module, "bias").data
        fused_bias = (original_bias.float() + bias_delta.to(original_bias.device)).to(original_bias.dtype)
    fusion = Fusion(base=(original_weight, original_bias), fused=(fused_weight, fused_bias))
    if offload.is_offloaded(module):
        # Which originals the hook keeps in memory (restored as they are) rather than reads from disk (forgotten).
        fusion.in_memory = {name: offload.stored_here(module, name) for name in _own_tensors(module)}
    module.set_lora_fusion(fusion)
    show_fused(module, True)


@dataclass
class Fusion:
    """What a fused layer keeps: its original and its fused ``(weight, bias)`` tensors, which one it shows,
    and for a layer offloaded by accelerate which originals its hook holds in memory."""

    base: tuple
    fused: tuple
    shown_fused: bool = False
    in_memory: dict[str, bool] | None = None

    def follow_conversion(self, module: LoraLayer, fn) -> None:
        """After ``module._apply(fn)`` (``.to(device)``, ``.to(dtype)``, ``.half()``, ``.cuda()``), convert the
        tensor kept aside too, so a later swap (unfuse, disable) gives a tensor on the model's device and
        dtype. The original converted is exactly what converting the unfused model gives, so unfuse stays
        bit-exact, and the kept tensor leaves the old device with the model."""
        if self.in_memory is not None or isinstance(self.base[0], tuple):
            return  # offloaded: the hook's weights map holds both; quantized: bitsandbytes owns its state
        with torch.no_grad():
            if self.shown_fused:
                weight, bias = self.base
                self.base = (fn(weight), None if bias is None else fn(bias))
                self.fused = (module.weight.data, None if self.fused[1] is None else module.bias.data)
            else:
                weight, bias = self.fused
                self.fused = (fn(weight), None if bias is None else fn(bias))
                self.base = (module.weight.data, None if self.base[1] is None else module.bias.data)


def _own_tensors(module: nn.Module) -> list[str]:
    """The fusable tensors the module has: ``weight``, and ``bias`` unless it is None."""
    return [name for name in ("weight", "bias") if getattr(module, name, None) is not None]


def show_fused(module: LoraLayer, fused: bool) -> None:
    """Point the parameters at the fused or at the original tensors (an O(1) swap)."""
    fusion = module.__dict__.get("_lora_fusion")
    if fusion is None:
        return
    if isinstance(fusion, param_layer.ParamFusion):
        fusion.show(module, fused)
        return
    weight, bias = fusion.fused if fused else fusion.base
    fusion.shown_fused = fused
    if fusion.in_memory is None and offload.is_offloaded(module):
        # Offloaded after fusing: the hook's map holds what was shown then; both tensors are here, in memory.
        fusion.in_memory = {name: True for name in _own_tensors(module)}
    if fusion.in_memory is not None:  # offloaded: the hook loads what its weights map holds for each call
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None:
                offload.store(module, name, value if fused or fusion.in_memory[name] else None)
        return
    if isinstance(weight, tuple):  # a bitsandbytes parameter and its scales
        quantized.restore(module, weight)
    else:
        module.weight.data = weight
    if bias is not None:
        module.bias.data = bias


def unfuse_layer(module: LoraLayer) -> None:
    """Restore the exact original tensors and forget the fusion."""
    show_fused(module, False)
    module.set_lora_fusion(None)


def keep_fused(module: LoraLayer) -> None:
    """Make the fused weights the module's own for good (diffusers' "fuse, then unload")."""
    show_fused(module, True)
    module.set_lora_fusion(None)
