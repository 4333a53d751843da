"""An exact scorer for images of the demo domain: find objects by colour, classify shape, size and position.

Detection: 8-connected components of the object pixels, small specks dropped; each component's colour is the palette
colour most of its pixels are nearest to. Object pixels are those far from white (the `shapes` domain) or, on a
textured background (a caption ending "on grass"), those more saturated than any texture can be: textures stay at
saturation 0.64 or less, the palette at 0.78 or more, and the threshold is halfway. The background itself is read as
the texture whose mean colour the non-object pixels' mean is nearest to. Shape from the fill ratio of the bounding box (square
~1.0, circle ~0.79, triangle ~0.5), size from the bounding box's longer side, position from the centroid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .data import BACKGROUND_MAX_SATURATION, BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES, TEXTURE_COLORS

__all__ = [
    "Detection",
    "PromptScore",
    "detect",
    "detect_background",
    "parse_caption",
    "score_image",
    "split_background",
]

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)
_SMALL_MAX = (SIZES["small"][1] + SIZES["large"][0]) / 2  # 19 px on the 64 px canvas
_PALETTE_MIN_SATURATION = min((max(c) - min(c)) / max(c) for c in COLORS.values())  # 0.78 (purple)
_OBJECT_SATURATION = (BACKGROUND_MAX_SATURATION + _PALETTE_MIN_SATURATION) / 2
_TEXTURE_MEANS = np.array([np.mean(TEXTURE_COLORS[b], axis=0) for b in BACKGROUNDS], dtype=np.float32)


@dataclass
class Detection:
    color: str
    shape: str
    size: str
    center: tuple[float, float]  # (y, x)
    area: int
    mask: np.ndarray = field(repr=False)


@dataclass
class RequestedObject:
    size: str | None
    color: str
    shape: str


@dataclass
class PromptScore:
    """Per-attribute results for one image; every field is a bool or a count."""

    num_requested: int
    num_detected: int
    color: float  # fraction of requested objects whose colour is present
    shape: float  # ... and with the right shape
    size: float  # ... and the right size
    relation: bool | None  # None for prompts without a relation
    extra_objects: int
    full: bool  # every object right (colour, shape, size), relation right, no extras, background right
    background: bool | None = None  # the named background drawn; None for captions without one


def split_background(caption: str) -> tuple[str, str | None]:
    """`("a red circle", "grass")` for "a red circle on grass"; the background is None when the caption names none."""
    head, sep, tail = caption.rpartition(" on ")
    return (head, tail) if sep and tail in BACKGROUNDS else (caption, None)


def parse_caption(caption: str) -> tuple[list[RequestedObject], str | None]:
    """Objects and the relation (for 2-object captions) named by a demo caption (its background, if any, aside)."""
    caption = split_background(caption)[0]
    relation = next((r for r in RELATIONS if f" {r} " in caption), None)
    parts = caption.split(f" {relation} ") if relation else caption.split(" and ")
    objects = []
    for part in parts:
        words = re.findall(r"[a-z]+", part.lower())
        color = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w in SHAPES), None)
        size = next((w for w in words if w in SIZES), None)
        if color is None or shape is None:
            raise ValueError(f"Expected a demo caption like 'a small red circle', but got {caption!r}.")
        objects.append(RequestedObject(size, color, shape))
    return objects, relation


def object_pixels(image: np.ndarray, textured: bool, background_distance: float = 60.0) -> np.ndarray:
    """`[H, W]` bool: the pixels that belong to objects, on white or (`textured`) on one of the textures."""
    img = image.astype(np.float32)
    if not textured:
        return np.linalg.norm(img - 255.0, axis=-1) >= background_distance
    high, low = img.max(axis=-1), img.min(axis=-1)
    return (high - low) > _OBJECT_SATURATION * np.maximum(high, 1.0)


def detect_background(image: np.ndarray, objects: np.ndarray | None = None) -> str:
    """The texture (one of `BACKGROUNDS`) whose mean colour is nearest the mean of the image's non-object pixels."""
    objects = object_pixels(image, textured=True) if objects is None else objects
    rest = image[~objects] if (~objects).any() else image.reshape(-1, 3)
    mean = rest.astype(np.float32).mean(axis=0)
    return BACKGROUNDS[int(np.linalg.norm(_TEXTURE_MEANS - mean, axis=-1).argmin())]


