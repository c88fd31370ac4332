"""diffusers pipelines: which components a file targets, and per-component / per-block weights."""

from __future__ import annotations

from torch import nn

from .adapters import AdapterRegistry, ComponentWeight
from .errors import LoraError
from .instance_class import swap_in_mixin
from .model import LoraModelMixin
from .host import (
    _REGISTRY, COMPONENT_NAME, LORA_COMPONENT_NAMES, LoraHost, LoraLifecycle, block_or_number, call_scale,
    scale_from_kwargs, warn_unused_component,
)

# Components a LoRA may target, in the order reports list them.
LORA_COMPONENTS = LORA_COMPONENT_NAMES


class LoraPipelineMixin(LoraHost, LoraLifecycle):
    """LoRA calls for any diffusers pipeline with a ``unet`` or ``transformer`` and text encoders.

    Use ``lora_loader.attach(pipe)``, or put the mixin first when defining a class:

    >>> from diffusers import StableDiffusionPipeline
    >>> from lora_loader import LoraPipelineMixin
    >>> class MyPipeline(LoraPipelineMixin, StableDiffusionPipeline):
    ...     pass
    """

    def __call__(self, *args, **kwargs):
        # cross_attention_kwargs={"scale": s} (or joint_/attention_kwargs) scales every unfused adapter
        # for this call only; the weights set_adapters set are never touched.
        with call_scale(scale_from_kwargs(kwargs)):
            return super().__call__(*args, **kwargs)

    def encode_prompt(self, *args, **kwargs):
        with call_scale(kwargs.get("lora_scale")):
            return super().encode_prompt(*args, **kwargs)

    def _lora_components(self) -> dict[str, nn.Module]:
        # pipe.unet = torch.compile(pipe.unet) puts the model behind an OptimizedModule whose module
        # names gain "_orig_mod."; adapters live on the compiled model itself, under its own names.
        components = {
            name: getattr(module, "_orig_mod", module)
            for name in LORA_COMPONENTS
            if isinstance(module := getattr(self, name, None), nn.Module)
        }
        if any(module.__dict__.get(COMPONENT_NAME) != name for name, module in components.items()):
            adopt_components(components)  # attach, or a component was swapped in since
        return components

    # -- diffusers' classmethods that load a state dict into one component ------------------------------
    @classmethod
    def load_lora_into_unet(cls, state_dict, network_alphas, unet, adapter_name=None, _pipeline=None,
                            low_cpu_mem_usage=False, hotswap=False, metadata=None):
        """diffusers' classmethod: the ``unet.`` part of ``state_dict`` (from ``lora_state_dict``) into ``unet``."""
        _load_into(unet, state_dict, getattr(cls, "unet_name", "unet"), network_alphas, adapter_name, hotswap, metadata)

    @classmethod
    def load_lora_into_transformer(cls, state_dict, transformer, adapter_name=None, _pipeline=None,
                                   low_cpu_mem_usage=False, hotswap=False, metadata=None, network_alphas=None, **kwargs):
        """diffusers' classmethod: the ``transformer.`` part of ``state_dict`` into ``transformer``."""
        prefix = getattr(cls, "transformer_name", "transformer")
        _load_into(transformer, state_dict, prefix, network_alphas, adapter_name, hotswap, metadata)

    @classmethod
    def load_lora_into_text_encoder(cls, state_dict, network_alphas, text_encoder, prefix=None, lora_scale=1.0,
                                    adapter_name=None, _pipeline=None, low_cpu_mem_usage=False, hotswap=False,
                                    metadata=None):
        """diffusers' classmethod: the ``text_encoder.`` part (or ``prefix.``) of ``state_dict`` into ``text_encoder``,
        at weight ``lora_scale``."""
        prefix = getattr(cls, "text_encoder_name", "text_encoder") if prefix is None else prefix
        report = _load_into(text_encoder, state_dict, prefix, network_alphas, adapter_name, hotswap, metadata)
        if report is not None and lora_scale != 1.0:
            text_encoder.set_adapters(report.adapter_name, float(lora_scale))

    # -- diffusers' LoRA properties, read from lora_loader's state --------------------------------------
    @property
    def num_fused_loras(self) -> int:
        """How many adapters are fused into at least one layer (diffusers' property)."""
        return len(self.fused_loras)

    @property
    def fused_loras(self) -> set[str]:
        """The adapters fused into at least one layer (diffusers' property)."""
        return self._lora_registry_to_read().fused_names()

    def _lora_resolve_component(self, symbolic: str) -> str | None:
        components = self._lora_components()
        if symbolic in ("denoiser", "transformer") and "unet" not in components and "transformer" not in components:
            # MiniMax-H3's ref2va workflow holds transformer_ref alone: a file's transformer part goes there, as in diffusers.
            return "transformer_ref" if "transformer_ref" in components else None
        if symbolic == "denoiser":
            return "unet" if "unet" in components else ("transformer" if "transformer" in components else None)
        if symbolic == "t5":  # the T5 encoder, whichever slot the pipeline gives it
            return next((n for n in ("text_encoder_3", "text_encoder_2") if "T5" in type(components.get(n)).__name__), None)
        return symbolic if symbolic in components else None

    def _lora_component_weights(self, name: str, weights: dict) -> dict[str, ComponentWeight]:
        components = self._lora_components()
        out: dict[str, ComponentWeight] = {}
        for component, value in weights.items():
            if component in components:
                out[component] = block_or_number(component, value, components[component], name)
            elif component in LORA_COMPONENTS:
                warn_unused_component(name, component)
            else:
                raise LoraError(
                    f"adapter '{name}': weights name '{component}', which is not a LoRA component of this pipeline "
                    f"(components: {sorted(components)}); UNet block weights go under 'unet', "
                    "e.g. {'unet': {'down': 0.5}}"
                )
        return out


def adopt_components(components: dict[str, nn.Module]) -> None:
    """Make each LoRA component of a pipeline take diffusers' and transformers' component-level calls
    (``pipe.unet.add_adapter(cfg, "a")``, ``pipe.text_encoder.set_adapters(...)``, ...) on the pipeline's
    registry: attach it, tell it its name in the pipeline, and give every component the one registry."""
    registry = next((m.__dict__[_REGISTRY] for m in components.values() if _REGISTRY in m.__dict__), None) or AdapterRegistry()
    for name, module in components.items():
        if not isinstance(module, LoraHost):
            swap_in_mixin(module, LoraModelMixin)
        # object.__setattr__ / __dict__: plain attributes, not submodules, parameters or config entries.
        module.__dict__[COMPONENT_NAME] = name
        module.__dict__[_REGISTRY] = registry


def _load_into(model: nn.Module, state_dict: dict, prefix: str, network_alphas, adapter_name, hotswap, metadata):
    """One component's part of a diffusers state dict, loaded by the component (None when it has no part)."""
    part = {k: v for k, v in state_dict.items() if str(k).startswith(f"{prefix}.")}
    if not part:
        return None
    if not isinstance(model, LoraHost):
        swap_in_mixin(model, LoraModelMixin)
    return model.load_lora_adapter(part, prefix=prefix, network_alphas=network_alphas, metadata=metadata,
                                           adapter_name=adapter_name, hotswap=hotswap)
