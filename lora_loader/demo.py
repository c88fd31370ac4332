"""``lora-loader demo``: the library's main job on the embedded model, offline.

Loads the embedded shapes model and its two style adapters through
``load_lora_weights`` (one Kohya file, one diffusers file), renders the same
prompts and seeds as base / adapter A / adapter B / blends at several weights /
block weights / disabled, and writes each column and a labelled grid into the
gallery folder with an index saying which command made them. Prints what it
loaded and how long each step took.

>>> from pathlib import Path
>>> import tempfile
>>> result = run_demo(Path(tempfile.mkdtemp()), steps=2, prompts=["a red circle on a blue background"], quiet=True)
>>> sorted(result.images)[:3]
['base', 'blend 25% neon + 75% pastel', 'blend 50% neon + 50% pastel']
>>> result.disabled_equals_base
True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import embedded

PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a blue triangle on a white background",
    "a green circle on a black background",
)
CELL = 128  # the 32x32 images are shown enlarged, pixels kept sharp


@dataclass
class DemoResult:
    """What `run_demo` made: column label -> PIL images (one per prompt), timings, files written."""

    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    disabled_equals_base: bool = False


def _columns() -> list[tuple[str, list[str], object]]:
    """(label, active adapters, weights) for each column after the base one."""
    return [
        ("neon", ["neon"], [1.0]),
        ("pastel", ["pastel"], [1.0]),
        ("blend 75% neon + 25% pastel", ["neon", "pastel"], [0.75, 0.25]),
        ("blend 50% neon + 50% pastel", ["neon", "pastel"], [0.5, 0.5]),
        ("blend 25% neon + 75% pastel", ["neon", "pastel"], [0.25, 0.75]),
        # Block weights: neon only in the UNet's up (decoder) blocks, not in the text encoder.
        ("neon, UNet up blocks only", ["neon"], [{"unet": {"down": 0.0, "mid": 0.0, "up": 1.0}, "text_encoder": 0.0}]),
    ]


def _render(pipe, prompts: list[str], steps: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        list(prompts), num_inference_steps=steps, guidance_scale=embedded.GUIDANCE, generator=generator
    ).images


def _grid(columns: dict[str, list[Image.Image]], prompts: list[str]) -> Image.Image:
    label_h, label_w = 36, 250
    grid = Image.new("RGB", (label_w + CELL * len(columns), label_h + CELL * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns.items()):
        x = label_w + c * CELL
        words = label.split(" ")
        half = (len(words) + 1) // 2
        draw.text((x + 4, 2), " ".join(words[:half]), fill="black")
        draw.text((x + 4, 16), " ".join(words[half:]), fill="black")
        for r, image in enumerate(images):
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (x, label_h + r * CELL))
    for r, prompt in enumerate(prompts):
        draw.text((4, label_h + r * CELL + CELL // 2 - 6), prompt, fill="black")
    return grid


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-").replace("--", "-")


def run_demo(
    out: Path,
    steps: int = embedded.STEPS,
    seed: int = 0,
    prompts: list[str] | None = None,
    quiet: bool = False,
) -> DemoResult:
    """Load the embedded model and adapters, render the comparison grid into ``out``; return what was made."""
    prompts = list(prompts or PROMPTS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult()
    say = (lambda *a: None) if quiet else print

    def timed(label: str, fn):
        start = time.perf_counter()
        value = fn()
        result.timings.append((label, time.perf_counter() - start))
        return value

    pipe = timed("load the embedded model (from_pretrained + attach)", embedded.load_pipeline)
    neon = timed("load_lora_weights neon (Kohya file)", lambda: pipe.load_lora_weights(embedded.adapter_path("neon", "kohya"), adapter_name="neon"))
    pastel = timed(
        "load_lora_weights pastel (diffusers file)",
        lambda: pipe.load_lora_weights(embedded.adapter_path("pastel", "diffusers"), adapter_name="pastel"),
    )
    result.reports = [str(neon), str(pastel)]

    columns = _columns()
    bar = _progress(total=len(columns) + 2, disable=quiet)
    pipe.disable_lora()
    result.images["base"] = timed("render base (LoRA disabled)", lambda: _render(pipe, prompts, steps, seed))
    bar.update(1)
    pipe.enable_lora()
    for label, names, weights in columns:
        timed(f"set_adapters {label}", lambda: pipe.set_adapters(names, weights))
        result.images[label] = timed(f"render {label}", lambda: _render(pipe, prompts, steps, seed))
        bar.update(1)
    pipe.disable_lora()
    again = timed("render disabled again", lambda: _render(pipe, prompts, steps, seed))
    bar.update(1)
    bar.close()
    result.disabled_equals_base = all(
        a.tobytes() == b.tobytes() for a, b in zip(again, result.images["base"])
    )

    for label, images in result.images.items():
        path = out / f"demo-{_slug(label)}.png"
        strip = Image.new("RGB", (CELL * len(images), CELL))
        for i, image in enumerate(images):
            strip.paste(image.resize((CELL, CELL), Image.NEAREST), (i * CELL, 0))
        strip.save(path)
        result.files.append(path)
    grid_path = out / "demo-grid.png"
    _grid(result.images, prompts).save(grid_path)
    result.files.insert(0, grid_path)
    index = out / "README.md"
    index.write_text(_index(result, steps, seed, prompts), encoding="utf-8")
    result.files.append(index)

    say("\n".join(result.reports))
    say(_table(result.timings))
    say(f"disable_lora() gives the base images exactly: {result.disabled_equals_base}")
    say(f"wrote {len(result.files)} files to {out}/ (the grid: {grid_path})")
    return result


def _table(timings: list[tuple[str, float]]) -> str:
    width = max(len(label) for label, _ in timings)
    lines = [f"{'step'.ljust(width)}  seconds", f"{'-' * width}  -------"]
    lines += [f"{label.ljust(width)}  {seconds:7.3f}" for label, seconds in timings]
    return "\n".join(lines)


def _index(result: DemoResult, steps: int, seed: int, prompts: list[str]) -> str:
    lines = [
        "# Gallery",
        "",
        f"Made by `lora-loader demo` (steps={steps}, seed={seed}) on the embedded shapes model",
        "(`lora_loader/embedded/`), with its two style adapters loaded through `load_lora_weights`:",
        "`neon` from its Kohya file, `pastel` from its diffusers file. Rows are the prompts:",
        "",
        *[f"{i + 1}. {p}" for i, p in enumerate(prompts)],
        "",
        "| file | what it shows |",
        "| --- | --- |",
        "| `demo-grid.png` | every column below side by side, labelled |",
    ]
    for label, path in zip(result.images, result.files[1:]):
        lines.append(f"| `{path.name}` | {label} |")
    lines += ["", "Images are 32x32, enlarged 4x with nearest-neighbour so the pixels stay sharp.", ""]
    return "\n".join(lines)


def _progress(total: int, disable: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="rendering", unit="column", disable=disable)
    except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
        class _Silent:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Silent()
