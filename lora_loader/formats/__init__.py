"""Formats: pure functions from a file's raw keys to the canonical form.

``convert(tensors, metadata, adapter_config)`` splits the keys between the
converters that recognise them (Kohya / sd-scripts, XLabs, ComfyUI, diffusers / PEFT) and
returns one `ConvertedLora`. A new format is one new module here and one
entry in `_CONVERTERS`; nothing else changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..delta import LoraDelta
from ..errors import LoraFormatError
from . import comfyui as comfyui_format
from . import diffusers as diffusers_format
from . import flux_control as flux_control_format
from . import kohya as kohya_format
from . import xlabs as xlabs_format

# Symbolic component names a converter may emit. "denoiser" is whichever of
# unet / transformer the host has (or the whole model for a plain nn.Module).
# "t5" is the T5 encoder wherever the pipeline has it (text_encoder_3 in SD3, text_encoder_2 in Flux).
COMPONENTS = ("denoiser", "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "t5")


@dataclass
class ConvertedLora:
    """A file in canonical form.

    ``deltas`` maps ``(component, module_name)`` to a delta; ``module_name`` is
    in the file's own spelling (dotted, Kohya-mangled, Stability layout),
    resolved against the live model by `names.ModuleIndex`. ``unknown`` maps
    keys no converter could use to the reason; ``ignored`` are keys that carry
    nothing to apply (an ``alpha`` with no LoRA pair).
    """

    formats: list[str] = field(default_factory=list)
    deltas: dict[tuple[str, str], LoraDelta] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    # PEFT extras: key -> (component, module, "weight"|"bias") of a base weight saved beside an embedding
    # LoRA (must equal the model's own), and (component, module) -> {param: key} full module copies
    # (PEFT's modules_to_save).
    base_weights: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    module_copies: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    # PEFT's bias="all": (component, module) -> key of the trained bias of a module without LoRA.
    module_biases: dict[tuple[str, str], str] = field(default_factory=dict)
    # Flux Control LoRAs: (component, module) -> key of a full replacement of that module's weight (norm scales).
    norm_weights: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return "+".join(self.formats) if self.formats else "unknown"


# (name, claims(key) -> bool, convert(tensors, configs) -> ConvertedLora), tried in order: XLabs, ComfyUI and
# BFL's Flux Control names before diffusers, whose suffix rules would claim their lora_A / _lora.down keys too.
_CONVERTERS = (
    ("kohya", kohya_format.claims, kohya_format.convert),
    ("xlabs", xlabs_format.claims, xlabs_format.convert),
    ("comfyui", comfyui_format.claims, comfyui_format.convert),
    ("bfl", flux_control_format.claims, flux_control_format.convert),
    ("diffusers", diffusers_format.claims, diffusers_format.convert),
)


def adapter_configs(metadata: dict[str, str] | None, adapter_config: dict | None) -> dict[str, dict]:
    """PEFT configs per component, from diffusers' ``lora_adapter_metadata`` header or ``adapter_config.json``.

    diffusers writes the pipeline's configs flattened with a component prefix
    (``"unet.lora_alpha"``); a model-level save or a PEFT folder has no prefix,
    which we file under ``""`` (applies to every component without its own).
    """
    configs: dict[str, dict] = {}
    if adapter_config:
        configs[""] = dict(adapter_config)
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LoraFormatError(f"the safetensors header entry 'lora_adapter_metadata' is not valid JSON ({err})") from None
        for key, value in flat.items():
            component, _, field_name = key.rpartition(".")
            if component not in COMPONENTS:
                component, field_name = "", key
            configs.setdefault(component, {})[field_name] = value
    return configs


def convert(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    adapter_config: dict | None = None,
) -> ConvertedLora:
    """Convert a state dict to canonical form; every key ends up in ``deltas``, ``unknown`` or ``ignored``.

    >>> import torch
    >>> sd = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
    ...       "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1)}
    >>> converted = convert(sd)
    >>> converted.format, list(converted.deltas)
    ('kohya', [('denoiser', 'conv_in')])
    """
    configs = adapter_configs(metadata, adapter_config)
    result = ConvertedLora()
    remaining = dict(tensors)
    for name, claims, converter in _CONVERTERS:
        mine = {k: v for k, v in remaining.items() if claims(k)}
        if not mine:
            continue
        for k in mine:
            del remaining[k]
        part = converter(mine, configs)
        if part.deltas or part.module_copies or part.norm_weights:
            peft_layout = name == "diffusers" and (adapter_config or any(k.startswith("base_model.model.") for k in mine))
            result.formats.append("peft" if peft_layout else name)
        result.deltas.update(part.deltas)
        result.unknown.update(part.unknown)
        result.ignored.extend(part.ignored)
        result.base_weights.update(part.base_weights)
        result.module_copies.update(part.module_copies)
        result.module_biases.update(part.module_biases)
        result.norm_weights.update(part.norm_weights)
    for key in remaining:
        result.unknown[key] = "not a key of any LoRA format lora_loader reads"
    return result
