"""Black Forest Labs' Flux Control LoRAs: BFL's own dotted module names, no prefix, PEFT suffixes.

FLUX.1-Canny-dev-lora and FLUX.1-Depth-dev-lora are keyed as BFL's ``flux/model.py`` names its
modules (``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``, ``img_in``,
``time_in.in_layer``, ``final_layer.adaLN_modulation.1``, ...) with PEFT's suffixes:

- ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``: a LoRA, no alpha (scale 1);
- ``<module>.lora_B.bias``: PEFT's ``lora_bias=True``, part of the LoRA's output (every module of
  the real files has one: 314 of them);
- ``double_blocks.N.{img,txt}_attn.norm.{query,key}_norm.scale`` and
  ``single_blocks.N.norm.{query,key}_norm.scale``: full RMSNorm scales that replace diffusers'
  ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k`` weights while the adapter is active;
- ``img_in``'s ``lora_A`` is wider than FLUX.1-dev's x_embedder (128 inputs for 64): the loader
  widens the x_embedder (see `widen`).

The names are diffusers' ``_convert_bfl_flux_control_lora_to_diffusers``; fused projections
(``qkv``, ``linear1``) and the final modulation's (shift, scale) halves go through the same
`original_names.FLUX.convert_module` as sd-scripts' Flux files, so their parts share ``lora_A`` and take their
rows of ``lora_B`` and of its bias.
"""

from __future__ import annotations

import re

import torch

from ..delta import LoraDelta
from .canonical import ConvertedLora
from .original_names import FLUX

# BFL's top-level modules; no diffusers module path starts with these. Only Flux's own final-layer modules:
# MiniMax-H3's original names have a final_layer too (adaln_proj.linear, video_out, audio_out).
_ROOT = re.compile(
    r"^(?:(?:double|single)_blocks\.\d+|img_in|txt_in|time_in|vector_in|guidance_in|final_layer\.(?:linear|adaLN_modulation))\."
)
_NORM = re.compile(r"^(?:double_blocks\.(\d+)\.(img|txt)_attn|single_blocks\.(\d+))\.norm\.(query|key)_norm\.scale$")
_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias"}


def claims(key: str) -> bool:
    return _ROOT.match(key) is not None


def norm_target(key: str) -> str | None:
    """The diffusers module whose weight a BFL norm scale is, or None.

    >>> norm_target("double_blocks.3.txt_attn.norm.key_norm.scale")
    'transformer_blocks.3.attn.norm_added_k'
    """
    match = _NORM.match(key)
    if match is None:
        return None
    double, stream, single, which = match.groups()
    qk = "q" if which == "query" else "k"
    if double is not None:
        return f"transformer_blocks.{double}.attn.norm_{'added_' if stream == 'txt' else ''}{qk}"
    return f"single_transformer_blocks.{single}.attn.norm_{qk}"


def convert(tensors: dict[str, torch.Tensor], configs: dict) -> ConvertedLora:
    result = ConvertedLora()
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        target = norm_target(key)
        if target is not None:
            result.norm_weights[("denoiser", target)] = key
            continue
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            result.unknown[key] = (
                "a key in Black Forest Labs' Flux names must end in .lora_A.weight, .lora_B.weight or .lora_B.bias, "
                "or be a norm scale (<block>.norm.query_norm.scale / key_norm.scale)"
            )
            continue
        modules.setdefault(key[: -len(suffix) - 1], {})[_SUFFIXES[suffix]] = key
    for module, keys in modules.items():
        if "down" not in keys or "up" not in keys:
            missing = "lora_B.weight" if "down" in keys else "lora_A.weight"
            for key in keys.values():
                result.unknown[key] = f"module {module} has no {missing}"
            continue
        up_bias = tensors[keys["up_bias"]] if "up_bias" in keys else None
        delta = LoraDelta(tensors[keys["down"]], tensors[keys["up"]], None, keys=tuple(keys.values()), up_bias=up_bias)
        parts, why = FLUX.convert_module(module.replace(".", "_"), delta)
        if why is not None:
            for key in keys.values():
                result.unknown[key] = why
            continue
        for path, part in parts:
            result.deltas[("denoiser", path)] = part
    return result
