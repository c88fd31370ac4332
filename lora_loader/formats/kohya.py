"""Kohya / sd-scripts keys: ``lora_unet_<mangled path>.lora_down.weight`` and friends.

A module's keys share a prefix that names the component and the
underscore-mangled module path:

=================  ================
``lora_unet_``     the UNet / DiT (``"denoiser"``)
``lora_te_``       ``text_encoder`` (SD 1.x / 2.x)
``lora_te1_``      ``text_encoder`` (SDXL CLIP-L)
``lora_te2_``      ``text_encoder_2`` (SDXL CLIP-G)
``lora_te3_``      ``text_encoder_3``
=================  ================

Suffixes: ``.lora_down.weight`` ([r, in] or [r, in, kh, kw]),
``.lora_up.weight`` ([out, r] or [out, r, 1, 1]) and an optional scalar
``.alpha`` of any dtype (scale = alpha / r; absent or 0 means alpha = r, as
sd-scripts' ``LoRAModule`` defines it).
"""

from __future__ import annotations

import torch

from ..delta import LoraDelta

PREFIXES = (
    ("lora_unet_", "denoiser"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
)

# Keys of other algorithms in the same naming: recognised so the error says what they are.
_NOT_YET = {
    "lora_mid.weight": "LoCon Tucker factor (lora_mid) is not supported yet",
    "dora_scale": "DoRA magnitude (dora_scale) is not supported yet",
    "diff": "full weight diff is not supported yet",
    "diff_b": "full bias diff is not supported yet",
    "w_norm": "norm weight diff is not supported yet",
    "b_norm": "norm bias diff is not supported yet",
}


def claims(key: str) -> bool:
    return key.startswith(tuple(prefix for prefix, _ in PREFIXES))


def _split(key: str) -> tuple[str, str, str]:
    """``lora_te1_x_y.lora_up.weight`` -> (component, module, suffix)."""
    module_key, _, suffix = key.partition(".")
    for prefix, component in PREFIXES:
        if module_key.startswith(prefix):
            return component, module_key[len(prefix):], suffix
    raise AssertionError(key)  # claims() guarantees a prefix


def alpha_value(tensor: torch.Tensor) -> float:
    return float(tensor.item() if tensor.numel() == 1 else tensor.detach().float().reshape(-1)[0])


def convert(tensors: dict[str, torch.Tensor], configs: dict) -> "ConvertedLora":  # noqa: F821
    from . import ConvertedLora

    result = ConvertedLora()
    modules: dict[tuple[str, str], dict[str, str]] = {}
    for key in tensors:
        component, module, suffix = _split(key)
        if suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            modules.setdefault((component, module), {})[suffix] = key
        elif suffix in _NOT_YET:
            result.unknown[key] = _NOT_YET[suffix]
        elif suffix.startswith("hada_"):
            result.unknown[key] = "LyCORIS LoHa (hada_*) is not supported yet"
        elif suffix.startswith("lokr_"):
            result.unknown[key] = "LyCORIS LoKr (lokr_*) is not supported yet"
        else:
            result.unknown[key] = "expected .lora_down.weight, .lora_up.weight or .alpha after the module name"
    for (component, module), keys in modules.items():
        down_key, up_key = keys.get("lora_down.weight"), keys.get("lora_up.weight")
        alpha_key = keys.get("alpha")
        if down_key is None and up_key is None:
            result.ignored.append(alpha_key)  # an alpha with no pair changes nothing
            continue
        if down_key is None or up_key is None:
            present = down_key or up_key
            missing = "lora_up.weight" if up_key is None else "lora_down.weight"
            result.unknown[present] = f"its pair {present.split('.')[0]}.{missing} is missing"
            if alpha_key:
                result.ignored.append(alpha_key)
            continue
        alpha = alpha_value(tensors[alpha_key]) if alpha_key else None
        if alpha == 0:
            alpha = None  # sd-scripts: alpha 0 or None means alpha = rank
        used = tuple(k for k in (down_key, up_key, alpha_key) if k)
        result.deltas[(component, module)] = LoraDelta(tensors[down_key], tensors[up_key], alpha, keys=used)
    return result
