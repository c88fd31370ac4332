"""The drawn world of the embedded model: one coloured shape on a coloured background.

Everything here is pure PIL, seeded and deterministic: the training scripts
draw their data with it, and the tests and the demo reuse it to check what the
model draws.

A scene is a shape, its colour, the background colour, where it sits and how
big it is. Its caption follows one grammar::

    a {color} {shape} on a {background} background
    a {color} {shape}                                (background left to the model)

Three styles of the same scene: ``plain`` (what the base model learns),
``neon`` (dark background, glowing outline of the shape) and ``pastel``
(pale colours, horizontally striped fill): the two adapters learn the last two.

>>> import random
>>> scene = random_scene(random.Random(0))
>>> scene.caption() == caption(scene.color, scene.shape, scene.background)
True
>>> draw("a red circle on a blue background", size=32).size
(32, 32)
>>> parse("a red circle on a blue background")
{'color': 'red', 'shape': 'circle', 'background': 'blue'}
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter

# The palette: shape and background colours come from the same list, so the model must learn which
# colour word goes to the shape and which to the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
STYLES: tuple[str, ...] = ("plain", "neon", "pastel")

# The share of captions that leave the background out (the model then picks one).
NO_BACKGROUND_SHARE = 0.2
# How far (fraction of the size) a centred shape may sit off the centre.
CENTER_JITTER = 0.05
# Supersampling factor: draw large, then box-filter down, for anti-aliased edges.
_SUPER = 4


@dataclass(frozen=True)
class Scene:
    """One drawable scene. ``x``, ``y`` (centre) and ``radius`` are fractions of the image size."""

    color: str
    shape: str
    background: str
    x: float = 0.5
    y: float = 0.5
    radius: float = 0.3
    name_background: bool = True  # whether the caption names the background

    def caption(self) -> str:
        return caption(self.color, self.shape, self.background if self.name_background else None)


def caption(color: str, shape: str, background: str | None = None) -> str:
    """The caption of a scene: ``caption("red", "circle", "blue") == "a red circle on a blue background"``."""
    text = f"{_article(color)} {color} {shape}"
    return text if background is None else f"{text} on {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse(text: str) -> dict[str, str | None]:
    """Colour, shape and background named in a caption (None where it names none)."""
    words = text.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    before = words[: words.index(shape)] if shape else words
    color = next((w for w in reversed(before) if w in COLORS), None)
    background = None
    if "background" in words:
        i = words.index("background")
        background = next((w for w in reversed(words[:i]) if w in COLORS), None)
    return {"color": color, "shape": shape, "background": background}


def random_scene(rng: random.Random, placement: str = "centered") -> Scene:
    """A random scene: any shape and colour, a different background colour, a random size and place.

    ``placement="centered"`` (the model's world): a large shape near the centre.
    ``"anywhere"``: smaller shapes anywhere inside the frame (the VAE's wider
    training set).
    """
    color = rng.choice(list(COLORS))
    background = rng.choice([c for c in COLORS if c != color])
    if placement == "anywhere":
        radius = rng.uniform(0.2, 0.36)
        margin = radius + 0.04
        return Scene(
            color=color,
            shape=rng.choice(SHAPES),
            background=background,
            x=rng.uniform(margin, 1 - margin),
            y=rng.uniform(margin, 1 - margin),
            radius=radius,
            name_background=rng.random() >= NO_BACKGROUND_SHARE,
        )
    if placement != "centered":
        raise ValueError(f"placement={placement!r}; expected 'centered' or 'anywhere'")
    radius = rng.uniform(0.27, 0.36)
    return Scene(
        color=color,
        shape=rng.choice(SHAPES),
        background=background,
        x=0.5 + rng.uniform(-CENTER_JITTER, CENTER_JITTER),
        y=0.5 + rng.uniform(-CENTER_JITTER, CENTER_JITTER),
        radius=radius,
        name_background=rng.random() >= NO_BACKGROUND_SHARE,
    )


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape (None for a circle), in pixels."""
    if shape == "square":
        s = r * 0.85  # a square of the same visual weight as the circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up, centred on its bounding box
        return [(cx, cy - r), (cx + r * 1.05, cy + r * 0.85), (cx - r * 1.05, cy + r * 0.85)]
    if shape == "cross":  # a plus sign, arms a third of the span wide
        a, w = r, r / 3
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w), (cx + w, cy + w),
            (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _mask(scene: Scene, size: int) -> Image.Image:
    """The shape's filled mask ("L", 0 or 255) at size * _SUPER."""
    big = size * _SUPER
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = scene.x * big, scene.y * big, scene.radius * big
    polygon = _outline(scene.shape, cx, cy, r)
    if polygon is None:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(polygon, fill=255)
    return mask


def _mix(rgb, other, t: float) -> tuple[int, int, int]:
    return tuple(round(a * (1 - t) + b * t) for a, b in zip(rgb, other))


def _neon_color(rgb) -> tuple[int, int, int]:
    """The colour at full brightness (black glows grey)."""
    top = max(rgb)
    if top < 60:
        return (150, 150, 150)
    return tuple(min(255, round(c * 255 / top)) for c in rgb)


def draw(scene: Scene | str, size: int = 32, style: str = "plain") -> Image.Image:
    """Draw a scene (or a caption: centred, background from the caption, else white/black) as RGB.

    ``style``: ``plain``; ``neon`` (a near-black background tinted by the
    background colour, a glowing outline in the shape's colour); ``pastel``
    (everything mixed towards white, the shape filled with horizontal stripes).
    """
    if isinstance(scene, str):
        named = parse(scene)
        if named["color"] is None or named["shape"] is None:
            raise ValueError(f"caption {scene!r} names no colour and shape; e.g. {caption('red', 'circle', 'blue')!r}")
        background = named["background"] or ("black" if named["color"] == "white" else "white")
        scene = Scene(named["color"], named["shape"], background)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    big = size * _SUPER
    fg, bg = COLORS[scene.color], COLORS[scene.background]
    mask = _mask(scene, size)
    if style == "plain":
        image = Image.new("RGB", (big, big), bg)
        image.paste(fg, mask=mask)
    elif style == "neon":
        image = Image.new("RGB", (big, big), _mix(bg, (0, 0, 0), 0.85))
        width = max(1, round(big * 0.07))
        edge = mask.filter(ImageFilter.MaxFilter(2 * (width // 2) + 1))
        inner = mask.filter(ImageFilter.MinFilter(2 * (width // 2) + 1))
        ring = ImageChops.subtract(edge, inner)
        glow = ring.filter(ImageFilter.GaussianBlur(big * 0.05))
        light = _neon_color(fg)
        image.paste(_mix(light, (0, 0, 0), 0.45), mask=glow)
        image.paste(light, mask=ring)
    else:  # pastel
        image = Image.new("RGB", (big, big), _mix(bg, (255, 255, 255), 0.65))
        period = big * 6 // 32  # 6 pixels at 32x32
        stripes = Image.new("L", (big, big), 0)
        d = ImageDraw.Draw(stripes)
        for top in range(0, big, period):
            d.rectangle([0, top, big, top + period // 2 - 1], fill=255)
        image.paste(_mix(fg, (255, 255, 255), 0.8), mask=mask)
        strong = _mix(fg, (255, 255, 255), 0.35) if scene.color != "white" else (200, 200, 215)
        image.paste(strong, mask=ImageChops.multiply(mask, stripes))
    return image.resize((size, size), Image.BOX)

