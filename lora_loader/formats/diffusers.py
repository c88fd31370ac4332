"""diffusers and PEFT keys: dotted module paths with a LoRA suffix.

Accepted spellings, per module path ``M`` (optionally behind a component
prefix ``unet.`` / ``transformer.`` / ``text_encoder.`` / ``text_encoder_2.`` /
``text_encoder_3.``, and PEFT's ``base_model.model.``):

- PEFT / diffusers >= 0.26: ``M.lora_A.weight``, ``M.lora_B.weight``
  (also ``M.lora_A.<adapter>.weight`` as a raw PEFT model state dict has it)
- diffusers ``LoRACompatibleLinear``: ``M.lora.down.weight``, ``M.lora.up.weight``
- Kohya's suffixes on dotted paths: ``M.lora_down.weight``, ``M.lora_up.weight`` (Qwen-Image-Lightning, ComfyUI
  saves without a prefix); PEFT's adapter infix on any spelling: ``M.lora_A.default.weight``
- diffusers ``LoRALinearLayer`` (text encoders): ``M.lora_linear_layer.down.weight`` / ``.up.weight``
- diffusers attention processors (<= 0.20): ``P.processor.to_q_lora.down.weight``, ... where
  ``to_{q,k,v}_lora`` is ``P.to_{q,k,v}`` in a UNet and ``P.{q,k,v}_proj`` in a
  text encoder, and ``to_out_lora`` is ``P.to_out.0`` / ``P.out_proj``
- an optional ``M.alpha``
- ``M.lora_B.bias`` (PEFT's ``lora_bias=True``, Flux Control LoRAs): added to the LoRA's output, scaled with it
- Flux Control LoRAs' norms, as diffusers reads them: ``transformer.<path>.{norm_q,norm_k,norm_added_q,norm_added_k}.weight``,
  a full replacement of that RMSNorm's weight while the adapter is active
- PEFT's LoRAs on parameters (``target_parameters`` in the config, e.g. MoE experts' ``mlp.experts.gate_up_proj``):
  ``M.lora_A.weight`` / ``M.lora_B.weight`` on the parameter's module ``M``, ``base_layer.`` repeated once per
  further targeted parameter of ``M`` registered after it (``M.base_layer.lora_A.weight``); the planner names
  the parameter (`param_layer.ParamDelta`)
- a DiT's original checkpoint names (``blocks.0.self_attn.q``, fal's ``transformer.double_blocks.0.img_attn.qkv``):
  renamed onto diffusers' modules by the family's table (`original_names.rename_original_names`)

Strength: diffusers' training scripts write rank and alpha (with
``rank_pattern`` / ``alpha_pattern``) only into the safetensors header
(``lora_adapter_metadata``), and a PEFT folder into ``adapter_config.json``.
With such a config, ``scale = alpha / r`` with PEFT's pattern rules; else an
``M.alpha`` key; else scale 1 (alpha = r), as diffusers infers it.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..algorithms import all_factor_keys
from ..config import LoraConfig
from ..delta import LoraDelta
from ..errors import LoraError, LoraFormatError
from . import comfyui as comfyui_format
from .canonical import COMPONENTS, ConvertedLora
from ..param_layer import ParamDelta, could_target_parameters, split_nesting
from .original_names import rename_original_names

_COMPONENT_PREFIXES = COMPONENTS[1:-1]  # every pipeline component name (not the symbolic "denoiser" and "t5")

# suffix -> role, longest first so ".lora_linear_layer.down.weight" wins over ".down.weight".
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),  # Kohya's suffixes on dotted module paths (Qwen-Image-Lightning, Z-Image trainers)
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up_bias"),  # PEFT's lora_bias=True (Flux Control LoRAs): part of the LoRA's output
    ("_lora.down.weight", "down"),  # attention-processor era: to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".lora_embedding_A", "down"),  # PEFT on nn.Embedding: [r, num_embeddings]
    (".lora_embedding_B", "up"),  # [dim, r]
    (".lora_magnitude_vector.weight", "magnitude"),  # DoRA
    (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
)
# PEFT's save_embedding_layers writes the base embedding next to an embedding LoRA.
_BASE_LAYER = re.compile(r"^(.*)\.base_layer\.(weight|bias)$")
_NAMED_ADAPTER = re.compile(r"^(.*)\.lora_([AB])\.[^.]+\.weight$")  # M.lora_A.default.weight
# diffusers' FluxLoraLoaderMixin._control_lora_supported_norm_keys, under the transformer's prefix only (as there).
_NORM_WEIGHT = re.compile(r"^transformer\.(.+\.(?:norm_q|norm_k|norm_added_q|norm_added_k))\.weight$")
_NOT_YET = ((".lora_A.bias", "a bias on lora_A, which no LoRA layer has (PEFT's lora_bias puts it on lora_B)"),)
_ATTN_PROCESSOR_TARGETS = {
    # old processor name -> (UNet module, text encoder module)
    "to_q": ("to_q", "q_proj"),
    "to_k": ("to_k", "k_proj"),
    "to_v": ("to_v", "v_proj"),
    "to_out": ("to_out.0", "out_proj"),
}


# LyCORIS' factors on dotted module paths (a LoKr / LoHa / full diff saved without ComfyUI's ``diffusion_model.``):
# read as ComfyUI reads them once the denoiser's prefix is put back (`_lycoris_part`).
# A module's own LyCORIS factors ("alpha" is everyone's: OFT keeps it among its factors, as its constraint, but a
# dotted module with only an alpha beside lora_A / lora_B is a plain LoRA); the module's other keys follow them.
_LYCORIS_SUFFIXES = tuple(sorted("." + s for s in all_factor_keys() if not s.startswith("lora_") and s != "alpha"))


def claims(key: str) -> bool:
    return (
        key.endswith(_LYCORIS_SUFFIXES) or
        any(key.endswith(suffix) for suffix, role in _SUFFIXES if role != "alpha")
        or _NAMED_ADAPTER.match(key) is not None
        or _BASE_LAYER.match(key) is not None
        or key.startswith("base_model.model.")
        or any(marker in key for marker, _ in _NOT_YET)
        or key.endswith(".alpha")
        or _NORM_WEIGHT.match(key) is not None
    )


def _split_component(path: str) -> tuple[str, str]:
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    head, _, rest = path.partition(".")
    if head in _COMPONENT_PREFIXES and rest:
        if rest.startswith("base_model.model."):
            rest = rest[len("base_model.model."):]
        return head, rest
    return "denoiser", path


def _parse(key: str) -> tuple[str, str, str] | None:
    """key -> (component, module path, role) or None if it is not a LoRA key we read."""
    match = _NAMED_ADAPTER.match(key)
    if match and not key.endswith((".lora_A.weight", ".lora_B.weight")):
        stem, role = match.group(1), "down" if match.group(2) == "A" else "up"
    else:
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                break
        else:
            return None
    stem = stem.replace(".processor.", ".")
    component, module = _split_component(stem)
    if key.endswith(("_lora.down.weight", "_lora.up.weight")):
        parent, _, old = module.rpartition(".")
        if old not in _ATTN_PROCESSOR_TARGETS:
            return None
        unet_name, te_name = _ATTN_PROCESSOR_TARGETS[old]
        target = te_name if component.startswith("text_encoder") else unet_name
        module = f"{parent}.{target}" if parent else target
    return component, module, role


def _saved_module(path: str, config: LoraConfig | None) -> tuple[str, str] | None:
    """Split ``classifier.dense.weight`` into (``classifier``, ``dense.weight``) when ``classifier`` is one of
    PEFT's ``modules_to_save`` (a module whose full copy the adapter carries, e.g. lm_head or a head)."""
    names = (config.modules_to_save if config is not None else None) or []
    parts = path.split(".")
    for cut in range(1, len(parts)):
        module = ".".join(parts[:cut])
        if saved_module_matches(names, module):
            return module, ".".join(parts[cut:])
    return None


