"""XLabs' Flux LoRAs (x-flux): LoRA layers inside the attention processors.

``double_blocks.{i}.processor.qkv_lora1`` adds to the image stream's fused
q/k/v projection, ``qkv_lora2`` to the text stream's, ``proj_lora1`` /
``proj_lora2`` to their output projections; ``single_blocks.{i}.processor.qkv_lora``
adds to the q/k/v rows of the single block's fused ``linear1`` and ``proj_lora``
to ``linear2``. Each has ``.down.weight`` / ``.up.weight`` and no alpha (x-flux's
``LoRALinearLayer`` without ``network_alpha``: scale 1). A keys may carry a
``diffusion_model.`` prefix. Fused q/k/v LoRAs stay one product: the parts share
``down`` and take their third of ``up``'s rows.
"""

from __future__ import annotations

import re

import torch

from ..delta import LoraDelta
from .canonical import ConvertedLora

_KEY = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.((?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")
_DOUBLE = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "proj_lora1": ("attn.to_out.0",),
    "proj_lora2": ("attn.to_add_out",),
}
_SINGLE = {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)}


def claims(key: str) -> bool:
    return ".processor." in key and _KEY.match(key) is not None


def convert(tensors: dict[str, torch.Tensor], configs: dict) -> ConvertedLora:
    result = ConvertedLora()
    layers: dict[tuple[str, str, str], dict[str, str]] = {}
    for key in tensors:
        kind, index, layer, role = _KEY.match(key).groups()
        layers.setdefault((kind, index, layer), {})[role] = key
    for (kind, index, layer), keys in layers.items():
        targets = (_DOUBLE if kind == "double" else _SINGLE).get(layer)
        if targets is None:
            for key in keys.values():
                result.unknown[key] = f"XLabs {kind} blocks have no '{layer}' (expected one of {sorted(_DOUBLE if kind == 'double' else _SINGLE)})"
            continue
        if set(keys) != {"down", "up"}:
            for key in keys.values():
                result.unknown[key] = f"its {'up' if 'down' in keys else 'down'}.weight partner is missing"
            continue
        down, up = tensors[keys["down"]], tensors[keys["up"]]
        if up.shape[0] % len(targets):
            for key in keys.values():
                result.unknown[key] = f"up.weight has {up.shape[0]} rows, which do not split into q, k and v"
            continue
        block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}"
        used = (keys["down"], keys["up"])
        for target, rows in zip(targets, up.chunk(len(targets), dim=0)):
            result.deltas[("denoiser", f"{block}.{target}")] = LoraDelta(down, rows, None, keys=used)
    return result
