"""Flux Control LoRAs widen the transformer's input: ``x_embedder`` takes the control image's channels too.

Black Forest Labs' Control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora) train ``img_in``
(diffusers' ``x_embedder``) on 128 input channels where FLUX.1-dev has 64: the noisy latents and
the control image's latents side by side. As diffusers does
(``FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_``), a LoRA whose ``lora_A``
is wider than the x_embedder replaces it with a wider ``nn.Linear`` whose extra input columns are
zero, and the transformer's ``config.in_channels`` follows, so ``FluxControlPipeline`` feeds it the
control latents; a LoRA whose ``lora_A`` is narrower than such an x_embedder (a FLUX.1-dev LoRA on a
control model) gets zero columns appended to ``lora_A`` (diffusers' ``_maybe_expand_lora_state_dict``).

The original module stays untouched, kept on the wide one. When the wide module loses its last
adapter (unload, delete, or a failed load rolled back), the original module and config are put
back, exactly. If the wide weights no longer are the zero-padded original (a fuse kept by
``unload_lora_weights``, diffusers' way of baking a LoRA in), the wide module stays: the baked
model is a control model now.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import offload, quantized
from .errors import LoraShapeError

# Module path -> the config attribute that counts its inputs, in the transformers diffusers widens.
WIDENABLE = {"x_embedder": "in_channels"}
_FAMILIES = ("FluxTransformer2DModel",)


def widenable(root: nn.Module, path: str, module: nn.Module) -> str | None:
    """The config attribute to update when ``module`` (at ``path`` of component ``root``) may be widened."""
    if path not in WIDENABLE or not any(cls.__name__ in _FAMILIES for cls in type(root).__mro__):
        return None
    base = module.__dict__.get("_lora_base_class") or type(module)
    if not issubclass(base, nn.Linear) or not hasattr(getattr(root, "config", None), WIDENABLE[path]):
        return None
    return WIDENABLE[path]


def widen_problem(module: nn.Module, path: str) -> str | None:
    """Why ``module`` cannot be widened here, or None."""
    if quantized.is_quantized(module):
        return f"{path} is quantized; lora_loader widens only plain nn.Linear weights"
    if offload.is_offloaded(module):
        return f"{path} is offloaded by accelerate; load the Control LoRA before offloading"
    adapters = module._modules.get("lora_adapters")
    if adapters is not None and len(adapters):
        return (
            f"{path} carries adapters {sorted(adapters.keys())} made for its {module.in_features} inputs; "
            "load the Control LoRA first, then the others (they are zero-padded to the wider input)"
        )
    return None


@dataclass
class Widening:
    root: nn.Module
    parent: nn.Module
    name: str
    original: nn.Module
    config: object  # the root's config object before the widening, put back as it was
    widened_config: object  # the one the widening set
    attribute: str


def widen(root: nn.Module, path: str, module: nn.Module, in_features: int, attribute: str) -> nn.Linear:
    """Put a wider copy of ``module`` at ``path`` (extra input columns zero) and update ``root.config``."""
    problem = widen_problem(module, path)
    if problem is not None:
        raise LoraShapeError(problem)
    weight = module.weight.detach()
    out_features, old = weight.shape
    wide = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    new_weight = torch.zeros(out_features, in_features, dtype=weight.dtype, device=weight.device)
    new_weight[:, :old] = weight
    wide.weight = nn.Parameter(new_weight, requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        wide.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    wide.train(module.training)
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    # diffusers' configs are FrozenDicts: a new one with the new value (as register_to_config makes it);
    # the old object is kept, to be put back.
    config = root._internal_dict
    widened_config = type(config)({**config, attribute: in_features})
    wide.__dict__["_lora_widened"] = Widening(root, parent, name, module, config, widened_config, attribute)
    parent._modules[name] = wide
    root._internal_dict = widened_config
    return wide


def restore(wide: nn.Module, force: bool = False) -> None:
    """Put the original module and config back in place of ``wide``, if it was widened here and is unchanged
    (or ``force``: a load being rolled back). A changed wide module is kept, and forgets its original."""
    record: Widening | None = wide.__dict__.get("_lora_widened")
    if record is None or "lora_adapters" in wide._modules:
        return
    if record.parent._modules.get(record.name) is not wide:
        wide.__dict__.pop("_lora_widened")  # replaced by someone else since: nothing of ours to restore
        return
    original = record.original
    weight = wide.weight
    if weight.device != original.weight.device or weight.dtype != original.weight.dtype:
        # Moved or cast with the model since (``pipe.to("cuda")``): the original follows, as it would have.
        original.to(device=weight.device, dtype=weight.dtype)
    if not force and not _unchanged(wide, original):
        wide.__dict__.pop("_lora_widened")  # baked in (fused, then unloaded): the wide module is the model now
        return
    record.parent._modules[record.name] = original
    config, attribute = record.root._internal_dict, record.attribute
    if config is record.widened_config:
        record.root._internal_dict = record.config
    elif config.get(attribute) == record.widened_config[attribute]:
        # The config was replaced since (another register_to_config): only our attribute goes back.
        record.root._internal_dict = type(config)({**config, attribute: record.config[attribute]})
    wide.__dict__.pop("_lora_widened")


def _unchanged(wide: nn.Module, original: nn.Module) -> bool:
    """Is ``wide`` still ``original`` with zero columns appended (nothing fused into it)?"""
    with torch.no_grad():
        old = original.weight.shape[1]
        same = torch.equal(wide.weight[:, :old], original.weight) and not bool(wide.weight[:, old:].any())
        if original.bias is not None:
            same = same and torch.equal(wide.bias, original.bias)
        return same