def saved_module_matches(names: list[str], module: str) -> bool:
    """PEFT's ``modules_to_save`` rule: a plain suffix match, not at a dot as for ``target_modules``, so
    ``["classifier"]`` also copies ``pre_classifier`` and ``["norm"]`` every ``*_layernorm``."""
    return any(module.endswith(name) for name in names)


def _config_for(configs: dict[str, LoraConfig], component: str) -> LoraConfig | None:
    config = configs.get(component, configs.get("", None))
    if component == "denoiser" and config is None:
        config = configs.get("unet") or configs.get("transformer")
    return config


def _trains_bias(config: LoraConfig | None) -> bool:
    """PEFT's bias="lora_only"/"all": the file carries trained biases."""
    return config is not None and config.bias != "none"


def _checked_configs(configs: dict[str, dict]) -> dict[str, LoraConfig]:
    """Each component's config as a `LoraConfig` (PEFT's fields and pattern rules), or a `LoraFormatError`."""
    checked = {}
    for component, config in configs.items():
        try:
            checked[component] = LoraConfig.from_dict(config, f"adapter config{' of ' + component if component else ''}")
        except LoraError as err:
            raise LoraFormatError(str(err)) from None
    return checked


def convert(tensors: dict[str, torch.Tensor], configs: dict[str, dict]) -> ConvertedLora:
    """diffusers / PEFT keys to canonical form; ``configs`` are `formats.adapter_configs` (PEFT fields per component)."""
    checked = _checked_configs(configs)
    result = ConvertedLora()
    tensors = _lycoris_part(tensors, configs, result)
    modules: dict[tuple[str, str], dict[str, str]] = {}  # (component, module) -> {role: key}
    biases: dict[tuple[str, str], str] = {}  # PEFT bias="lora_only"/"all": (component, module) -> key
    for key in tensors:
        parsed = _file_key(key, checked, result, biases)
        if parsed is None:
            continue
        component, module, role = parsed
        slot = modules.setdefault((component, module), {})
        if role in slot:
            result.unknown[key] = f"a second '{role}' tensor for module {module} (first: {slot[role]})"
            continue
        slot[role] = key
    for (component, module), keys in modules.items():
        if _incomplete(module, keys, result):
            continue
        bias_key = biases.pop((component, module), None)
        config = _config_for(checked, component)
        if (config is not None and config.target_parameters and could_target_parameters(module, config.target_parameters)
                and not keys.get("magnitude") and not bias_key):  # DoRA and trained biases belong to module LoRAs
            result.deltas[(component, module)] = _param_delta(tensors, keys, module, config)
            continue
        result.deltas[(component, module)] = _delta(tensors, keys, bias_key, module, config)
    result.module_biases.update(biases)  # bias="all": biases of modules without LoRA
    rename_original_names(result)  # e.g. fal's Kontext files: PEFT keys on BFL's module names
    return result


