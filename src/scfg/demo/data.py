"""Procedural compositional scenes: 1-3 flat shapes, with captions and exact masks.

Two domains share the objects:
- `shapes` (the first demo model): a white background, captions such as "a small red circle left of a large blue
  square" over `VOCABULARY`;
- `scenes` (the second): a textured background of one of `BACKGROUNDS` (sky, grass, water, sand, brick), named at
  the end of the caption, "a small red circle left of a large blue square on grass", over `SCENE_VOCABULARY`. The
  background is a semantic unit of its own with content, as the sky or the grass of a photograph is.

Every object keeps its ground-truth mask and attributes, so generated images can be scored exactly. Textures are
muted (saturation at most 0.64, `BACKGROUND_MAX_SATURATION`) and the object palette is vivid (at least 0.78), so a
scorer can tell object pixels from background pixels on any texture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SCENE_VOCABULARY",
    "SHAPES",
    "SIZES",
    "VOCABULARY",
    "Scene",
    "SceneObject",
    "render",
    "sample_scene",
    "write_tokenizer",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (12, 16), "large": (22, 28)}  # side / diameter in pixels on a 64x64 canvas
RELATIONS = ("left of", "right of", "above", "below")
VOCABULARY = ("a", "and", "of", *SIZES, *COLORS, *SHAPES, "left", "right", "above", "below")
BACKGROUND = (255, 255, 255)
BACKGROUNDS = ("sky", "grass", "water", "sand", "brick")
SCENE_VOCABULARY = (*VOCABULARY, "on", *BACKGROUNDS)
BACKGROUND_MAX_SATURATION = 0.64
# The colours each texture mixes (its pixels lie between them, plus bounded noise); the scorer reads a generated
# image's background as the texture whose colours its non-object pixels are nearest to.
TEXTURE_COLORS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sky": ((120, 165, 225), (195, 215, 240), (238, 242, 250)),
    "grass": ((60, 90, 40), (105, 135, 60)),
    "water": ((40, 75, 105), (90, 130, 160)),
    "sand": ((185, 160, 115), (225, 205, 160)),
    "brick": ((165, 95, 80), (130, 78, 68), (195, 185, 175)),
}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # (y, x) in pixels
    extent: int  # side / diameter in pixels
    mask: np.ndarray = field(repr=False)  # [H, W] bool

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    objects: list[SceneObject]
    caption: str
    background: str | None = None  # one of BACKGROUNDS, or None for the white background of the `shapes` domain


def shape_mask(shape: str, center: tuple[float, float], extent: int, size: int) -> np.ndarray:
    """Boolean mask of one shape; `extent` is the side of its bounding square."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cy, cx = center
    r = extent / 2
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    if shape == "square":
        return (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
    if shape == "triangle":  # apex up
        top, bottom = cy - r, cy + r
        half_width = (y - top) / (2 * r) * r
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"Expected a shape in {SHAPES}, but got {shape!r}.")


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: np.ndarray) -> np.ndarray:
    """`a + t (b - a)` per pixel, `t` in [0, 1] of shape [H, W]: an [H, W, 3] float image."""
    a_, b_ = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a_ + np.clip(t, 0.0, 1.0)[..., None] * (b_ - a_)


