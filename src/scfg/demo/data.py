"""Procedural compositional scenes: 1-3 flat shapes on a white background, with captions and exact masks.

Captions use a closed vocabulary (`VOCABULARY`), e.g. "a small red circle left of a large blue square".
Every object keeps its ground-truth mask and attributes, so generated images can be scored exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COLORS",
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


def render(objects: list[SceneObject], size: int = 64) -> np.ndarray:
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        image[obj.mask] = COLORS[obj.color]
    return image


def _place(
    rng: np.random.Generator, extents: list[int], size: int, tries: int = 200
) -> list[tuple[float, float]] | None:
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


def _relation(a: SceneObject, b: SceneObject) -> str:
    dy, dx = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def sample_scene(rng: np.random.Generator, num_objects: int | None = None, size: int = 64) -> Scene:
    """Draw a random scene of 1-3 objects (weights 0.4/0.4/0.2) and its caption."""
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
        centers = _place(rng, [a[3] for a in attrs], size)
        if centers is None:
            continue
        objects = [
            SceneObject(shape, color, size_name, center, extent, shape_mask(shape, center, extent, size))
            for (shape, color, size_name, extent), center in zip(attrs, centers, strict=True)
        ]
        return Scene(render(objects, size), objects, caption_for(objects))


def caption_for(objects: list[SceneObject]) -> str:
    if len(objects) == 2:
        return f"{objects[0].phrase()} {_relation(objects[0], objects[1])} {objects[1].phrase()}"
    return " and ".join(o.phrase() for o in objects)


def write_tokenizer(folder: str, max_length: int = 24) -> None:
    """Save a CLIPTokenizer whose vocabulary is exactly the caption words (one token per word)."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted({c for w in VOCABULARY for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    seen: set[tuple[str, str]] = set()
    for word in VOCABULARY:
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
        split = [w for w in VOCABULARY if len(tokenizer(w, add_special_tokens=False).input_ids) > 1]
        if not split:
            break
        for word in split:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        tokenizer = build()
    tokenizer.save_pretrained(folder)
