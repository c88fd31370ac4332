"""Formats: pure functions from a file's raw keys to the canonical form.

``convert(tensors, metadata, adapter_config)`` splits the keys between the
converters that recognise them (Kohya / sd-scripts, XLabs, ComfyUI, diffusers / PEFT) and
returns one `ConvertedLora`. A new format is one new module here and one
entry in `_CONVERTERS`; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings

import torch

from ..config import LoraConfig
from ..errors import LoraError, LoraFormatError, LoraWarning
from . import comfyui as comfyui_format
from . import diffusers as diffusers_format
from . import flux_control as flux_control_format
from . import kohya as kohya_format
from . import xlabs as xlabs_format
from .canonical import COMPONENTS, ConvertedLora, not_lora_error
from .original_names import FAMILIES

__all__ = ["COMPONENTS", "ConvertedLora", "adapter_configs", "convert", "not_lora_error", "tensor_problems"]

# (name, claims(key) -> bool, convert(tensors, configs) -> ConvertedLora), tried in order: XLabs, ComfyUI and
# BFL's Flux Control names before diffusers, whose suffix rules would claim their lora_A / _lora.down keys too.
_CONVERTERS = (
    ("kohya", kohya_format.claims, kohya_format.convert),
    ("xlabs", xlabs_format.claims, xlabs_format.convert),
    ("comfyui", comfyui_format.claims, comfyui_format.convert),
    ("bfl", flux_control_format.claims, flux_control_format.convert),
    ("diffusers", diffusers_format.claims, diffusers_format.convert),
)


# Module names only BFL's Flux checkpoint has (img_in / txt_in are also Qwen-Image's diffusers names, final_layer.linear /
# final_layer.adaLN_modulation.1 HiDream's, Bria Fibo 2's and Z-Image's too: a file with no other BFL name is no Flux file).
_BFL_ONLY = re.compile(r"^(?:(?:double|single)_blocks\.\d+|time_in|vector_in|guidance_in)\.")


def _bfl_names(keys) -> bool:
    """Whether a file's unprefixed keys name a module only BFL's Flux has: then its ``img_in`` is Flux's too.

    >>> _bfl_names(["img_in.lora_A.weight", "double_blocks.0.img_attn.qkv.lora_A.weight"]), _bfl_names(["img_in.lora_A.weight"])
    (True, False)
    >>> _bfl_names(["final_layer.linear.lora_A.weight", "double_stream_blocks.0.block.attn1.to_q.lora_A.weight"])  # HiDream's
    False
    >>> _bfl_names(["final_layer.linear.lora_A.weight", "layers.0.attention.to_q.lora_A.weight"])
    False
    """
    return any(_BFL_ONLY.match(key) for key in keys)


def adapter_configs(metadata: dict[str, str] | None, adapter_config: dict | None) -> dict[str, dict]:
    """PEFT configs per component, from diffusers' ``lora_adapter_metadata`` header or ``adapter_config.json``.

    diffusers writes the pipeline's configs flattened with a component prefix
    (``"unet.lora_alpha"``); a model-level save or a PEFT folder has no prefix,
    which we file under ``""`` (applies to every component without its own).
    """
    configs: dict[str, dict] = {}
    if adapter_config:
        _check_config(adapter_config, "adapter_config.json")
        configs[""] = dict(adapter_config)
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        where = "the safetensors header entry 'lora_adapter_metadata'"
        try:
            flat = json.loads(raw)
        except ValueError as err:
            raise LoraFormatError(f"{where} is not valid JSON ({err})") from None
        if not isinstance(flat, dict):
            raise LoraFormatError(f"{where} must be a JSON object of PEFT config fields, got a {type(flat).__name__}: {raw:.80}")
        from_header: dict[str, dict] = {}
        for key, value in flat.items():
            component, _, field_name = key.rpartition(".")
            if component not in COMPONENTS:
                component, field_name = "", key
            from_header.setdefault(component, {})[field_name] = value
        for component, config in from_header.items():
            _check_config(config, where + (f" ({component})" if component else ""))
            configs.setdefault(component, {}).update(config)
    return configs


# Buffers a modules_to_save copy may carry: integer by nature, not factors.
_INTEGER_BUFFERS = ("num_batches_tracked", "position_ids")


def _value_problem(tensor: torch.Tensor) -> str | None:
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return None
    values = tensor if tensor.dtype.itemsize > 1 else tensor.float()  # no isfinite for float8
    # A sum is finite only if every value is (an Inf or a NaN makes it Inf or NaN) and costs a fraction of
    # isfinite().all() (no bool tensor: that check was most of a load's time on fp16 files); a sum that
    # overflows is checked value by value.
    accumulate = torch.float64 if values.dtype == torch.float64 else torch.float32
    if math.isfinite(float(values.sum(dtype=accumulate))) or bool(torch.isfinite(values).all()):
        return None
    return "holds NaN or Inf values"


def tensor_problems(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor can be no part of a LoRA, with why, before any converter reads a shape.

    An ``alpha`` must be one finite real number (any dtype but bool and complex); every other
    tensor a floating-point one (float8 included) with at least one dimension and one value,
    finite. A bad alpha takes its module's other keys with it: without it they would load at
    another strength.
    """
    problems: dict[str, str] = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha") or key == "alpha":
            if tensor.dtype == torch.bool or tensor.dtype.is_complex:
                problems[key] = f"an alpha of dtype {tensor.dtype}; expected one number"
            elif tensor.numel() != 1:
                problems[key] = f"an alpha of shape {list(tensor.shape)}; expected one number (a scalar)"
            elif tensor.dtype.is_floating_point and not math.isfinite(float(tensor.reshape(-1)[0].float())):
                problems[key] = "an alpha that is NaN or Inf; expected one finite number"
            continue
        if key.endswith(_INTEGER_BUFFERS):
            why = _value_problem(tensor)
        elif not tensor.dtype.is_floating_point:
            why = f"a {str(tensor.dtype).replace('torch.', '')} tensor; LoRA factors are floating point (float32, float16, bfloat16, float8)"
        elif tensor.dim() == 0:
            why = "a 0-d tensor (a single number); LoRA factors have a rank dimension"
        elif tensor.numel() == 0:
            why = f"an empty tensor of shape {list(tensor.shape)} (rank 0?); LoRA factors hold values"
        else:
            why = _value_problem(tensor)
        if why is not None:
            problems[key] = why
    for key in [k for k in problems if k.endswith(".alpha")]:
        stem = key[: -len("alpha")]
        for sibling in tensors:
            if sibling.startswith(stem) and sibling not in problems:
                problems[sibling] = f"its module's alpha '{key}' is unusable ({problems[key]})"
    return {key: f"'{key}' is {why}" if not why.startswith("its") else why for key, why in problems.items()}


