"""The ``lora-loader`` command: inspect, convert, generate, demo.

    lora-loader inspect FILE [--json [--compact]]
    lora-loader convert IN OUT --to kohya|diffusers|peft [--model MODEL] [--dtype keep|fp16|bf16|fp32] [--force]
    lora-loader generate --model REPO_OR_FOLDER --prompt TEXT [--lora FILE[:WEIGHT]]... [--negative-prompt TEXT]
                         [--steps N] [--seed N] [--width W] [--height H] [--guidance-scale G] [--num-images N]
                         [--out PATH] [--device DEV] [--dtype fp16|bf16|fp32]
    lora-loader demo [--out gallery/] [--steps N] [--seed N]
    lora-loader demo --llm [--max-new-tokens N] [--threads N] [--out DIR]

Every command also takes ``--debug`` (show the traceback of an error). Errors
are one line on stderr, ``lora-loader: error: ...``, and a non-zero exit code.
``python -m lora_loader`` is the same command.

diffusers, transformers and accelerate are imported only by the command that
needs them (the lora_loader package itself brings torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .pipeline import LoraPipelineMixin  # no diffusers import: that happens in the commands that need it

PROG = "lora-loader"

# -- families -------------------------------------------------------------------------------------------------

FAMILY_LABELS = {
    "sd1": "SD 1.x",
    "sd2": "SD 2.x",
    "sd1/sd2": "SD 1.x/2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux": "Flux",
    "causal-lm": "causal LM",
    "unknown": "unknown",
}
# Cross-attention input width (the text encoder's hidden size the UNet attends to) per UNet family.
_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Text encoder hidden size: CLIP ViT-L (SD 1.x, SDXL's first), OpenCLIP ViT-H (SD 2.x), OpenCLIP bigG (SDXL's second).
_TEXT_ENCODER_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
# The symbolic component "denoiser" under the name the family's pipeline gives it.
_DENOISER_NAME = {"sd1": "unet", "sd2": "unet", "sd1/sd2": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The family a producer wrote in the header: sd-scripts' ``ss_base_model_version``, ``modelspec.architecture``,
    or ours. Only a hint: the keys and shapes decide when they can."""
    text = " ".join(
        metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture", "lora_loader.base_model")
    ).lower()
    for needle, family in (("flux", "flux"), ("sdxl", "sdxl"), ("-xl", "sdxl"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"),
                           ("sd_v2", "sd2"), ("v2-", "sd2"), ("sd_v1", "sd1"), ("-v1", "sd1"), ("sd1/sd2", "sd1/sd2")):
        if needle in text:
            return family
    return None


def _in_features(delta) -> int | None:
    """The input width of the module a delta targets (its dense delta's second dimension)."""
    down = getattr(delta, "down", None)
    if down is not None:
        return int(down.shape[1]) if down.dim() >= 2 else None
    shape = delta.dense_shape() if hasattr(delta, "dense_shape") else None
    return int(shape[1]) if shape and len(shape) >= 2 else None


_UNET_MARKERS = ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "output_blocks_", "middle_block_", "conv_in", "time_embedding_")
_LM_PATTERNS = (
    re.compile(r"(^|_)layers_\d+_(self_attn|mlp|attention|feed_forward)_"),  # Llama, Mistral, Qwen, Gemma, ...
    re.compile(r"(^|_)decoder_layers_\d+_"),  # OPT
    re.compile(r"(^|_)h_\d+_(attn|mlp)_"),  # GPT-2, GPT-J
    re.compile(r"(^|_)gpt_neox_layers_\d+_"),
)


