"""Saving an adapter: the canonical deltas back to a file layout (diffusers, Kohya) with the real alpha.

diffusers' own Kohya converter writes ``alpha = rank`` and so changes the
strength of any adapter whose alpha differs; here every module's alpha is
written as it is. The safetensors header says what wrote the file.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from .config import fields_from_deltas
from .errors import LoraError, LoraFileError
from ._version import __version__
from .delta import FactorDelta
from .formats.original_names import family_of_model, to_original
from .formats.original_names.sgm import sgm_name, unet_sgm_prefixes
from .names import mangle
from .param_layer import ParamAdapter, ParamGroup

KOHYA_PREFIX = {"model": "lora_unet_", "unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}


def adapter_deltas(record, components: dict) -> dict[str, dict[str, object]]:
    """``{component: {module path: LoraDelta}}`` of one loaded adapter."""
    out: dict[str, dict[str, object]] = {}
    for component, path, module in record.layers:
        adapter = module.lora_adapters[record.name]
        if isinstance(adapter, ParamAdapter):  # parts in the module's registration order, as PEFT nests them
            out.setdefault(component, {})[path] = adapter.to_group(path)
            continue
        out.setdefault(component, {})[path] = adapter.to_delta(getattr(module, "bias", None))
    if any("lora_norms" in module._modules for _, _, module in record.copies):
        raise LoraError(
            f"adapter '{record.name}' replaces norm weights (a Flux Control LoRA); save_lora_weights does not write "
            "those yet: keep the file it was loaded from"
        )
    if any("lora_params" in module._modules for _, _, module in record.copies):
        raise LoraError(
            f"adapter '{record.name}' diffs bare parameters (e.g. Wan's diff_m); save_lora_weights does not write "
            "those yet: keep the file it was loaded from"
        )
    if record.copies:
        raise LoraError(f"adapter '{record.name}' carries full module copies or biases; save it with save_adapter (PEFT layout)")
    return out


def _config_dict(deltas: dict) -> dict:
    """The PEFT LoraConfig fields diffusers reads from ``lora_adapter_metadata``: r, lora_alpha and patterns;
    ``target_parameters`` for LoRAs on parameters (their patterns keyed ``"<module>.<parameter>"``, as PEFT's)."""
    flat, parameters = {}, []
    for path, delta in deltas.items():
        if isinstance(delta, ParamGroup):
            for param, part in delta.parts.items():
                flat[f"{path}.{param}"] = part
                parameters.append(f"{path}.{param}")
        else:
            flat[path] = delta
    fields = fields_from_deltas(flat)
    if parameters:
        fields["target_modules"] = [t for t in fields["target_modules"] if t not in parameters]
        fields["target_parameters"] = sorted(parameters)
    return fields | {"peft_type": "LORA"} | ({"lora_bias": True} if any(d.up_bias is not None for d in flat.values()) else {})


def to_diffusers(deltas: dict) -> tuple[dict, dict]:
    """``{component}.{path}.lora_A.weight`` keys, rank and alpha in the ``lora_adapter_metadata`` header."""
    tensors, metadata = {}, {}
    for component, modules in deltas.items():
        for path, delta in modules.items():
            if isinstance(delta, FactorDelta):
                raise LoraError(
                    f"{component}.{path}: a {delta.algorithm.title} adapter{' with dora_scale' if delta.dora_scale is not None else ''} "
                    "has no diffusers/PEFT keys; save it with format='kohya' (LyCORIS' naming)"
                )
            if delta.bias is not None:
                raise LoraError(f"{component}.{path}: an adapter bias has no diffusers key; save it with save_adapter")
            # A plain model's keys carry no component: they load back into any model with these paths.
            key = path if component == "model" else f"{component}.{path}"
            if isinstance(delta, ParamGroup):  # PEFT's nesting: one base_layer. per parameter wrapped after this one
                for nesting, part in delta.nested(list(delta.parts)):
                    tensors[f"{key}{'.base_layer' * nesting}.lora_A.weight"] = part.down
                    tensors[f"{key}{'.base_layer' * nesting}.lora_B.weight"] = part.up
                continue
            tensors[f"{key}.lora_A.weight"] = delta.down
            tensors[f"{key}.lora_B.weight"] = delta.up
            if delta.magnitude is not None:
                tensors[f"{key}.lora_magnitude_vector"] = delta.magnitude
            if delta.up_bias is not None:
                tensors[f"{key}.lora_B.bias"] = delta.up_bias
        prefix = "" if component == "model" else f"{component}."
        metadata.update({f"{prefix}{k}": v for k, v in _config_dict(modules).items()})
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}


DENOISERS = ("unet", "transformer", "model")