def texture(name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A random `[size, size, 3]` uint8 texture of background `name` (one of `BACKGROUNDS`)."""
    from scipy import ndimage

    colors = TEXTURE_COLORS[name]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if name == "sky":  # a vertical gradient, lighter at the horizon, and a few soft clouds
        image = _mix(colors[0], colors[1], y + rng.uniform(-0.2, 0.2))
        clouds = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(0, 4))):
            cy, cx, r = rng.uniform(0.05, 0.7), rng.uniform(0, 1), rng.uniform(0.06, 0.14)
            clouds += np.exp(-(((y - cy) / r) ** 2 + ((x - cx) / (2.2 * r)) ** 2))
        t = np.clip(clouds, 0, 0.9)[..., None]
        image = image * (1 - t) + np.asarray(colors[2], np.float32) * t
    elif name == "grass":  # blades: noise smoothed along y far more than along x
        blades = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=(3.0, 0.6))
        image = _mix(colors[0], colors[1], 0.5 + 2.5 * blades)
    elif name == "water":  # horizontal waves, bent across x
        period, phase = rng.uniform(0.08, 0.14), rng.uniform(0, 2 * np.pi)
        bend = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * (x * rng.uniform(1, 3)) + rng.uniform(0, 2 * np.pi))
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * y / period + phase + bend)
        image = _mix(colors[0], colors[1], waves**2 + 0.08 * rng.standard_normal((size, size)))
    elif name == "sand":  # speckle on faint diagonal ripples
        ripples = 0.5 + 0.2 * np.sin(2 * np.pi * (x + y * rng.uniform(0.3, 0.8)) / rng.uniform(0.1, 0.2))
        image = _mix(colors[0], colors[1], ripples + 0.18 * rng.standard_normal((size, size)))
    elif name == "brick":  # 16x8-px bricks in offset rows, 1-px mortar
        rows = np.arange(size)[:, None] // 8
        cols = (np.arange(size)[None, :] + 8 * (rows % 2) + int(rng.integers(0, 16))) // 16
        shade = rng.uniform(0, 1, (size // 8 + 1, size // 16 + 2)).astype(np.float32)
        image = _mix(colors[0], colors[1], shade[rows, cols] + 0.06 * rng.standard_normal((size, size)))
        offset = int(rng.integers(0, 8))
        mortar = ((np.arange(size)[:, None] + offset) % 8 == 0) | (
            (np.arange(size)[None, :] + 8 * (((np.arange(size)[:, None] + offset) // 8) % 2)) % 16 == 0
        )
        image[mortar] = colors[2]
    else:
        raise ValueError(f"Expected a background in {BACKGROUNDS}, but got {name!r}.")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(
    objects: list[SceneObject],
    size: int = 64,
    background: str | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The scene's image: `objects` on white, or on a random texture of `background` drawn from `rng`."""
    if background is None:
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = BACKGROUND
    else:
        image = texture(background, rng if rng is not None else np.random.default_rng(0), size)
    for obj in objects:
        image[obj.mask] = COLORS[obj.color]
    return image


def place_objects(
    rng: np.random.Generator, extents: list[int], size: int, tries: int = 200
) -> list[tuple[float, float]] | None:
    """Random `(y, x)` centres for objects of bounding sides `extents`, inside the canvas and 2 px apart; None when
    `tries` draws per object do not fit them."""
    centers: list[tuple[float, float]] = []
    for extent in extents:
        for _ in range(tries):
            r = extent / 2
            c = (float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)))
            # keep a gap of 2 px between bounding squares: objects never touch
            if all(
                max(abs(c[0] - o[0]), abs(c[1] - o[1])) > (extent + e) / 2 + 2
                for o, e in zip(centers, extents, strict=False)
            ):
                centers.append(c)
                break
        else:
            return None
    return centers


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """The caption's relation of `a` to `b`: the axis of their larger centre offset decides."""
    dy, dx = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def sample_scene(
    rng: np.random.Generator,
    num_objects: int | None = None,
    size: int = 64,
    backgrounds: tuple[str, ...] | None = None,
) -> Scene:
    """Draw a random scene of 1-3 objects (weights 0.4/0.4/0.2) and its caption; with `backgrounds` (the `scenes`
    domain), on a texture drawn uniformly from them, named at the caption's end ("... on grass")."""
    background = None if not backgrounds else str(rng.choice(list(backgrounds)))
    while True:
        n = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])) if num_objects is None else num_objects
        attrs = []
        for _ in range(n):
            size_name = str(rng.choice(list(SIZES)))
            low, high = SIZES[size_name]
            attrs.append(
                (str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), size_name, int(rng.integers(low, high + 1)))
            )
        # distinct (colour, shape) pairs so that every phrase names one object
        if len({(a[0], a[1]) for a in attrs}) < n:
            continue
        centers = place_objects(rng, [a[3] for a in attrs], size)
        if centers is None:
            continue
        objects = [
            SceneObject(shape, color, size_name, center, extent, shape_mask(shape, center, extent, size))
            for (shape, color, size_name, extent), center in zip(attrs, centers, strict=True)
        ]
        image = render(objects, size, background, rng)
        return Scene(image, objects, caption_for(objects, background), background)


def caption_for(objects: list[SceneObject], background: str | None = None) -> str:
    if len(objects) == 2:
        caption = f"{objects[0].phrase()} {relation_between(objects[0], objects[1])} {objects[1].phrase()}"
    else:
        caption = " and ".join(o.phrase() for o in objects)
    return caption if background is None else f"{caption} on {background}"


def write_tokenizer(folder: str, max_length: int = 24, vocabulary: tuple[str, ...] = VOCABULARY) -> None:
    """Save a CLIPTokenizer whose vocabulary is exactly the caption words `vocabulary` (one token per word)."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted({c for w in vocabulary for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    seen: set[tuple[str, str]] = set()
    for word in vocabulary:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(f"{pair[0]} {pair[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1], *parts[2:]]

    def build() -> CLIPTokenizer:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("\n".join(merges) + "\n")
        return CLIPTokenizer(
            os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=max_length
        )

    # BPE applies merges by global rank, so one word's merges can split another ("an" of "and" inside
    # "triangle"): add the merge of the first two pieces of every split word until each word is one token.
    tokenizer = build()
    for _ in range(200):
        split = [w for w in vocabulary if len(tokenizer(w, add_special_tokens=False).input_ids) > 1]
        if not split:
            break
        for word in split:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        tokenizer = build()
    tokenizer.save_pretrained(folder)