def detect(
    image: np.ndarray,
    min_area: int = 12,
    background_distance: float = 60.0,
    core_distance: float = 100.0,
    textured: bool = False,
) -> list[Detection]:
    """Find the objects in a `[H, W, 3]` uint8 image, on white or (`textured`) on a texture. Pixel sizes are
    relative to a 64 px canvas.

    Objects are 8-connected components of non-background pixels (objects never touch in this domain), so a
    blurred edge whose hue drifts (yellow towards orange) stays part of its object; each object takes the
    palette colour most of its pixels are nearest to.
    """
    img = image.astype(np.float32)
    scale = image.shape[0] / 64
    distance = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, K]
    nearest = distance.argmin(axis=-1)
    foreground = object_pixels(image, textured, background_distance)
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    detections = []
    for index in range(1, count + 1):
        mask = labels == index
        area = int(mask.sum())
        if area < min_area * scale**2:
            continue
        k = int(np.bincount(nearest[mask], minlength=len(_NAMES)).argmax())
        # Shape from the object's core (pixels close to its colour): blurred fringes round off corners.
        core = mask & (distance[:, :, k] < core_distance)
        ys, xs = np.nonzero(core if core.sum() >= area // 2 else mask)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = len(ys) / float(height * width)
        shape = "square" if fill > 0.86 else "circle" if fill > 0.64 else "triangle"
        color = _NAMES[k]
        size = "small" if max(height, width) / scale < _SMALL_MAX else "large"
        detections.append(Detection(color, shape, size, (float(ys.mean()), float(xs.mean())), area, mask))
    return detections


def _relation_holds(relation: str, a: Detection, b: Detection) -> bool:
    dy, dx = a.center[0] - b.center[0], a.center[1] - b.center[1]
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[relation]


def score_image(image: np.ndarray, caption: str) -> tuple[PromptScore, list[Detection | None]]:
    """Score one image against its caption; also return the detection matched to each requested object."""
    requested, relation = parse_caption(caption)
    background = split_background(caption)[1]
    detections = detect(image, textured=background is not None)
    free = list(detections)
    matched: list[Detection | None] = []
    for obj in requested:
        candidates = [d for d in free if d.color == obj.color]
        # prefer the right shape, then the right size, then the largest
        candidates.sort(key=lambda d: (d.shape != obj.shape, obj.size is not None and d.size != obj.size, -d.area))
        best = candidates[0] if candidates else None
        if best is not None:
            free.remove(best)
        matched.append(best)
    n = len(requested)
    color_ok = [m is not None for m in matched]
    shape_ok = [m is not None and m.shape == o.shape for m, o in zip(matched, requested, strict=True)]
    size_ok = [
        m is not None and m.shape == o.shape and (o.size is None or m.size == o.size)
        for m, o in zip(matched, requested, strict=True)
    ]
    relation_ok = None
    if relation is not None:
        a, b = matched
        relation_ok = a is not None and b is not None and _relation_holds(relation, a, b)
    background_ok = None if background is None else detect_background(image) == background
    full = all(size_ok) and relation_ok is not False and not free and background_ok is not False
    score = PromptScore(
        num_requested=n,
        num_detected=len(detections),
        color=sum(color_ok) / n,
        shape=sum(shape_ok) / n,
        size=sum(size_ok) / n,
        relation=relation_ok,
        extra_objects=len(free),
        full=full,
        background=background_ok,
    )
    return score, matched
