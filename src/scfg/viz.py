"""Pictures of what S-CFG did: pure functions from `StepReport` to `PIL.Image` (matplotlib for the figures)."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .diagnostics import StepReport

__all__ = [
    "OTHER_COLOUR",
    "RATE_COLOURS",
    "SPECIAL_TOKENS",
    "compare_panel",
    "group_tokens",
    "palette",
    "rate_curves",
    "rate_heatmap",
    "region_map",
    "save_step_animation",
    "step_figure",
    "step_grid",
    "token_colour",
    "word_rates",
]


def token_colour(index: int) -> tuple[int, int, int]:
    """A saturated colour for token `index`, the same at every step (golden-angle hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75 if index % 2 else 0.95, 0.95 if index % 2 else 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, saturated colours."""
    return [token_colour(i) for i in range(n)]


SPECIAL_TOKENS = {  # start, end and padding tokens (CLIP, T5) -> their label when listed one by one
    "<|startoftext|>": "<start>",
    "<|endoftext|>": "<end>",
    "<s>": "<start>",
    "</s>": "<end>",
    "<pad>": "<pad>",
    "[gMASK]": "[gMASK]",  # ChatGLM3 (Kolors): the prefix before the words
    "sop": "sop",
}
OTHER_COLOUR = (150, 150, 150)  # the "other" entry (start, end and padding tokens together)
RATE_COLOURS = ((0, 40, 255), (255, 40, 0))  # `rate_heatmap`: its lowest and highest rate, linear in RGB between


def group_tokens(
    tokens: list[str], group_words: bool = True, show_special: bool = False
) -> list[tuple[str, list[int]]]:
    """Group a prompt's token strings into the words a person reads: `[(label, token indices)]`, in prompt order.

    CLIP's BPE ends a word at a piece ending in `</w>` (`tri`, `angle</w>`); sentencepiece (T5) starts one at a
    piece starting with `▁`. Start, end and padding tokens (`SPECIAL_TOKENS`) form one `"other"` entry, last;
    `show_special=True` lists each of them, and `group_words=False` gives one entry per token. Every index appears
    once. A label that repeats gets ` #k`: the k-th occurrence of a word, or the token's index with `group_words=False`.

    >>> group_tokens(["<|startoftext|>", "a</w>", "tri", "angle</w>", "<|endoftext|>", "<|endoftext|>"])
    [('a', [1]), ('triangle', [2, 3]), ('other', [0, 4, 5])]
    >>> group_tokens(["▁a", "▁cat", "s", "▁a", "▁dog", "</s>", "<pad>"])
    [('a #1', [0]), ('cats', [1, 2]), ('a #2', [3]), ('dog', [4]), ('other', [5, 6])]
    >>> group_tokens(["<|startoftext|>", "tri", "angle</w>"], group_words=False, show_special=True)
    [('<start>', [0]), ('tri', [1]), ('angle', [2])]
    """
    groups: list[tuple[str, list[int]]] = []
    other: list[int] = []
    in_word = False  # the previous piece opened a word that has not ended yet
    for i, token in enumerate(tokens):
        if token in SPECIAL_TOKENS:
            in_word = False
            if show_special:
                groups.append((SPECIAL_TOKENS[token], [i]))
            else:
                other.append(i)
            continue
        text = token.removesuffix("</w>").removeprefix("▁")
        if group_words and in_word and not token.startswith("▁"):
            label, indices = groups[-1]
            groups[-1] = (label + text, [*indices, i])
        else:
            groups.append((text, [i]))
        in_word = group_words and not token.endswith("</w>")
    groups = [(label or "▁", indices) for label, indices in groups]  # a lone "▁" piece keeps a visible label
    if other:
        groups.append(("other", other))
    labels = [label for label, _ in groups]
    seen: dict[str, int] = {}
    unique = []
    for label, indices in groups:
        if labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label} #{seen[label] if group_words else indices[0]}"
        unique.append((label, indices))
    return unique


def _groups(
    report: StepReport, index: int, group_words: bool, show_special: bool
) -> list[tuple[str, list[int], tuple[int, int, int]]]:
    """`group_tokens` for sample `index` of `report`, with each entry's colour; `token t` without token strings."""
    count = report.token_masks.shape[1]
    tokens = report.tokens[index] if report.tokens is not None else None
    if tokens is None or len(tokens) != count:  # `prompt_embeds`: no strings to group
        return [(f"token {t}", [t], token_colour(t)) for t in range(count)]
    return [
        (label, indices, OTHER_COLOUR if label == "other" else token_colour(indices[0]))
        for label, indices in group_tokens(tokens, group_words, show_special)
    ]


def region_map(
    report: StepReport,
    index: int = 0,
    size: tuple[int, int] | None = None,
    group_words: bool = True,
    show_special: bool = False,
) -> tuple[Image.Image, list]:
    """Colour each pixel of the mask grid by the word that owns it (the word of its first owning token).

    Args:
        report (`StepReport`): one step.
        index (`int`, defaults to 0): the sample in the batch.
        size (`tuple[int, int]`, *optional*): nearest-upsample the image to `(width, height)`.
        group_words (`bool`, defaults to `True`): one entry per word (`group_tokens`); `False`: per token.
        show_special (`bool`, defaults to `False`): list start, end and padding tokens one by one instead of as
            one grey `"other"` entry.

    Returns:
        The image and a legend of `(label, colour, area fraction)`, largest first. A word's area is the union of
        its tokens' masks, so with multi-hot ties the fractions can sum to more than 1.
    """
    report = report.frame(0) if report.frames is not None else report  # a video: its first frame (`report.frame(f)`)
    masks = report.token_masks[index]  # [T, h, w]
    groups = _groups(report, index, group_words, show_special)
    group_of = torch.empty(masks.shape[0] + 1, dtype=torch.long)
    group_of[-1] = -1  # pixels no token owns
    for g, (_, indices, _) in enumerate(groups):
        group_of[indices] = g
    owner = group_of[torch.where(masks.any(dim=0), masks.float().argmax(dim=0), -1)]  # [h, w]
    pixels = np.zeros((*owner.shape, 3), dtype=np.uint8)
    legend = []
    for g, (label, indices, colour) in enumerate(groups):
        pixels[(owner == g).numpy()] = colour
        share = float(masks[indices].any(dim=0).float().mean())
        if share > 0:
            legend.append((label, colour, share))
    legend.sort(key=lambda item: -item[2])  # stable: equal shares stay in prompt order
    image = Image.fromarray(pixels)
    if size is not None:
        image = image.resize(size, Image.NEAREST)
    return image, legend


def rate_heatmap(report: StepReport, index: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    """The final rate map as a blue (low) to red (high) heatmap (`RATE_COLOURS`), scaled to its own min-max. A video
    step shows its first frame (`report.frame(f)` for another)."""
    report = report.frame(0) if report.frames is not None else report
    rate = report.rate_map[index, 0].float()
    lo, hi = float(rate.min()), float(rate.max())
    x = ((rate - lo) / (hi - lo)).numpy() if hi > lo else np.full(rate.shape, 0.5, dtype=np.float32)
    low, high = (np.array(c, dtype=np.float32) for c in RATE_COLOURS)
    pixels = (low + x[..., None] * (high - low)).round().astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.resize(size, Image.NEAREST) if size is not None else image


def compare_panel(
    cfg_image: Image.Image,
    scfg_image: Image.Image,
    report: StepReport | None,
    index: int = 0,
    guidance_scale: float | None = None,
    group_words: bool = True,
    show_special: bool = False,
) -> Image.Image:
    """One image: CFG | S-CFG | final region map, with titles and a legend of the largest regions (words by
    default; `group_words` and `show_special` as in `region_map`)."""
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
        regions, legend = region_map(report, index, size, group_words, show_special)
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


def step_figure(
    report: StepReport,
    index: int = 0,
    image: Image.Image | None = None,
    group_words: bool = True,
    show_special: bool = False,
) -> Image.Image:
    """One step: [generated image |] regions coloured by word with a legend | rate heatmap with a colour bar.

    `group_words` and `show_special` as in `region_map`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if image is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2), dpi=80)
    axes = list(axes)
    if image is not None:
        axes.pop(0).imshow(image)
        fig.axes[0].set_title("image")
    regions, legend = region_map(report, index, group_words=group_words, show_special=show_special)
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


def word_rates(
    reports: list[StepReport], index: int = 0, group_words: bool = True, show_special: bool = False
) -> list[tuple[str, tuple[int, int, int], list[float], float]]:
    """Per word, its region rate (before clamps) at each step: `[(label, colour, rates, area)]`, largest first.

    A word's rate is its tokens' rates weighted by their areas (NaN at a step where it owns nothing); `area` is its
    union area summed over the steps. `group_words` and `show_special` as in `region_map`.
    """
    groups = _groups(reports[-1], index, group_words, show_special)
    rows = []
    for label, indices, colour in groups:
        rates, area = [], 0.0
        for r in reports:
            masks = r.token_masks[index, indices]  # [k, h, w]
            weights = masks.flatten(1).float().sum(dim=1)
            total = float(weights.sum())
            rates.append(float((weights * r.token_rates[index, indices]).sum()) / total if total else float("nan"))
            area += float(masks.any(dim=0).float().mean())
        if area > 0:
            rows.append((label, colour, rates, area))
    rows.sort(key=lambda row: -row[3])
    return rows


def rate_curves(
    reports: list[StepReport], index: int = 0, top: int = 8, group_words: bool = True, show_special: bool = False
) -> Image.Image:
    """Per-word rate (before clamps, `word_rates`) over the steps, for the `top` words that own the most area."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step if r.step is not None else i for i, r in enumerate(reports)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for label, colour, rates, _ in word_rates(reports, index, group_words, show_special)[:top]:
        ax.plot(steps, rates, marker="o", markersize=3, color=[c / 255 for c in colour], label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("region rate (before clamps)")
    ax.set_title(f"per-{'word' if group_words else 'token'} S-CFG rates")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _figure_to_image(fig)


def save_step_animation(
    reports: list[StepReport],
    path: Any,
    index: int = 0,
    duration_ms: int = 300,
    group_words: bool = True,
    show_special: bool = False,
) -> None:
    """Write an animated GIF of `step_figure` over the steps to `path` (a file name or a binary file)."""
    frames = [step_figure(r, index, group_words=group_words, show_special=show_special) for r in reports]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)


def step_grid(
    reports: list[StepReport],
    index: int = 0,
    columns: int = 3,
    max_frames: int = 12,
    group_words: bool = True,
    show_special: bool = False,
) -> Image.Image:
    """A PNG grid of `step_figure` for up to `max_frames` evenly spaced steps."""
    picks = np.unique(np.linspace(0, len(reports) - 1, min(max_frames, len(reports))).round().astype(int))
    frames = [step_figure(reports[i], index, group_words=group_words, show_special=show_special) for i in picks]
    w, h = frames[0].size
    rows = -(-len(frames) // columns)
    cols = min(columns, len(frames))
    grid = Image.new("RGB", (w * cols, h * rows), "white")
    for i, frame in enumerate(frames):
        grid.paste(frame, ((i % cols) * w, (i // cols) * h))
    return grid
