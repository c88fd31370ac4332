"""diffusers pipelines: which components a file targets, and per-component / per-block weights."""

from __future__ import annotations

from torch import nn

from .adapters import ComponentWeight
from .errors import LoraError
from .host import LoraHost, LoraLifecycle, block_or_number, call_scale, scale_from_kwargs, warn_unused_component

# Components a LoRA may target, in the order reports list them.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


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
        return {
            name: getattr(module, "_orig_mod", module)
            for name in LORA_COMPONENTS
            if isinstance(module := getattr(self, name, None), nn.Module)
        }

    def _lora_resolve_component(self, symbolic: str) -> str | None:
        components = self._lora_components()
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
