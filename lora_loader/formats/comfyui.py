"""ComfyUI's layout: the original model's dotted module names behind a component prefix.

ComfyUI keys a LoRA by the checkpoint's own names: ``diffusion_model.<path>`` for
the denoiser (Black Forest Labs' names for Flux, Stability's ``input_blocks.*``
for SD / SDXL) and ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>`` for
the text encoders, with any of the suffixes its loader reads (``lora_up`` /
``lora_down``, ``lora_A`` / ``lora_B``, ``alpha`` and the LyCORIS factors). That
is the Kohya naming with dots instead of underscores, so each key is renamed to
its Kohya spelling and `kohya.convert` does the rest; reports name the
original keys.
"""

from __future__ import annotations

import dataclasses

import torch

from ..algorithms import all_factor_keys
from . import kohya as kohya_format
from .canonical import ConvertedLora

DENOISER = "diffusion_model."
# ComfyUI's text encoder names -> the Kohya prefix of the same encoder.
TEXT_ENCODERS = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
_SUFFIXES = {s: s for s in sorted(all_factor_keys())} | {
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff_m": "diff_m",  # LightX2V: the diff of the module's modulation parameter (formats.kohya)
    "magnitude": "dora_scale",  # ai-toolkit's DoRA: PEFT's per-row magnitude, LyCORIS' dora_scale on the output axis
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
}
_LONGEST_FIRST = sorted(_SUFFIXES, key=len, reverse=True)


def claims(key: str) -> bool:
    return key.startswith((DENOISER, "text_encoders."))


def kohya_key(key: str) -> str | None:
    """``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` -> ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``."""
    suffix = next((s for s in _LONGEST_FIRST if key.endswith("." + s)), None)
    if suffix is None:
        return None
    path = key[: -len(suffix) - 1]
    if path.startswith(DENOISER):
        prefix, path = "lora_unet_", path[len(DENOISER):]
    else:
        _, encoder, wrapper, path = (path.split(".", 3) + ["", "", ""])[:4]
        prefix = TEXT_ENCODERS.get(encoder)
        if prefix is None or wrapper != "transformer" or not path:
            return None
    return f"{prefix}{path.replace('.', '_')}.{_SUFFIXES[suffix]}"


def convert(tensors: dict[str, torch.Tensor], configs: dict) -> ConvertedLora:
    original: dict[str, str] = {}  # Kohya spelling -> the file's key
    renamed: dict[str, torch.Tensor] = {}
    unknown: dict[str, str] = {}
    for key, tensor in tensors.items():
        new = kohya_key(key)
        if new is None:
            unknown[key] = (
                "a ComfyUI key must be diffusion_model.<module>.<suffix> or "
                f"text_encoders.<{'|'.join(TEXT_ENCODERS)}>.transformer.<module>.<suffix>, with a LoRA or LyCORIS suffix"
            )
            continue
        if new in original:
            unknown[key] = f"names the same tensor as '{original[new]}' in another spelling"
            continue
        original[new] = key
        renamed[new] = tensor
    part = kohya_format.convert(renamed, configs)
    back = original.__getitem__
    result = ConvertedLora()
    result.deltas = {
        target: dataclasses.replace(delta, keys=tuple(map(back, delta.keys))) for target, delta in part.deltas.items()
    }
    result.unknown = unknown | {back(k): why for k, why in part.unknown.items()}
    result.ignored = [back(k) for k in part.ignored]
    result.unrecognized = {back(k) for k in part.unrecognized}
    result.alternatives = [  # another family's reading, for the live model (`original_names.for_model`), keys spelled back
        dataclasses.replace(alt, deltas={t: dataclasses.replace(d, keys=tuple(map(back, d.keys))) for t, d in alt.deltas.items()},
                            unknown={back(k): why for k, why in alt.unknown.items()}, instead=(alt.instead[0], tuple(map(back, alt.instead[1]))))
        for alt in part.alternatives
    ]  # fmt: skip
    return result
