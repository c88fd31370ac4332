"""Pixel statistics that say what an image of the shapes world shows: which colour, which shape, which style.

No learned judge: the background is the colour of the border, the shape is
what differs from it, its colour is the nearest palette colour to its core,
and its shape the nearest of four templates averaged from drawn images.

>>> import random
>>> from lora_loader.embedded import shapes
>>> image = shapes.draw("a red triangle on a blue background")
>>> dominant_color(image), background_color_name(image)
('red', 'blue')
>>> classify = ShapeClassifier.fit(random.Random(0), per_shape=20)
>>> classify(image)
'triangle'
>>> darkness(shapes.draw("a red circle on a blue background", style="neon")) > darkness(image)
True
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from . import shapes

# A pixel belongs to the shape when it is this far (RGB distance in [0, 1] units) from the background;
# the closest pair of palette colours (orange, yellow) is 0.33 apart.
FOREGROUND_DISTANCE = 0.2
_TEMPLATE = 12  # shape templates are the shape's bounding box resized to 12x12
_PALETTE_NAMES = list(shapes.COLORS)
_PALETTE = np.array([shapes.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32) / 255.0


def pixels(image: Image.Image) -> np.ndarray:
    """H x W x 3 float array in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def background_color(image: Image.Image) -> np.ndarray:
    """The median colour of the one-pixel border (scenes keep the shape off the border)."""
    a = pixels(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return np.median(border, axis=0)


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour nearest (RGB distance) to ``rgb`` in [0, 1]."""
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def background_color_name(image: Image.Image) -> str:
    return nearest_color(background_color(image))


def foreground_mask(image: Image.Image) -> np.ndarray:
    """Boolean H x W: pixels at least FOREGROUND_DISTANCE away from the background colour."""
    a = pixels(image)
    return np.linalg.norm(a - background_color(image), axis=-1) >= FOREGROUND_DISTANCE


def dominant_color(image: Image.Image) -> str | None:
    """The palette colour of the shape: the mean of its core (the half of its pixels farthest from the
    background, which skips anti-aliased edges). None when nothing stands out from the background."""
    a = pixels(image)
    distance = np.linalg.norm(a - background_color(image), axis=-1)
    mask = distance >= FOREGROUND_DISTANCE
    if mask.sum() < 4:
        return None
    core = distance >= np.median(distance[mask])
    return nearest_color(a[core & mask].mean(axis=0))


def shape_vector(image: Image.Image) -> np.ndarray | None:
    """The foreground mask cropped to its bounding box and resized to 12 x 12 (None if there is none)."""
    mask = foreground_mask(image)
    if mask.sum() < 4:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8) * 255
    small = Image.fromarray(crop).resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32).ravel() / 255.0


class ShapeClassifier:
    """Nearest template: one mean ``shape_vector`` per shape, from scenes drawn by `shapes.random_scene`."""

    def __init__(self, templates: dict[str, np.ndarray]):
        self.templates = templates

    @classmethod
    def fit(cls, rng: random.Random, per_shape: int = 50, size: int = 32) -> "ShapeClassifier":
        vectors: dict[str, list[np.ndarray]] = {s: [] for s in shapes.SHAPES}
        while min(len(v) for v in vectors.values()) < per_shape:
            scene = shapes.random_scene(rng)
            if len(vectors[scene.shape]) < per_shape:
                vectors[scene.shape].append(shape_vector(shapes.draw(scene, size)))
        return cls({s: np.mean(v, axis=0) for s, v in vectors.items()})

    def __call__(self, image: Image.Image) -> str | None:
        v = shape_vector(image)
        if v is None:
            return None
        return min(self.templates, key=lambda s: float(((self.templates[s] - v) ** 2).sum()))


# -- style statistics (means over images) -------------------------------------------------------------------


def darkness(image: Image.Image) -> float:
    """1 - mean HSV value (max of R, G, B): the neon style's dark background raises it."""
    return float(1.0 - pixels(image).max(axis=-1).mean())


def paleness(image: Image.Image) -> float:
    """Mean of min(R, G, B), the white in every pixel: the pastel style's mixing with white raises it."""
    return float(pixels(image).min(axis=-1).mean())


def stripiness(image: Image.Image) -> float:
    """Mean |change| from row to row minus mean |change| from column to column: horizontal stripes make
    it positive; an unstriped shape changes as much across rows as across columns, so about 0."""
    a = pixels(image)
    return float(np.abs(np.diff(a, axis=0)).mean() - np.abs(np.diff(a, axis=1)).mean())


def mean_statistic(statistic, images) -> float:
    return float(np.mean([statistic(image) for image in images]))