def detect_family(deltas: dict, metadata: dict[str, str] | None = None, adapter_config: dict | None = None) -> tuple[str, list[str]]:
    """``(family, evidence)`` of a converted LoRA, from its module names and shapes.

    ``deltas`` is `formats.convert`'s ``{(component, module): delta}``. The
    names give the kind of model (UNet block names, Flux's single blocks, a
    causal LM's ``model.layers.N``); within SD UNets the cross-attention input
    width (768 / 1024 / 2048) and the text encoders' widths tell SD 1.x, 2.x and
    SDXL apart. The header's family (if any) decides only what shapes cannot.

    >>> import torch
    >>> d = {("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"):
    ...      type("D", (), {"down": torch.zeros(4, 2048)})()}
    >>> detect_family(d)[0]
    'sdxl'
    """
    metadata = metadata or {}
    evidence: list[str] = []
    components = {c for c, _ in deltas}
    # A converter files a prefixed key under "unet"/"transformer" and an unprefixed one under "denoiser".
    denoiser = [(m.replace(".", "_"), d) for (c, m), d in deltas.items() if c in ("denoiser", "unet", "transformer")]
    text_encoder = [(m.replace(".", "_"), d) for (c, m), d in deltas.items() if c == "text_encoder"]
    names = [n for n, _ in denoiser]
    unet = [n for n in names if any(marker in n for marker in _UNET_MARKERS)]

    def first(items, pattern: str):
        """The first delta whose module name matches ``pattern``, or None."""
        return next((d for n, d in items if re.search(pattern, n)), None)

    if (adapter_config or {}).get("task_type") == "CAUSAL_LM":
        return "causal-lm", ["adapter_config.json says task_type CAUSAL_LM"]
    if any(n.startswith(("double_blocks_", "single_blocks_")) or "single_transformer_blocks_" in n for n in names):
        return "flux", ["Flux block names (double_blocks/single_blocks or single_transformer_blocks)"]
    if "text_encoder_3" in components:
        return "sd3", ["keys for a third text encoder (lora_te3_ / text_encoder_3)"]
    if not unet and any("transformer_blocks_" in n for n in names):
        to_q = first(denoiser, r"transformer_blocks_\d+_attn_to_q$")
        width = _in_features(to_q) if to_q is not None else None
        if width == 3072:
            return "flux", ["DiT transformer_blocks with attention width 3072 (Flux)"]
        return "sd3", [f"DiT transformer_blocks (joint attention), attention width {width} (SD3)"]
    if not unet and any(p.search(n) for p in _LM_PATTERNS for n in names) and not any("encoder_layers_" in n for n in names):
        return "causal-lm", ["decoder layer names (layers.N.self_attn / mlp)"]

    family = None
    if "text_encoder_2" in components:
        family = "sdxl"
        evidence.append("keys for a second text encoder (lora_te2_ / text_encoder_2)")
    cross = first(denoiser, r"attn2_to_[kv]$")
    width = _in_features(cross) if cross is not None else None
    if width is not None:
        known = _CROSS_ATTENTION_WIDTH.get(width)
        evidence.append(f"cross-attention input width {width}" + ("" if known else " (not a known SD size)"))
        family = family or known
    if family is None and any(n.startswith(("input_blocks_", "output_blocks_", "middle_block_")) or "add_embedding_" in n or "label_emb_" in n for n in unet):
        family = "sdxl"
        evidence.append("Stability UNet block names / add_embedding (SDXL's layout in sd-scripts)")
    if family is None and any(re.search(r"transformer_blocks_[2-9]_", n) for n in unet):
        family = "sdxl"
        evidence.append("more than 2 transformer blocks per attention (SDXL depth 2/10)")
    proj = first(denoiser, r"attentions_\d+_proj_(in|out)$")
    if family is None and getattr(proj, "down", None) is not None:
        # SD 1.x's proj_in/proj_out are 1x1 convs (a 4-D lora_down); SD 2.x and SDXL use linear projections.
        conv = proj.down.dim() == 4
        family = "sd1" if conv else "sd2"
        evidence.append(f"{'1x1 conv' if conv else 'linear'} proj_in/proj_out")
    q_proj = first(text_encoder, r"self_attn_q_proj$")
    te_width = _in_features(q_proj) if q_proj is not None else None
    if family is None and te_width is not None:
        evidence.append(f"text encoder width {te_width}" + ("" if te_width in _TEXT_ENCODER_WIDTH else " (not a known CLIP size)"))
        family = _TEXT_ENCODER_WIDTH.get(te_width)
    if family is None and (unet or text_encoder):
        family = "sd1/sd2"
        evidence.append("UNet / CLIP text encoder names")
    # The header decides only what names and widths leave open: nothing found, or "some SD UNet".
    hinted = _family_from_metadata(metadata)
    if hinted and (family is None or (family == "sd1/sd2" and hinted in ("sd1", "sd2", "sdxl"))):
        evidence.append(f"header metadata names {FAMILY_LABELS[hinted]}")
        family = hinted
    if family is None:
        return "unknown", evidence or ["no known block names"]
    return family, evidence


