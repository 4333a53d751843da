"""Pictures of what S-CFG did: pure functions from `StepReport` to `PIL.Image`."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .diagnostics import StepReport

__all__ = ["compare_panel", "palette", "rate_heatmap", "region_map"]


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, saturated colours (golden-angle hues)."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _label(token: str) -> str:
    return token.replace("</w>", "").replace("<|startoftext|>", "<start>").replace("<|endoftext|>", "<end>")


def region_map(report: StepReport, index: int = 0, size: tuple[int, int] | None = None) -> tuple[Image.Image, list]:
    """Colour each pixel of the mask grid by the token that owns it (first owner for ties).

    Returns the image (nearest-upsampled to `size`, `(width, height)`) and a legend of
    `(label, colour, area fraction)` for the owning tokens, largest first.
    """
    masks = report.token_masks[index]  # [T, h, w]
    owner = torch.where(masks.any(dim=0), masks.float().argmax(dim=0), -1)
    owners = [int(t) for t in owner.unique().tolist() if t >= 0]
    colours = dict(zip(owners, palette(len(owners)), strict=True))
    pixels = np.zeros((*owner.shape, 3), dtype=np.uint8)
    for token, colour in colours.items():
        pixels[(owner == token).numpy()] = colour
    image = Image.fromarray(pixels)
    if size is not None:
        image = image.resize(size, Image.NEAREST)
    tokens = report.tokens[index] if report.tokens is not None else None
    total = owner.numel()
    labels = {t: _label(tokens[t]) if tokens is not None else f"token {t}" for t in owners}
    repeated = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    legend = sorted(
        (
            (
                f"{labels[t]} #{t}" if labels[t] in repeated else labels[t],
                colours[t],
                float((owner == t).sum()) / total,
            )
            for t in owners
        ),
        key=lambda item: -item[2],
    )
    return image, legend


def rate_heatmap(report: StepReport, index: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    """The final rate map as a blue (low) to red (high) heatmap, scaled to its own min-max."""
    rate = report.rate_map[index, 0].float()
    lo, hi = float(rate.min()), float(rate.max())
    x = ((rate - lo) / (hi - lo)).numpy() if hi > lo else np.full(rate.shape, 0.5, dtype=np.float32)
    pixels = np.stack([x * 255, 40 + 0 * x, (1 - x) * 255], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.resize(size, Image.NEAREST) if size is not None else image


def compare_panel(
    cfg_image: Image.Image,
    scfg_image: Image.Image,
    report: StepReport | None,
    index: int = 0,
    guidance_scale: float | None = None,
) -> Image.Image:
    """One image: CFG | S-CFG | final region map, with titles and a legend of the largest regions."""
    w, h = cfg_image.size
    tile = max(w, h, 192)
    scale = tile / max(w, h)
    size = (round(w * scale), round(h * scale))
    font = ImageFont.load_default()
    header, legend_rows = 18, 6
    panels = [cfg_image.resize(size, Image.NEAREST), scfg_image.resize(size, Image.NEAREST)]
    titles = [f"CFG g={guidance_scale:g}" if guidance_scale else "CFG", "S-CFG"]
    legend: list = []
    if report is not None:
        regions, legend = region_map(report, index, size)
        panels.append(regions)
        titles.append("S-CFG regions (last step)")
    canvas = Image.new(
        "RGB", (size[0] * len(panels) + 4 * (len(panels) - 1), header + size[1] + 14 * legend_rows), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = i * (size[0] + 4)
        canvas.paste(panel, (x, header))
        draw.text((x + 2, 3), title, fill="black", font=font)
    if legend:
        x0 = 2 * (size[0] + 4)
        for row, (label, colour, share) in enumerate(legend[:legend_rows]):
            y = header + size[1] + 2 + 14 * row
            draw.rectangle([x0 + 2, y + 2, x0 + 11, y + 11], fill=colour)
            draw.text((x0 + 16, y), f"{label}  {share:.0%}", fill="black", font=font)
    return canvas
