"""Pictures of what S-CFG did: pure functions from `StepReport` to `PIL.Image` (matplotlib for the figures)."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .diagnostics import StepReport

__all__ = [
    "compare_panel",
    "palette",
    "rate_curves",
    "rate_heatmap",
    "region_map",
    "save_step_animation",
    "step_figure",
    "step_grid",
    "token_colour",
]


def token_colour(index: int) -> tuple[int, int, int]:
    """A saturated colour for token `index`, the same at every step (golden-angle hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75 if index % 2 else 0.95, 0.95 if index % 2 else 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, saturated colours."""
    return [token_colour(i) for i in range(n)]


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
    colours = {t: token_colour(t) for t in owners}
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


def _legend_handles(legend: list, limit: int = 10):
    from matplotlib.patches import Patch

    return [
        Patch(color=[c / 255 for c in colour], label=f"{label} {share:.0%}") for label, colour, share in legend[:limit]
    ]


def _figure_to_image(fig) -> Image.Image:
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return image


def step_figure(report: StepReport, index: int = 0, image: Image.Image | None = None) -> Image.Image:
    """One step: [generated image |] regions coloured by token with a legend | rate heatmap with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if image is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2), dpi=80)
    axes = list(axes)
    if image is not None:
        axes.pop(0).imshow(image)
        fig.axes[0].set_title("image")
    regions, legend = region_map(report, index)
    ax = axes[0]
    ax.imshow(regions, interpolation="nearest")
    ax.set_title(f"regions, step {report.step}")
    ax.legend(handles=_legend_handles(legend), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax = axes[1]
    heat = ax.imshow(report.rate_map[index, 0].float().numpy(), cmap="magma", interpolation="nearest")
    ax.set_title(f"rate (effective scale = {report.guidance_scale:g} x rate)")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    for a in fig.axes[:panels]:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return _figure_to_image(fig)


def rate_curves(reports: list[StepReport], index: int = 0, top: int = 8) -> Image.Image:
    """Per-token rate (before clamps) over the steps, for the tokens that own the most area overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = sum(r.token_masks[index].flatten(1).float().mean(dim=1) for r in reports)
    order = [int(t) for t in torch.argsort(area, descending=True)[:top] if area[t] > 0]
    tokens = reports[-1].tokens[index] if reports[-1].tokens is not None else None
    steps = [r.step if r.step is not None else i for i, r in enumerate(reports)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for t in order:
        colour = token_colour(t)
        rates = [float(r.token_rates[index, t]) if r.token_masks[index, t].any() else float("nan") for r in reports]
        label = _label(tokens[t]) if tokens is not None else f"token {t}"
        ax.plot(steps, rates, marker="o", markersize=3, color=[c / 255 for c in colour], label=f"{label} (#{t})")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("region rate (before clamps)")
    ax.set_title("per-token S-CFG rates")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _figure_to_image(fig)


def save_step_animation(reports: list[StepReport], path: str, index: int = 0, duration_ms: int = 300) -> None:
    """Write an animated GIF of `step_figure` over the steps."""
    frames = [step_figure(r, index) for r in reports]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)


def step_grid(reports: list[StepReport], index: int = 0, columns: int = 3, max_frames: int = 12) -> Image.Image:
    """A PNG grid of `step_figure` for up to `max_frames` evenly spaced steps."""
    picks = np.unique(np.linspace(0, len(reports) - 1, min(max_frames, len(reports))).round().astype(int))
    frames = [step_figure(reports[i], index) for i in picks]
    w, h = frames[0].size
    rows = -(-len(frames) // columns)
    cols = min(columns, len(frames))
    grid = Image.new("RGB", (w * cols, h * rows), "white")
    for i, frame in enumerate(frames):
        grid.paste(frame, ((i % cols) * w, (i // cols) * h))
    return grid
