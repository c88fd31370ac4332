"""``lora-loader generate --model M --prompt P [--lora FILE[:WEIGHT]]...``: images from a pipeline and LoRAs."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..attach import attach
from .dtypes import TORCH_DTYPE_NAMES


def add_generate_parser(sub, debug: dict) -> None:
    """The ``generate`` sub-command's arguments."""
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


def cmd_generate(args: argparse.Namespace) -> int:
    """``lora-loader generate``: `generate_images`, then the path of each image written."""
    paths = generate_images(
        args.model, args.lora or [], args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, seed=args.seed,
        width=args.width, height=args.height, guidance_scale=args.guidance_scale, num_images=args.num_images,
        out=args.out, device=args.device, dtype=args.dtype,
    )
    for path in paths:
        print(path)
    return 0


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

        pipe = attach(DiffusionPipeline.from_pretrained(model, torch_dtype=...)).to(device)
        for file, weight in loras: pipe.load_lora_weights(file, adapter_name=name)
        pipe.set_adapters(names, weights=weights)
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(seed)).images
    """
    from diffusers import DiffusionPipeline  # only this command needs diffusers; the others start without it

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    torch_dtype = getattr(torch, TORCH_DTYPE_NAMES[dtype])
    pipe = attach(DiffusionPipeline.from_pretrained(os.fspath(model), torch_dtype=torch_dtype))
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