def _lycoris_part(tensors: dict, configs: dict, result: ConvertedLora) -> dict:
    """LyCORIS factors on dotted denoiser paths (``transformer_blocks.0.attn.to_q.lokr_w1`` and its ``.alpha``, with or
    without ``transformer.``) into ``result``, read as ComfyUI's ``diffusion_model.`` keys are; the other keys back.

    >>> import torch
    >>> sd = {"blocks.0.ff.lokr_w1": torch.ones(2, 2), "blocks.0.ff.lokr_w2": torch.ones(2, 2), "blocks.0.ff.alpha": torch.tensor(1.0)}
    >>> out = ConvertedLora(); rest = _lycoris_part(sd, {}, out); list(out.deltas), rest
    ([('denoiser', 'blocks_0_ff')], {})
    """
    stems = {key[: -len(s)] for key in tensors for s in _LYCORIS_SUFFIXES if key.endswith(s)}
    if not stems:
        return tensors
    renamed: dict[str, str] = {}  # ComfyUI spelling -> the file's key
    components: dict[str, str] = {}
    for key in tensors:
        stem = next((s for s in stems if key.startswith(s + ".")), None)
        if stem is None:
            continue
        component, module = _split_component(stem)
        if component not in ("denoiser", "transformer"):
            result.unknown[key] = f"LyCORIS factors on a dotted {component} path are read for the denoiser only"
            continue
        renamed["diffusion_model." + module + key[len(stem):]] = key
        components[module.replace(".", "_")] = component
    part = comfyui_format.convert({new: tensors[old] for new, old in renamed.items()}, configs)
    back = renamed.__getitem__
    for (component, module), delta in part.deltas.items():
        result.deltas[(components.get(module, component), module)] = dataclasses.replace(delta, keys=tuple(map(back, delta.keys)))
    result.unknown.update({back(k): why for k, why in part.unknown.items()})
    result.ignored.extend(back(k) for k in part.ignored)
    return {k: v for k, v in tensors.items() if k not in set(renamed.values()) and k not in result.unknown}


