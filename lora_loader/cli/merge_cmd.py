"""``lora-loader merge A.safetensors:0.7 B.safetensors:0.3 --to OUT``: one LoRA file made of several.

The files are loaded onto one model (``--model``, or the built-in skeleton of their detected
family, as ``convert`` does), merged with `add_weighted_adapter` (PEFT's combination types,
`lora_loader.merge`) and the result saved with ``save_lora_weights(format=...)``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import LoraError
from ..families import detect_family
from ..formats import convert
from ..hub import read_source
from ..merge import COMBINATION_TYPES
from ..skeletons import SKELETONS, build_skeleton, skeleton_from_pretrained
from .generate_cmd import _adapter_name, parse_lora_arg


def add_merge_parser(sub, debug: dict) -> None:
    """The ``merge`` sub-command's arguments."""
    p = sub.add_parser("merge", help="merge several LoRA files into one (PEFT's add_weighted_adapter combinations)",
                       description="Load each FILE[:WEIGHT] onto one model (--model, or the built-in SD 1.5 / SD 2.1 / "
                                   "SDXL skeleton of the detected family), merge them with add_weighted_adapter and "
                                   "save the result.")  # fmt: skip
    p.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files (or PEFT folders) with their weights (default 1)")
    p.add_argument("--to", required=True, metavar="OUT", help="the merged file (.safetensors) or folder")
    p.add_argument("--combination-type", default="linear", choices=COMBINATION_TYPES, help="how to merge (PEFT's names; default linear)")
    p.add_argument("--density", type=float, help="fraction of values kept by ties, dare_* and magnitude_prune")
    p.add_argument("--svd-rank", type=int, help="rank of an *_svd merge (default: the largest input rank)")
    p.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"), help="ties / dare_ties sign election")
    p.add_argument("--seed", type=int, default=0, help="seed of dare_*'s random pruning")
    p.add_argument("--format", choices=("kohya", "diffusers", "peft"), help="layout of OUT (default: the first input's)")
    p.add_argument("--model", help="diffusers pipeline or transformers model (folder or repo id in the HF cache) to merge on")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    """``lora-loader merge``: `merge_loras`, and one line saying what was written."""
    result = merge_loras(
        [parse_lora_arg(v) for v in args.inputs], args.to, combination_type=args.combination_type, density=args.density,
        svd_rank=args.svd_rank, majority_sign_method=args.majority_sign_method, seed=args.seed, fmt=args.format,
        model=args.model, force=args.force,
    )  # fmt: skip
    sources = ", ".join(f"{os.path.basename(s)} x {w:g}" for s, w in result["inputs"])
    print(f"wrote {result['written']} ({result['combination_type']} of {sources}; {result['format']} layout, rank {result['rank']})")
    return 0


def merge_loras(inputs: list[tuple[str, float]], dst: str, combination_type: str = "linear", density: float | None = None,
                svd_rank: int | None = None, majority_sign_method: str = "total", seed: int = 0, fmt: str | None = None,
                model: str | None = None, force: bool = False) -> dict[str, Any]:  # fmt: skip
    """Merge LoRA files into ``dst``; returns what was done.

    Example (two Kohya LoRAs for one SDXL model)::

        merge_loras([("a.safetensors", 0.7), ("b.safetensors", 0.3)], "ab.safetensors", combination_type="cat")
    """
    import torch

    if len(inputs) < 1:
        raise ValueError("merge needs at least one FILE[:WEIGHT]")
    if os.path.exists(dst) and not force and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    first = read_source(inputs[0][0])
    converted = convert(first.tensors, first.metadata, first.adapter_config)
    if converted.is_not_lora():
        raise converted.not_lora_error(first.name, first.tensors)
    family, _ = detect_family(converted.deltas, first.metadata, first.adapter_config)
    fmt = fmt or ("kohya" if converted.format.startswith(("kohya", "comfyui")) else "peft" if converted.format == "peft" else "diffusers")
    host = _host(model, family, first.adapter_config)
    taken: set[str] = set()
    names = []
    for path, _ in inputs:
        name = _adapter_name(path, taken)
        host.load_lora_weights(path, adapter_name=name)
        names.append(name)
    torch.manual_seed(seed)
    merged = "merged" if "merged" not in names else _adapter_name("merged", set(names))
    host.add_weighted_adapter(names, [w for _, w in inputs], merged, combination_type=combination_type,
                              svd_rank=svd_rank, density=density, majority_sign_method=majority_sign_method)  # fmt: skip
    written = host.save_lora_weights(dst, adapter_name=merged, format=fmt)
    rank = max(module.lora_adapters[merged].rank for _, _, module in host._lora_registry_to_read().adapters[merged].layers)
    return {"written": written, "inputs": inputs, "combination_type": combination_type, "format": fmt, "rank": rank, "family": family}


def _host(model: str | None, family: str, adapter_config: dict | None):
    if model is None and family == "causal-lm":
        model = (adapter_config or {}).get("base_model_name_or_path")
    if model is not None:
        return skeleton_from_pretrained(model)
    candidates = ("sd1", "sd2") if family == "sd1/sd2" else (family,)
    if candidates[0] not in SKELETONS:
        raise LoraError(f"no built-in model for {family!r} files; pass --model (a pipeline or model folder, or a repo id in the HF cache)")
    return build_skeleton(candidates[0])