def _check_config(config, where: str) -> None:
    """A config a converter will read: PEFT's fields with PEFT's types (see `LoraConfig.check_fields`)."""
    try:
        LoraConfig.from_dict(config, where)
    except LoraError as err:
        raise LoraFormatError(str(err)) from None


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
    result.invalid = tensor_problems(tensors)
    remaining = {k: v for k, v in tensors.items() if k not in result.invalid}
    for name, claims, converter in _CONVERTERS:
        if name == "bfl" and not _bfl_names(remaining):
            continue  # img_in / txt_in alone are Qwen-Image's diffusers names too, not BFL's Flux ones
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
        result.unrecognized.update(part.unrecognized)
        result.alternatives.extend(part.alternatives)
    for key in remaining:
        result.not_lora_key(key, "not a key of any LoRA format lora_loader reads")
    _alpha_from_header(result, tensors, metadata, configs)
    return result


def _alpha_from_header(result: ConvertedLora, tensors: dict, metadata: dict[str, str] | None, configs: dict) -> None:
    """The network alpha a file records in its safetensors header (``"alpha": "8"``), given to every module, for
    the families diffusers reads it for (`Family.metadata_alpha`: MiniMax-H3, whose LightX2V Turbo files carry it).

    As diffusers' ``MiniMaxH3LoraLoaderMixin.lora_state_dict`` applies it: only when the file has no alpha
    tensors and no PEFT config (``lora_adapter_metadata``, ``adapter_config.json``), and only for a number;
    then each module's scale is ``alpha / rank``. A file of any other family keeps ``alpha = rank``, whatever
    its header holds (diffusers reads this entry for MiniMax-H3 alone).

    >>> import torch
    >>> sd = {"transformer_blocks.0.adaln_proj.linear.lora_A.weight": torch.ones(4, 8),
    ...       "transformer_blocks.0.adaln_proj.linear.lora_B.weight": torch.ones(8, 4)}
    >>> [d.scale for d in convert(sd, {"alpha": "2"}).deltas.values()], [d.scale for d in convert(sd).deltas.values()]
    ([0.5], [1.0])
    """
    raw = (metadata or {}).get("alpha")
    if raw is None or configs or not result.deltas or any(k == "alpha" or k.endswith(".alpha") for k in tensors):
        return
    from ..families import detect_family  # families imports the tables this package's converters use

    family, _ = detect_family(result.deltas, metadata)
    if not any(f.key == family and f.metadata_alpha for f in FAMILIES):
        return
    try:
        alpha = float(raw)
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha) or alpha == 0:
        warnings.warn(
            f"the safetensors header's 'alpha' is {raw!r}, not a finite non-zero number; the LoRA is loaded at alpha = rank",
            LoraWarning,
            stacklevel=4,
        )
        return
    result.deltas = {
        target: delta if delta.alpha is not None else dataclasses.replace(delta, alpha=alpha)
        for target, delta in result.deltas.items()
    }