def _file_key(key: str, configs: dict[str, LoraConfig], result: ConvertedLora, biases: dict) -> tuple[str, str, str] | None:
    """``(component, module, role)`` of a key of a LoRA module; any other key is filed here (base weight,
    norm weight, module copy, trained bias, unknown) and gives None."""
    reason = next((why for marker, why in _NOT_YET if marker in key), None)
    if reason:
        result.unknown[key] = reason
        return None
    base = _BASE_LAYER.match(key)
    if base is not None:
        component, module = _split_component(base.group(1))
        if base.group(2) == "bias" and _trains_bias(_config_for(configs, component)):
            biases[(component, module)] = key  # PEFT's bias="lora_only"/"all": the adapted module's trained bias
        else:
            result.base_weights[key] = (component, module, base.group(2))
        return None
    norm = _NORM_WEIGHT.match(key)
    if norm is not None:
        result.norm_weights[("transformer", norm.group(1))] = key
        return None
    parsed = _parse(key)
    if parsed is not None:
        return parsed
    component, path = _split_component(key)
    config = _config_for(configs, component)
    saved = _saved_module(path, config)
    if saved is not None:
        result.module_copies.setdefault((component, saved[0]), {})[saved[1]] = key
    elif key.endswith(".bias") and _trains_bias(config):
        biases[(component, path[: -len(".bias")])] = key
    else:
        result.not_lora_key(key, "not a LoRA key (expected lora_A/lora_B, lora.down/lora.up or alpha)")
    return None


def _incomplete(module: str, keys: dict[str, str], result: ConvertedLora) -> bool:
    """A module without both halves of its LoRA pair: its keys are filed as unknown or ignored."""
    down_key, up_key, alpha_key, magnitude_key = (keys.get(r) for r in ("down", "up", "alpha", "magnitude"))
    up_bias_key = keys.get("up_bias")
    if down_key is None and up_key is None:
        if alpha_key is not None:
            result.ignored.append(alpha_key)
        if magnitude_key is not None:
            result.unknown[magnitude_key] = "a DoRA magnitude with no LoRA pair"
        if up_bias_key is not None:
            result.unknown[up_bias_key] = "a lora_B.bias with no LoRA pair"
        return True
    if down_key is None or up_key is None:
        present = down_key or up_key
        result.unknown[present] = f"module {module} has {'lora_A/down' if down_key else 'lora_B/up'} but not its pair"
        if alpha_key:
            result.ignored.append(alpha_key)
        if magnitude_key:
            result.unknown[magnitude_key] = f"module {module} has a DoRA magnitude but no complete LoRA pair"
        if up_bias_key:
            result.unknown[up_bias_key] = f"module {module} has a lora_B.bias but no complete LoRA pair"
        return True
    return False


def _delta(tensors: dict, keys: dict[str, str], bias_key: str | None, module: str, config: LoraConfig | None) -> LoraDelta:
    """One module's `LoraDelta`. Strength: the config's alpha (PEFT's ``alpha_pattern`` rule, `LoraConfig.alpha_for`)
    when there is a config, else the file's ``alpha`` key, else none (alpha = rank, as diffusers infers it)."""
    down_key, up_key, alpha_key, magnitude_key, up_bias_key = (keys.get(r) for r in ("down", "up", "alpha", "magnitude", "up_bias"))
    use_rslora, dropout = False, 0.0
    if config is not None:
        alpha, use_rslora, dropout = config.alpha_for(module), bool(config.use_rslora), float(config.lora_dropout or 0.0)
    elif alpha_key is not None:
        alpha = float(tensors[alpha_key].detach().float().reshape(-1)[0])
    else:
        alpha = None
    used = tuple(k for k in (down_key, up_key, alpha_key, magnitude_key, bias_key, up_bias_key) if k)
    return LoraDelta(
        tensors[down_key], tensors[up_key], alpha, use_rslora, keys=used,
        magnitude=tensors[magnitude_key] if magnitude_key else None, dropout=dropout,
        bias=tensors[bias_key] if bias_key else None, up_bias=tensors[up_bias_key] if up_bias_key else None,
    )  # fmt: skip


def _param_delta(tensors: dict, keys: dict[str, str], stem: str, config: LoraConfig) -> ParamDelta:
    """A LoRA that may be on a parameter of module ``stem`` (PEFT's ``base_layer.`` nesting stripped): the planner
    names the parameter from the nesting and ``target_parameters``, or plans it as a module LoRA."""
    module, nesting = split_nesting(stem)
    used = tuple(k for k in (keys.get("down"), keys.get("up"), keys.get("alpha"), keys.get("up_bias")) if k)
    up_bias = tensors[keys["up_bias"]] if keys.get("up_bias") else None
    return ParamDelta(
        tensors[keys["down"]], tensors[keys["up"]], module=module, nesting=nesting, patterns=tuple(config.target_parameters),
        config=config, keys=used, up_bias=up_bias, alpha=config.lora_alpha, use_rslora=bool(config.use_rslora),
    )  # alpha and rsLoRA as the config has them, until the planner reads alpha_pattern for the parameter