def to_peft(deltas: dict) -> tuple[dict, dict]:
    """PEFT's own keys, ``base_model.model.{path}.lora_A.weight``; a text encoder's carry its component
    first (``text_encoder.base_model.model.*``). Rank and alpha ride in ``lora_adapter_metadata``."""
    renamed, config = {}, {}
    for component, modules in deltas.items():
        # One component at a time as a plain model ("model": keys are the bare module paths), so a
        # path that itself starts with a component-like word ("model.layers.0...") stays whole.
        tensors, header = to_diffusers({"model": modules})
        prefix = "" if component in DENOISERS else f"{component}."
        renamed.update({f"{prefix}base_model.model.{key}": tensor for key, tensor in tensors.items()})
        fields = json.loads(header["lora_adapter_metadata"])
        config.update(fields if component in DENOISERS else {f"{component}.{k}": v for k, v in fields.items()})
    return renamed, {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def _kohya_name(component: str, path: str, module_root, sgm: dict) -> str:
    if component not in KOHYA_PREFIX:
        raise LoraError(
            f"{component}.{path}: Kohya layout has no prefix for a '{component}' component (sd-scripts names the UNet / "
            "DiT and the text encoders only); save this adapter with format='diffusers' or 'peft'"
        )
    if component in ("unet", "transformer"):
        if sgm:  # SDXL: sd-scripts writes Stability's block names
            path = sgm_name(path, sgm) or path
        return KOHYA_PREFIX[component] + mangle(path)
    if "T5" in type(module_root).__name__:
        return "lora_te3_" + mangle(path)  # sd-scripts calls T5-XXL te3 in SD3 and in Flux alike
    if component != "model" and not path.startswith("text_model."):
        path = "text_model." + path  # Kohya spells CLIP paths with text_model_ whatever transformers does
    return KOHYA_PREFIX[component] + mangle(path)


def _as_full_diff(delta: FactorDelta) -> FactorDelta:
    """A part of a fused LyCORIS module (its rows of shared factors) as the full diff it amounts to.

    The part alone is no LoHa / LoKr (its factors belong to the whole fused projection),
    so Kohya layout gets its dense change, which loads back to the same outputs.
    """
    diff = (delta.dense(torch.float32) * delta.scale).to(next(iter(delta.factors.values())).dtype)
    return FactorDelta("full", {"diff": diff}, None, dora_scale=delta.dora_scale)


def _in_original_names(component: str, modules: dict, components: dict) -> dict | None:
    """A DiT's deltas renamed to its family's original names (fused projections joined), or None when
    the component is no model a table names."""
    model = components.get(component)
    family = family_of_model(model) if component in DENOISERS + ("transformer_2", "transformer_ref") else None
    if family is None:
        return None

    def out_rows(path: str) -> int | None:
        module = model.get_submodule(path)
        return getattr(getattr(module, "base_layer", module), "out_features", None)

    return to_original(family, modules, out_rows)


def to_kohya(deltas: dict, components: dict) -> tuple[dict, dict]:
    """sd-scripts keys: ``lora_unet_*`` / ``lora_te*_*`` + ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
    a DiT with a table of its original names (Flux, SD3, Wan, ...) in those names, as its trainers write it."""
    single_te = "text_encoder_2" not in components
    sdxl_like = not single_te and "unet" in components
    sgm = unet_sgm_prefixes(components["unet"]) if sdxl_like else {}
    tensors = {}
    for component, modules in deltas.items():
        original = _in_original_names(component, modules, components)
        for path, delta in (original or modules).items():
            if isinstance(delta, FactorDelta):
                if delta.rows is not None:
                    delta = _as_full_diff(delta)
                name = "lora_unet_" + path if original is not None else _kohya_name(component, path, components.get(component), sgm)
                if component == "text_encoder" and single_te:
                    name = "lora_te_" + name[len("lora_te1_"):]
                for suffix, tensor in delta.factors.items():
                    tensors[f"{name}.{suffix}"] = tensor
                if delta.dora_scale is not None:
                    tensors[f"{name}.dora_scale"] = delta.dora_scale
                if delta.kind != "full" and not delta.algorithm.alpha_in_factors:
                    tensors[f"{name}.alpha"] = torch.tensor(float(delta.rank if delta.alpha is None else delta.alpha))
                continue
            if isinstance(delta, ParamGroup):
                raise LoraError(f"{component}.{path}: a LoRA on parameters ({', '.join(delta.parts)}; target_parameters) has "
                                "no Kohya key; save as 'diffusers' or 'peft'")
            if delta.magnitude is not None or delta.bias is not None or delta.up_bias is not None:
                raise LoraError(f"{component}.{path}: DoRA or a bias has no Kohya LoRA key yet; save as 'diffusers' or 'peft'")
            name = "lora_unet_" + path if original is not None else _kohya_name(component, path, components.get(component), sgm)
            if component == "text_encoder" and single_te:
                name = "lora_te_" + name[len("lora_te1_"):]
            down, up = delta.down, delta.up
            if up.dim() == 2 and down.dim() == 4:
                up = up[:, :, None, None]
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            # Kohya's scale is alpha / r: an rsLoRA adapter (alpha / sqrt(r)) is written with the alpha
            # that gives the same scale.
            tensors[f"{name}.alpha"] = torch.tensor(float(delta.scale * delta.rank))
    ranks = Counter(d.rank for m in deltas.values() for d in m.values())
    return tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks.most_common(1)[0][0])}


def write(path: str, tensors: dict, metadata: dict, fmt: str, family: str) -> str:
    from safetensors import SafetensorError
    from safetensors.torch import save_file


    header = {"format": "pt", "lora_loader.version": __version__, "lora_loader.format": fmt, "lora_loader.base_model": family}
    header.update(metadata)
    target = path
    try:
        if not path.endswith(".safetensors"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "pytorch_lora_weights.safetensors")
        save_file(_unshared(tensors), path, metadata=header)
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # safetensors has its own error for an unwritable path
        raise LoraFileError(f"{target}: cannot write the adapter there ({type(err).__name__}: {err})") from None
    return path


def _unshared(tensors: dict) -> dict:
    """Every tensor with storage of its own: parts of a fused projection share one ``lora_down`` (and their
    ``lora_up`` rows are views of one tensor) once loaded, which safetensors refuses to write."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def model_family(components: dict) -> str:
    unet = components.get("unet")
    if unet is not None and getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time":
        return "sdxl"
    if unet is not None:
        return "sd1/sd2"
    transformer = components.get("transformer")
    return type(transformer).__name__ if transformer is not None else "unknown"


