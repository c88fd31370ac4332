"""The canonical form every converter produces: `ConvertedLora`, the component names, and what makes a file no LoRA.

A leaf module (it imports only torch, `..delta` and `..errors`), so each
converter imports it at the top and `formats/__init__` imports the converters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..delta import LoraDelta
from ..errors import LoraFormatError

# Symbolic component names a converter may emit. "denoiser" is whichever of
# unet / transformer the host has (or the whole model for a plain nn.Module).
# transformer_2: Wan 2.2's second expert; transformer_ref: MiniMax-H3's reference partition; connectors:
# LTX-2's text connectors; text_conditioner: Anima's. "t5" is the T5 encoder wherever the pipeline has it (text_encoder_3 in SD3, text_encoder_2 in Flux).
COMPONENTS = (
    "denoiser", "unet", "transformer", "transformer_2", "transformer_ref", "connectors", "text_conditioner",
    "text_encoder", "text_encoder_2", "text_encoder_3", "t5",
)


@dataclass
class ConvertedLora:
    """A file in canonical form.

    ``deltas`` maps ``(component, module_name)`` to a delta; ``module_name`` is
    in the file's own spelling (dotted, Kohya-mangled, Stability layout),
    resolved against the live model by `names.ModuleIndex`. ``unknown`` maps
    keys no converter could use to the reason; ``ignored`` are keys that carry
    nothing to apply (an ``alpha`` with no LoRA pair). ``unrecognized`` are the
    keys of ``unknown`` that are no LoRA key of any kind (not a LoRA file's key
    at all, as opposed to a LoRA key that is broken or unsupported).

    >>> ConvertedLora(unknown={"x": "why"}, unrecognized={"x"}).is_not_lora()
    True
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
    # key -> why its tensor can be no part of a LoRA (NaN, an integer factor, an alpha of three values, ...);
    # with the keys of its module. Never skipped as "all zero": always reported.
    invalid: dict[str, str] = field(default_factory=dict)
    # Keys of `unknown` that no converter recognises as a LoRA key (see `is_not_lora`).
    unrecognized: set[str] = field(default_factory=set)
    # A file in original names that several families read alike (names and widths: Flux.1's and Flux.2's
    # attention-only files) but map differently: `original_names.Alternative`s, one per other family, which
    # the plan takes instead of ``deltas``' reading when the live model is of that family (`original_names.for_model`).
    alternatives: list = field(default_factory=list)

    @property
    def format(self) -> str:
        return "+".join(self.formats) if self.formats else "unknown"

    def not_lora_key(self, key: str, why: str) -> None:
        """Record ``key`` as no LoRA key of any kind (in ``unknown``, with ``why``, and in ``unrecognized``)."""
        self.unknown[key] = why
        self.unrecognized.add(key)

    def is_not_lora(self) -> bool:
        """True when the file holds nothing of a LoRA: no delta, no norm weight, no invalid tensor,
        and every unknown key is one no converter recognises (a model checkpoint, an embedding, ...)."""
        return not self.deltas and not self.norm_weights and not self.invalid and self.unrecognized >= self.unknown.keys()

    def not_lora_error(self, name: str, tensors: dict[str, torch.Tensor]) -> LoraFormatError:
        """`not_lora_error` for this file (raise it when `is_not_lora`)."""
        return not_lora_error(name, tensors)


def not_lora_error(name: str, tensors: dict[str, torch.Tensor]) -> LoraFormatError:
    """The error for a file `ConvertedLora.is_not_lora` says holds no LoRA; ``name`` is the file, for the message."""
    sample = sorted(tensors)[:5]
    return LoraFormatError(
        f"{name}: not a LoRA file: none of its {len(tensors)} keys is a LoRA key "
        f"(expected e.g. '*.lora_down.weight' or '*.lora_A.weight'; first keys: {sample})"
    )