# -- inspect ----------------------------------------------------------------------------------------------------


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _number_key(value: float) -> str:
    return f"{value:g}"


def _counts(values) -> dict[str, int]:
    """``{"4": 12, "8": 3}``: a distribution with string keys (JSON), in numeric order."""
    counter = Counter(values)

    def order(item):
        try:
            return (0, float(item[0]))
        except ValueError:
            return (1, 0.0)

    return dict(sorted(((str(k), v) for k, v in counter.items()), key=order))


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"


def inspect_lora(src: str, metadata_chars: int = 200) -> dict[str, Any]:
    """Everything `lora-loader inspect` reports about a LoRA file or PEFT folder, as a JSON-ready dict.

    Reads the file with lora_loader's own reader (`hub.read_source`) and converts
    it with `formats.convert`, so the format, modules and unknown keys are those
    ``load_lora_weights`` would see. Nothing is loaded onto a model.
    """
    from .formats import convert
    from .hub import read_source

    source = read_source(src)
    converted = convert(source.tensors, source.metadata, source.adapter_config)
    family, evidence = detect_family(converted.deltas, source.metadata, source.adapter_config)
    denoiser = _DENOISER_NAME.get(family, "model")
    weights_path = source.name if os.path.isfile(source.name) else None  # None: a Hub file
    size = os.path.getsize(weights_path) if weights_path else sum(t.numel() * t.element_size() for t in source.tensors.values())
    config_path = os.path.join(os.path.dirname(weights_path), "adapter_config.json") if weights_path else None
    if source.adapter_config is not None and config_path and os.path.isfile(config_path):
        size += os.path.getsize(config_path)

    components: dict[str, dict[str, Any]] = {}
    all_ranks, all_alphas, kinds = [], [], []
    alpha_missing = 0
    for (component, _module), delta in converted.deltas.items():
        name = denoiser if component == "denoiser" else component
        kind = getattr(delta, "kind", "lora")
        entry = components.setdefault(name, {"modules": 0, "kinds": [], "ranks": [], "alphas": [], "dora": 0})
        entry["modules"] += 1
        entry["kinds"].append(kind)
        kinds.append(kind)
        if getattr(delta, "magnitude", None) is not None or getattr(delta, "dora_scale", None) is not None:
            entry["dora"] += 1
        if kind in ("full", "norm"):
            continue  # a full or norm diff has no rank and no alpha
        rank = int(delta.rank)
        alpha = delta.alpha
        if alpha is None:
            alpha_missing += 1
            alpha = rank  # absent alpha means alpha = rank (scale 1), as sd-scripts and PEFT define it
        entry["ranks"].append(rank)
        entry["alphas"].append(_number_key(float(alpha)))
        all_ranks.append(rank)
        all_alphas.append(_number_key(float(alpha)))
    for entry in components.values():
        entry["kinds"] = _counts(entry["kinds"])
        entry["ranks"] = _counts(entry["ranks"])
        entry["alphas"] = _counts(entry["alphas"])
    order = {name: i for i, name in enumerate(("unet", "transformer", "model", "text_encoder", "text_encoder_2", "text_encoder_3"))}
    components = dict(sorted(components.items(), key=lambda item: order.get(item[0], 99)))

    return {
        "source": os.fspath(src),
        "file": source.name,
        "size_bytes": int(size),
        "tensors": len(source.tensors),
        "parameters": int(sum(t.numel() for t in source.tensors.values())),
        "dtypes": _counts(str(t.dtype).replace("torch.", "") for t in source.tensors.values()),
        "format": converted.format,
        "family": family,
        "family_label": FAMILY_LABELS[family],
        "family_evidence": evidence,
        "family_from_metadata": _family_from_metadata(source.metadata),
        "modules": len(converted.deltas),
        "kinds": _counts(kinds),
        "ranks": _counts(all_ranks),
        "alphas": _counts(all_alphas),
        "alpha_missing": alpha_missing,
        "components": components,
        "module_copies": sorted(f"{c}.{m}" for c, m in converted.module_copies),
        "unknown_keys": dict(sorted(converted.unknown.items())),
        "ignored_keys": sorted(converted.ignored),
        "adapter_config": source.adapter_config,
        "metadata": {k: _truncate(v, metadata_chars) for k, v in sorted(source.metadata.items())},
    }


