"""`attach`: make one pipeline or model instance LoRA-capable, leaving its class and other instances alone."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from .errors import LoraError
from .host import LoraHost
from .instance_class import swap_in_mixin
from .model import LoraModelMixin
from .pipeline import LoraPipelineMixin

T = TypeVar("T")


def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a runtime dependency
        return False
    try:  # diffusers' modular pipelines (MiniMax-H3 has only one) are no DiffusionPipeline
        from diffusers.modular_pipelines import ModularPipeline
    except ImportError:  # pragma: no cover - older diffusers
        return isinstance(obj, DiffusionPipeline)
    return isinstance(obj, (DiffusionPipeline, ModularPipeline))


def attach(obj: T) -> T:
    """Give ``obj`` (a diffusers pipeline, modular or not, or any ``nn.Module``) the lora_loader calls; returns
    the same object. Attaching twice is a no-op.

    Only this instance changes: its class becomes a subclass of its own class
    with the mixin first, so our methods take precedence over diffusers' and
    transformers' same-named ones (which need peft). The subclass keeps the
    class name, so ``save_pretrained`` still writes the original class name.

    >>> import torch, lora_loader
    >>> layer = torch.nn.Linear(2, 2)
    >>> lora_loader.attach(layer) is layer, type(layer).__name__
    (True, 'Linear')
    """
    if isinstance(obj, LoraHost):
        return obj
    if _is_pipeline(obj):
        mixin = LoraPipelineMixin
    elif isinstance(obj, nn.Module):
        mixin = LoraModelMixin
    else:
        raise LoraError(f"attach() takes a diffusers pipeline or a torch.nn.Module, got {type(obj).__name__}")
    swap_in_mixin(obj, mixin)
    if mixin is LoraPipelineMixin:
        obj._lora_components()  # its components take component-level calls on the pipeline's registry
    return obj
