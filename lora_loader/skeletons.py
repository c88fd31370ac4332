"""Models built from configs alone, with no weights read: what ``lora-loader convert`` resolves names on.

Converting a LoRA between layouts needs the live module names and shapes of
its base model, not its weights. `build_skeleton` builds the LoRA-carrying
components of SD 1.5, SD 2.1 or SDXL from the configs below;
`skeleton_from_pretrained` builds any diffusers pipeline or transformers model
from its config files (a local folder or a Hub repo id). Either way the
modules sit on uninitialised CPU storage (see `_materialize`).

>>> from lora_loader.skeletons import SKELETONS
>>> sorted(SKELETONS), SKELETONS["sdxl"]["repo"]
(['sd1', 'sd2', 'sdxl'], 'stabilityai/stable-diffusion-xl-base-1.0')
"""

from __future__ import annotations

import json
import os
from typing import Any

from .attach import attach
from .families import FAMILY_LABELS
from .pipeline import LORA_COMPONENTS, LoraPipelineMixin

# diffusers, transformers, accelerate and huggingface_hub are imported by the functions that build a model:
# lora_loader does not need them to import, and the command line starts faster without them.


# The LoRA-carrying components of the reference checkpoints, as diffusers / transformers configs (only the
# fields that differ from the classes' defaults and shape the modules). From the config.json files of
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0.
_CLIP_L = {  # openai/clip-vit-large-patch14's text tower: SD 1.x, SDXL's text_encoder
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
}  # fmt: skip
SKELETONS: dict[str, dict[str, Any]] = {
    "sd1": {
        "repo": "runwayml/stable-diffusion-v1-5",
        "unet": {
            "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 8,
        },
        "text_encoder": ("CLIPTextModel", _CLIP_L),
    },
    "sd2": {
        "repo": "stabilityai/stable-diffusion-2-1",
        "unet": {
            "sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
        },
        "text_encoder": ("CLIPTextModel", {  # OpenCLIP ViT-H/14
            "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 512,
        }),
    },
    "sdxl": {
        "repo": "stabilityai/stable-diffusion-xl-base-1.0",
        "unet": {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "text_encoder": ("CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", {  # OpenCLIP ViT-bigG/14
            "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280,
        }),
    },
}  # fmt: skip


def _materialize(module):
    """Allocate a meta-device module's tensors on the CPU without initialising them.

    lora_loader builds each adapter on its base weight's device, so on a meta
    model the adapter's tensors would be meta too (no data) and saving fails
    with "Cannot copy out of meta tensor". ``to_empty`` gives every tensor real,
    uninitialised CPU storage: the OS maps pages only when they are written, and
    converting never writes or reads base weights, so even SDXL's 2.6 B
    parameters cost almost no memory.
    """
    return module.to_empty(device="cpu")


class SkeletonPipeline(LoraPipelineMixin):
    """Just the LoRA components of a pipeline (UNet / transformer, text encoders): what a conversion needs.

    A real ``DiffusionPipeline`` would also want a VAE, tokenizers and a scheduler;
    lora_loader's pipeline calls only look at these components.
    """

    def __init__(self, components: dict):
        for name, module in components.items():
            setattr(self, name, module)


def build_skeleton(family: str) -> SkeletonPipeline:
    """A pipeline-like host with the family's UNet and text encoders on uninitialised CPU storage (see `_materialize`).

    Example (about 10 s on a 2-core CPU, so not a doctest)::

        host = build_skeleton("sd1")
        host.unet.config.cross_attention_dim  # 768
    """
    if family not in SKELETONS:
        raise ValueError(
            f"no built-in model skeleton for {FAMILY_LABELS.get(family, family)} (built in: SD 1.5, SD 2.1, SDXL); "
            "pass --model with a local pipeline folder, a transformers model folder, or a repo id in the Hugging Face cache"
        )
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    spec = SKELETONS[family]
    components = {}
    with init_empty_weights():
        components["unet"] = UNet2DConditionModel(**spec["unet"])
        for name in ("text_encoder", "text_encoder_2"):
            if name in spec:
                class_name, config = spec[name]
                components[name] = getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))
    for module in components.values():
        _materialize(module)
    return SkeletonPipeline(components)


def _hub_file(model: str, filename: str) -> str | None:
    """A file of a local folder or of a Hub repo (downloaded, or from the cache when offline); None if absent."""
    if os.path.isdir(model):
        path = os.path.join(model, filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(model, filename)  # no network: a cached config is all we need
        if isinstance(cached, str):
            return cached
        return hf_hub_download(model, filename)
    except Exception:  # not found, offline and not cached, not a repo id: the caller says what was tried
        return None


def skeleton_from_pretrained(model: str, with_weights: bool = False):
    """A host with ``model``'s LoRA components, built from its config files only (no weights are read).

    ``model`` is a diffusers pipeline (``model_index.json``: its UNet/transformer
    and text encoders) or a transformers model (``config.json``), as a local
    folder or a Hub repo id (``HF_HUB_OFFLINE=1`` uses the local cache). Module
    names and shapes come from the configs, which is all a conversion needs;
    ``with_weights=True`` loads a transformers model's weights too (for PEFT files
    that carry base weights to compare against).

    Example (needs the repo's config files, on disk or in the Hugging Face cache)::

        host = skeleton_from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        sorted(vars(host))  # ['text_encoder', 'text_encoder_2', 'unet']
    """
    index_path = _hub_file(model, "model_index.json")
    if index_path is not None:
        return _pipeline_skeleton(model, index_path)
    config_path = _hub_file(model, "config.json")
    if config_path is None:
        where = "folder" if os.path.isdir(model) else "Hub repo (or not in the local cache)"
        raise FileNotFoundError(f"--model {model}: no model_index.json (diffusers pipeline) or config.json (transformers model) in this {where}")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else AutoModel
    if with_weights:
        return attach(auto.from_pretrained(model))
    with init_empty_weights():
        module = auto.from_config(config)
    return attach(_materialize(module))


def _pipeline_skeleton(model: str, index_path: str):
    """A `SkeletonPipeline` of the LoRA components ``model_index.json`` names, each built from its own config."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    components = {}
    for name in LORA_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        library, class_name = entry
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            config = cls.load_config(model, subfolder=name)
            with init_empty_weights():
                components[name] = cls.from_config(config)
        elif library == "transformers":
            cls = getattr(transformers, class_name)
            config = transformers.AutoConfig.from_pretrained(model, subfolder=name)
            with init_empty_weights():
                components[name] = cls(config)
        else:
            raise ValueError(f"--model {model}: component {name} is a {library}.{class_name}; expected diffusers or transformers")
        _materialize(components[name])
    if not components:
        raise ValueError(f"--model {model}: model_index.json names no UNet, transformer or text encoder")
    return SkeletonPipeline(components)
