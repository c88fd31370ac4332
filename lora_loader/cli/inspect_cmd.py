"""``lora-loader inspect FILE [--json [--compact]]``: what a LoRA file holds.

Format, base model family, targeted components, ranks, alphas, dtypes, size,
unknown keys and header metadata, as a table or as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Any

from ..config import ADAPTER_CONFIG
from ..families import DENOISER_NAME, FAMILY_LABELS, detect_family, family_from_metadata
from ..formats import convert
from ..hub import read_source


def add_inspect_parser(sub, debug: dict) -> None:
    """The ``inspect`` sub-command's arguments."""
    p = sub.add_parser("inspect", help="what a LoRA file holds: format, base model, modules, ranks, alphas, metadata",
                       description="Report a LoRA file's (or PEFT folder's) format, base model family, targeted "
                                   "components, ranks, alphas, dtypes, size, unknown keys and header metadata.")
    p.add_argument("file", help="a .safetensors/.bin LoRA file, a folder (PEFT: adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``lora-loader inspect``: the report of `inspect_lora` as text, or as JSON with ``--json``."""
    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info, indent=None if args.compact else 2, sort_keys=False, default=str))
    else:
        print(format_inspection(info))
    return 0


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

    >>> from lora_loader import embedded
    >>> info = inspect_lora(embedded.adapter_path("neon"))
    >>> info["format"], info["family"], info["modules"]
    ('kohya', 'sd1', 114)
    """
    source = read_source(src)
    converted = convert(source.tensors, source.metadata, source.adapter_config)
    family, evidence = detect_family(converted.deltas, source.metadata, source.adapter_config)
    weights_path = source.name if os.path.isfile(source.name) else None  # None: a Hub file
    size = os.path.getsize(weights_path) if weights_path else sum(t.numel() * t.element_size() for t in source.tensors.values())
    config_path = os.path.join(os.path.dirname(weights_path), ADAPTER_CONFIG) if weights_path else None
    if source.adapter_config is not None and config_path and os.path.isfile(config_path):
        size += os.path.getsize(config_path)
    components, stats = _module_stats(converted.deltas, DENOISER_NAME.get(family, "model"))
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
        "family_from_metadata": family_from_metadata(source.metadata),
        "modules": len(converted.deltas),
        "kinds": _counts(stats["kinds"]),
        "ranks": _counts(stats["ranks"]),
        "alphas": _counts(stats["alphas"]),
        "alpha_missing": stats["alpha_missing"],
        "components": components,
        "module_copies": sorted(f"{c}.{m}" for c, m in converted.module_copies),
        "unknown_keys": dict(sorted(converted.unknown.items())),
        "ignored_keys": sorted(converted.ignored),
        "adapter_config": source.adapter_config,
        "metadata": {k: _truncate(v, metadata_chars) for k, v in sorted(source.metadata.items())},
    }


def _module_stats(deltas: dict, denoiser: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(per component, whole file)``: modules, kinds, ranks, alphas (and DoRA) of ``{(component, module): delta}``.

    The symbolic component "denoiser" is filed under ``denoiser``: the name the
    family's pipeline gives it (``unet``, ``transformer``; ``model`` if unknown).
    """
    components: dict[str, dict[str, Any]] = {}
    all_ranks, all_alphas, kinds = [], [], []
    alpha_missing = 0
    for (component, _module), delta in deltas.items():
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
    stats = {"kinds": kinds, "ranks": all_ranks, "alphas": all_alphas, "alpha_missing": alpha_missing}
    return components, stats


def _dist(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{k} x{v}" if len(counts) > 1 else k for k, v in counts.items())


def format_inspection(info: dict[str, Any], max_unknown: int = 20) -> str:
    """The human-readable report of `inspect_lora`.

    >>> from lora_loader import embedded
    >>> print(format_inspection(inspect_lora(embedded.adapter_path("neon"))).splitlines()[3])
    format      kohya
    """
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
