"""``lora-loader demo``: the main job on the embedded model, offline, writing the gallery.

The demo must load both shipped adapters through ``load_lora_weights``, render
every column from the same prompts and seed, give the base images back exactly
when LoRA is disabled, and leave a gallery whose index names each file.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_loader.cli import main
from lora_loader.demo import PROMPTS, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    return out, run_demo(out, steps=8, quiet=True)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def test_every_column_is_rendered_for_every_prompt_and_written(demo):
    out, result = demo
    assert list(result.images)[:3] == ["base", "neon", "pastel"]
    assert all(len(images) == len(PROMPTS) for images in result.images.values())
    for path in result.files:
        assert path.exists() and path.parent == out
    grid = Image.open(out / "demo-grid.png")
    assert grid.width > 128 * len(result.images) and grid.height >= 128 * len(PROMPTS)
    index = (out / "README.md").read_text()
    assert "lora-loader demo" in index
    assert all(path.name in index for path in result.files if path.suffix == ".png")


def test_the_adapters_change_the_images_and_disable_gives_the_base_exactly(demo):
    _, result = demo
    assert result.disabled_equals_base
    base = pixels(result.images["base"])
    for label in result.images:
        if label != "base":
            assert np.abs(pixels(result.images[label]) - base).max() > 0, f"{label} left the images unchanged"
    # A 50/50 blend is neither adapter alone.
    half = pixels(result.images["blend 50% neon + 50% pastel"])
    assert np.abs(half - pixels(result.images["neon"])).max() > 0
    assert np.abs(half - pixels(result.images["pastel"])).max() > 0


def test_the_load_reports_name_both_files_and_their_layouts(demo):
    _, result = demo
    assert "adapter 'neon' (kohya)" in result.reports[0] and "unet:" in result.reports[0]
    assert "adapter 'pastel' (diffusers)" in result.reports[1] and "unet:" in result.reports[1]
    assert [label for label, _ in result.timings][:3] == [
        "load the embedded model (from_pretrained + attach)",
        "load_lora_weights neon (Kohya file)",
        "load_lora_weights pastel (diffusers file)",
    ]


def test_the_command_writes_the_gallery_and_prints_the_timings(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "g"), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "load_lora_weights neon (Kohya file)" in printed and "seconds" in printed
    assert "disable_lora() gives the base images exactly: True" in printed
    assert (tmp_path / "g" / "demo-grid.png").exists()