def _dist(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{k} x{v}" if len(counts) > 1 else k for k, v in counts.items())


def format_inspection(info: dict[str, Any], max_unknown: int = 20) -> str:
    """The human-readable report of `inspect_lora`."""
    lines = [
        f"file        {info['file']}",
        f"size        {_human_size(info['size_bytes'])} ({info['size_bytes']:,d} bytes), {info['tensors']} tensors, "
        f"{info['parameters']:,d} parameters",
        f"dtypes      {', '.join(f'{k}: {v}' for k, v in info['dtypes'].items()) or '-'}",
        f"format      {info['format']}",
        f"base model  {info['family_label']}" + (f"  ({'; '.join(info['family_evidence'])})" if info["family_evidence"] else ""),
        f"modules     {info['modules']}" + (f"  ({', '.join(f'{k}: {v}' for k, v in info['kinds'].items())})" if info["kinds"] else ""),
        f"ranks       {_dist(info['ranks'])}",
        f"alphas      {_dist(info['alphas'])}" + (f"  ({info['alpha_missing']} modules without alpha: alpha = rank)" if info["alpha_missing"] else ""),
    ]
    if info["components"]:
        rows = [("component", "modules", "kinds", "ranks", "alphas", "dora")]
        for name, c in info["components"].items():
            rows.append((name, str(c["modules"]), _dist(c["kinds"]), _dist(c["ranks"]), _dist(c["alphas"]), str(c["dora"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if info["module_copies"]:
        lines.append(f"\nfull module copies (modules_to_save): {', '.join(info['module_copies'])}")
    unknown = info["unknown_keys"]
    lines.append("")
    if unknown:
        lines.append(f"unknown keys ({len(unknown)}): load_lora_weights raises on these unless strict=False")
        for key, why in list(unknown.items())[:max_unknown]:
            lines.append(f"  {key}: {why}")
        if len(unknown) > max_unknown:
            lines.append(f"  ... and {len(unknown) - max_unknown} more (--json lists all)")
    else:
        lines.append("unknown keys: none")
    if info["ignored_keys"]:
        lines.append(f"ignored keys ({len(info['ignored_keys'])}): {', '.join(info['ignored_keys'][:5])}"
                     + (" ..." if len(info["ignored_keys"]) > 5 else ""))
    if info["adapter_config"] is not None:
        config = info["adapter_config"]
        shown = {k: config.get(k) for k in ("base_model_name_or_path", "task_type", "r", "lora_alpha", "target_modules") if k in config}
        lines.append(f"adapter_config.json: {json.dumps(shown)}")
    lines.append(f"metadata ({len(info['metadata'])} entries)" + (":" if info["metadata"] else ""))
    for key, value in info["metadata"].items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info, indent=None if args.compact else 2, sort_keys=False, default=str))
    else:
        print(format_inspection(info))
    return 0


# -- model skeletons for convert --------------------------------------------------------------------------------

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


def build_skeleton(family: str):
    """A pipeline-like host with the family's UNet and text encoders on uninitialised CPU storage (see `_materialize`)."""
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


def _load_on_builtin(src: str, family: str):
    """``(host, description, report)``: ``src`` loaded on the built-in skeleton of ``family``.

    A file whose widths did not tell SD 1.x from 2.x ("sd1/sd2") is tried on SD 1.5, then on
    SD 2.1 (their module names agree; shapes such as SD 2's linear ``proj_in`` do not).
    """
    from .errors import LoraError

    first = None
    for candidate in ("sd1", "sd2") if family == "sd1/sd2" else (family,):
        host = build_skeleton(candidate)
        name = f"built-in {SKELETONS[candidate]['repo']} skeleton"
        try:
            return host, name, host.load_lora_weights(src, adapter_name="source")
        except LoraError as err:
            first = first or LoraError(f"{err} [converting against the {name}; pass --model if the file is for another model]")
    raise first


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
    """
    import lora_loader

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
        return lora_loader.attach(auto.from_pretrained(model))
    with init_empty_weights():
        module = auto.from_config(config)
    return lora_loader.attach(_materialize(module))


def _pipeline_skeleton(model: str, index_path: str):
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from .pipeline import LORA_COMPONENTS

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


# -- convert -------------------------------------------------------------------------------------------------------

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _factor_dtype(deltas: dict):
    """The one floating dtype of a file's LoRA factors, or None when they mix dtypes."""
    dtypes = {t.dtype for d in deltas.values() for t in (d.tensors() if hasattr(d, "tensors") else []) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _rewrite_dtype(path: str, dtype) -> None:
    """Store every non-scalar floating tensor of a safetensors file in ``dtype`` (scalars are Kohya alphas: kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    changed = {k: (v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v) for k, v in tensors.items()}
    if any(changed[k].dtype != tensors[k].dtype for k in tensors):
        save_file({k: v.contiguous() for k, v in changed.items()}, path, metadata=metadata)


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    return path


def _same_adapter(a, b, exact: bool) -> str | None:
    """None if two adapters on one layer hold the same delta (kind, scale, every factor); else what differs."""
    import torch

    da, db = a.to_delta(), b.to_delta()
    kind_a, kind_b = getattr(da, "kind", "lora"), getattr(db, "kind", "lora")
    if kind_a != kind_b:
        return f"kind {kind_a} became {kind_b}"
    if not math.isclose(da.scale, db.scale, rel_tol=1e-6):
        return f"scale {da.scale:g} became {db.scale:g}"
    if hasattr(da, "factors"):  # a LyCORIS kind: its factors by name, and dora_scale
        if set(da.factors) != set(db.factors):
            return f"factors {sorted(da.factors)} became {sorted(db.factors)}"
        pairs = [(da.factors[k], db.factors[k]) for k in da.factors] + [(da.dora_scale, db.dora_scale)]
    else:
        pairs = [(da.down, db.down), (da.up, db.up), (da.magnitude, db.magnitude), (da.bias, db.bias)]
    for x, y in pairs:
        if x is None or y is None:
            if x is not y:
                return "a tensor (DoRA magnitude or bias) was lost or added"
            continue
        if x.shape != y.shape and x.numel() == y.numel():
            y = y.reshape(x.shape)  # a Conv up saved [out, r, 1, 1] and read back [out, r]
        if x.shape != y.shape:
            return f"shape {list(x.shape)} became {list(y.shape)}"
        x, y = x.float(), y.float()
        if not (torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-2, atol=1e-3)):
            return f"values differ (max abs {float((x - y).abs().max()):.3g})"
    return None


def _down_shapes(deltas: dict) -> Counter:
    """How many modules have each ``lora_down`` shape (LyCORIS kinds: each factor's shape); layout-independent."""
    shapes: Counter = Counter()
    for delta in deltas.values():
        if hasattr(delta, "factors"):
            shapes.update((name, tuple(t.shape)) for name, t in delta.factors.items())
        else:
            shapes[("down", tuple(delta.down.shape))] += 1
    return shapes


def _remove_written(path: str) -> None:
    """Delete a conversion's output (a file, or the files save_adapter wrote into a folder)."""
    if os.path.isdir(path):
        for name in ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    elif os.path.isfile(path):
        os.remove(path)


def convert_lora(src: str, dst: str, to: str, model: str | None = None, dtype: str = "keep", force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Convert a LoRA between the Kohya, diffusers and PEFT layouts; returns what was done.

    Layouts name modules differently (Kohya mangles paths with underscores, SDXL
    Kohya files use Stability's block names), so the file is loaded onto a model
    and written back with ``save_lora_weights(format=to)``, which resolves every
    name through the live modules. The model is ``model`` (a pipeline or
    transformers model, built from its configs) or a built-in SD 1.5 / SD 2.1 /
    SDXL skeleton for the detected family. The written file is loaded back onto
    the same model and compared, factor by factor, with the source.
    """
    if to not in ("kohya", "diffusers", "peft"):
        raise ValueError(f"--to {to!r}; expected kohya, diffusers or peft")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"OUT is the same path as IN ({dst}); write the conversion elsewhere")
    if os.path.exists(dst) and not force and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    timings: dict[str, float] = {}
    bar = _progress_bar(4, "convert") if progress else None
    try:
        return _convert(src, dst, to, model, dtype, timings, lambda name: _step(bar, name, timings))
    finally:
        if bar is not None:
            bar.close()


def _convert(src: str, dst: str, to: str, model: str | None, dtype: str, timings: dict[str, float], step) -> dict[str, Any]:
    """`convert_lora`'s work, one timed ``step`` each: read, build the model and load, save, verify."""
    import torch

    from .errors import LoraError
    from .formats import convert
    from .hub import read_source

    with step("read"):
        source = read_source(src)
        converted = convert(source.tensors, source.metadata, source.adapter_config)
        family, _ = detect_family(converted.deltas, source.metadata, source.adapter_config)
    if not converted.deltas and not converted.module_copies:
        sample = sorted(source.tensors)[:3]
        raise LoraError(f"{source.name}: not a LoRA file: no LoRA module among its {len(source.tensors)} keys (first: {sample})")
    if model is None and family == "causal-lm":
        model = (source.adapter_config or {}).get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{src} is a causal-LM adapter without base_model_name_or_path; pass --model (a model folder or repo id)")
    with step("build model + load"):
        if model is not None:
            host = skeleton_from_pretrained(model, with_weights=bool(converted.base_weights))
            model_name = f"model {model}"
            report = host.load_lora_weights(src, adapter_name="source")
        else:
            host, model_name, report = _load_on_builtin(src, family)
    with step("save"):
        written = host.save_lora_weights(dst, adapter_name="source", format=to)
        weights = _weights_file(written)
        # lora_loader keeps fp16/bf16 LoRA factors as they are, but LyCORIS kinds are held in the model's
        # dtype (fp32 here): store the output in the source's dtype, so a conversion does not grow the file.
        target = getattr(torch, _DTYPES[dtype]) if dtype != "keep" else _factor_dtype(converted.deltas)
        if target is not None:
            _rewrite_dtype(weights, target)
    with step("verify"):
        try:
            host.load_lora_weights(written, adapter_name="written")
        except Exception as err:
            # lora_loader wrote a file it cannot read back (seen: format='diffusers' from a transformers model
            # writes 'model.<path>' keys that no reader resolves): never leave such a file behind.
            _remove_written(written)
            raise LoraError(
                f"lora_loader wrote {written} as {to!r} but cannot load it back, so it was removed "
                f"(a lora_loader bug; try another --to): {' '.join(str(err).split())[:300]}"
            ) from err
        # Module kinds of the model must be the file's: a Linear LoRA written for a 1x1 Conv2d model (or back)
        # would load in lora_loader but not in diffusers/peft. The down factors are the same in every layout.
        reread = read_source(written)
        written_deltas = convert(reread.tensors, reread.metadata, reread.adapter_config).deltas
        if _down_shapes(written_deltas) != _down_shapes(converted.deltas):
            _remove_written(written)
            raise LoraError(
                f"the {model_name} has other module kinds than {src} was made for (Linear vs Conv2d factor shapes "
                "changed); removed the output; pass --model with the file's base model"
            )
        registry = host._lora_existing_registry()
        first, second = registry.adapters["source"], registry.adapters["written"]
        paths_a = {(c, p) for c, p, _ in first.layers}
        paths_b = {(c, p) for c, p, _ in second.layers}
        if paths_a != paths_b:
            missing = sorted(f"{c}.{p}" for c, p in paths_a - paths_b)[:5]
            extra = sorted(f"{c}.{p}" for c, p in paths_b - paths_a)[:5]
            _remove_written(written)
            raise LoraError(f"the written file targets other modules than the source (missing {missing}, extra {extra}); removed it")
        exact = dtype == "keep"
        for component, path, module in first.layers:
            why = _same_adapter(module.lora_adapters["source"], module.lora_adapters["written"], exact)
            if why is not None:
                _remove_written(written)
                raise LoraError(f"the written file differs from the source on {component}.{path}: {why}; removed it")
    return {
        "source": src,
        "written": written,
        "format_in": converted.format,
        "format_out": to,
        "family": family,
        "model": model_name,
        "modules": dict(report.modules),
        "verified": True,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }


def _progress_bar(total: int, desc: str):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal (``disable=None``); else None."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False, file=sys.stderr)


@contextlib.contextmanager
def _step(bar, name: str, timings: dict[str, float]):
    """Time one named step of a command into ``timings`` and advance the bar."""
    if bar is not None:
        bar.set_postfix_str(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start
        if bar is not None:
            bar.update(1)


def cmd_convert(args: argparse.Namespace) -> int:
    result = convert_lora(args.input, args.output, args.to, model=args.model, dtype=args.dtype, force=args.force)
    modules = ", ".join(f"{c}: {n}" for c, n in result["modules"].items())
    print(f"wrote {result['written']} ({result['format_in']} -> {result['format_out']}, {modules}; "
          f"names resolved on the {result['model']}; reloaded and checked identical)")
    return 0


# -- generate ------------------------------------------------------------------------------------------------------


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (FILE, WEIGHT); a suffix that is not a number stays part of the path.

    >>> parse_lora_arg("style.safetensors:0.7"), parse_lora_arg("C:/loras/a.safetensors")
    (('style.safetensors', 0.7), ('C:/loras/a.safetensors', 1.0))
    """
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return value, 1.0


def _adapter_name(src: str, taken: set[str]) -> str:
    stem = Path(src.rstrip("/")).name
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "lora"
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}_{n}"
    taken.add(unique)
    return unique


def _output_paths(out: str, count: int, seed: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() == ".png":
        if count == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    return [path / f"image-seed{seed}-{i}.png" for i in range(count)]


def generate_images(model: str, loras: Sequence[str], prompt: str, *, negative_prompt: str | None = None, steps: int = 30,
                    seed: int = 0, width: int | None = None, height: int | None = None, guidance_scale: float | None = None,
                    num_images: int = 1, out: str = "lora-loader-out", device: str | None = None,
                    dtype: str | None = None) -> list[Path]:
    """Load a pipeline, each LoRA as its own adapter at its weight, generate, and write PNGs; returns their paths.

    The same as, in Python::

        pipe = lora_loader.attach(DiffusionPipeline.from_pretrained(model, torch_dtype=...)).to(device)
        for file, weight in loras: pipe.load_lora_weights(file, adapter_name=name)
        pipe.set_adapters(names, weights=weights)
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(seed)).images
    """
    import torch
    from diffusers import DiffusionPipeline

    import lora_loader

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    torch_dtype = getattr(torch, _DTYPES[dtype])
    pipe = lora_loader.attach(DiffusionPipeline.from_pretrained(os.fspath(model), torch_dtype=torch_dtype))
    pipe = pipe.to(device)
    names, weights, taken = [], [], set()
    for value in loras:
        src, weight = parse_lora_arg(value)
        name = _adapter_name(src, taken)
        report = pipe.load_lora_weights(src, adapter_name=name)
        print(report, file=sys.stderr)
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters(names, weights=weights)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "num_images_per_prompt": num_images,
                              "generator": torch.Generator(device=device).manual_seed(seed)}
    for key, value in (("negative_prompt", negative_prompt), ("width", width), ("height", height), ("guidance_scale", guidance_scale)):
        if value is not None:
            kwargs[key] = value
    images = pipe(prompt, **kwargs).images
    paths = _output_paths(out, len(images), seed)
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    paths = generate_images(
        args.model, args.lora or [], args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, seed=args.seed,
        width=args.width, height=args.height, guidance_scale=args.guidance_scale, num_images=args.num_images,
        out=args.out, device=args.device, dtype=args.dtype,
    )
    for path in paths:
        print(path)
    return 0


# -- demo ----------------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    if args.threads is not None or args.llm:
        import torch

        # SmolLM2 generates fastest on one thread on small shared machines (several threads fight over the
        # cores for such small matmuls), so --llm uses 1 unless told otherwise.
        torch.set_num_threads(args.threads or 1)
    if args.llm:
        from .demo_llm import run_llm_demo

        run_llm_demo(max_new_tokens=args.max_new_tokens, out=args.out)
        return 0
    from .demo import run_demo  # the image demo (lora_loader/demo.py), imported only when asked for

    kwargs: dict[str, Any] = {"out": Path(args.out or "gallery"), "seed": args.seed}
    if args.steps is not None:  # else the demo's own default, tuned to its embedded model
        kwargs["steps"] = args.steps
    run_demo(**kwargs)
    return 0


# -- the parser and main ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``lora-loader: error: ...``), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-loader`` argument parser (one sub-command per task)."""
    parser = _Parser(prog=PROG, description="Inspect, convert and try LoRA adapters (lora_loader, no peft needed).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    debug = dict(action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")

    p = sub.add_parser("inspect", help="what a LoRA file holds: format, base model, modules, ranks, alphas, metadata",
                       description="Report a LoRA file's (or PEFT folder's) format, base model family, targeted "
                                   "components, ranks, alphas, dtypes, size, unknown keys and header metadata.")
    p.add_argument("file", help="a .safetensors/.bin LoRA file, a folder (PEFT: adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="rewrite a LoRA in the Kohya, diffusers or PEFT layout",
                       description="Load IN onto a model (--model, or a built-in SD 1.5 / SD 2.1 / SDXL skeleton for "
                                   "the detected family) and save it with save_lora_weights(format=...). The result is "
                                   "reloaded and checked against the source before the command succeeds.")
    p.add_argument("input", metavar="IN", help="LoRA file or PEFT folder")
    p.add_argument("output", metavar="OUT", help="a .safetensors path, or a folder (PEFT: adapter_config.json + adapter_model.safetensors for a model)")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers", "peft"), help="layout to write")
    p.add_argument("--model", help="diffusers pipeline or transformers model (folder or repo id in the HF cache) whose module names to use")
    p.add_argument("--dtype", default="keep", choices=("keep", "fp16", "bf16", "fp32"), help="tensor dtype of OUT (keep: the source's)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate images with a diffusers pipeline and LoRAs",
                       description="DiffusionPipeline.from_pretrained(MODEL), each --lora loaded as its own adapter, "
                                   "set_adapters with the weights, PNGs written.")
    p.add_argument("--model", required=True, help="Hub repo id or local pipeline folder")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="a LoRA file, folder or repo id, weight 1.0 unless given; repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--out", default="lora-loader-out", help="a .png path or a folder (default: lora-loader-out/)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="run the offline demo (images; --llm: SmolLM2 with a pirate LoRA)")
    p.add_argument("--llm", action="store_true", help="the causal-LM demo: base / adapter / blend / disabled on SmolLM2-135M")
    p.add_argument("--out", help="folder for the demo's output (images: default gallery/; --llm: optional JSON of the results)")
    p.add_argument("--steps", type=int, help="denoising steps (image demo; default: the demo's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (--llm)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 with --llm, torch's default otherwise)")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)) and err.filename and err.filename not in text:
        text = f"{text}: {err.filename}"
    if not text:
        text = type(err).__name__
    from_us = type(err).__module__.startswith("lora_loader") or isinstance(err, (OSError, ValueError))
    return text if from_us else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-loader`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse already printed
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # One line per warning (what lora_loader skipped, deprecations), not Python's two-line format.
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show_warning
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return int(args.func(args) or 0)
        except BrokenPipeError:
            # The reader went away (``lora-loader inspect x | head``): not an error of ours. Point stdout at
            # devnull so the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # every failure is one line unless --debug: LoraError, OSError, ValueError, ...
            if debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
