"""Aggregate a run's manifest (and metrics) per method and scale; plots; an image grid; matched strength.

Matched strength ("Guidance Matters", ICLR 2026): S-CFG at nominal scale `g` guides with `g * mean(rate)`. Each
S-CFG row is also compared with the CFG row whose scale is nearest to that effective scale.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .runner import read_manifest

__all__ = ["build_report"]


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["scale"])), []).append(row)
    return groups


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def build_report(
    run: str | Path,
    fid_fn: Callable[[list[Path]], float] | None = None,
    clip_fn: Callable[[list[Path], list[str]], list[float]] | None = None,
    grid_prompts: int = 4,
    demo_fn: Callable[[list[Path], list[str], list[int]], dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Write `report.json`, `report.csv`, `plots.png` and `grid.png` into the run folder; return the table.

    Args:
        run: the run folder (`manifest.jsonl` from `run_generation`).
        fid_fn: `paths -> FID` against the user's reference (see `scfg.eval.metrics.fid`), or None.
        clip_fn: `(paths, prompts) -> per-image CLIP scores`, or None.
        demo_fn: `(paths, prompts, seeds) -> {metric: value}` for the group (`scfg.eval.metrics.demo_metrics`: the
            demo domain's `fd` and exact scores), or None.
    """
    run = Path(run)
    rows = read_manifest(run / "manifest.jsonl")
    if not rows:
        raise FileNotFoundError(f"Expected {run / 'manifest.jsonl'} from `scfg eval generate`, but it is missing.")
    table = []
    for (method, scale), group in _groups(rows).items():
        paths = [run / r["path"] for r in group]
        entry: dict[str, Any] = {
            "method": method,
            "scale": scale,
            "images": len(group),
            "effective_scale": _mean([r.get("effective_scale") for r in group]),
            "spread_before": _mean([r.get("spread_before") for r in group]),
            "spread_after": _mean([r.get("spread_after") for r in group]),
            "seconds_per_image": _mean([r.get("seconds") for r in group]),
        }
        if clip_fn is not None:
            entry["clip"] = float(np.mean(clip_fn(paths, [r["prompt"] for r in group])))
        if fid_fn is not None:
            entry["fid"] = float(fid_fn(paths))
        if demo_fn is not None:
            entry.update(demo_fn(paths, [r["prompt"] for r in group], [int(r["seed"]) for r in group]))
        table.append(entry)
    cfg_rows = {e["scale"]: e for e in table if e["method"] == "cfg"}
    for entry in table:
        if entry["method"] != "cfg" and cfg_rows and entry["effective_scale"] is not None:
            nearest = min(cfg_rows, key=lambda s: abs(s - entry["effective_scale"]))
            entry["matched_cfg_scale"] = nearest
            for metric in ("clip", "fid", "fd", "full"):
                if metric in cfg_rows[nearest]:
                    entry[f"matched_cfg_{metric}"] = cfg_rows[nearest][metric]
    (run / "report.json").write_text(json.dumps(table, indent=1))
    columns = sorted({k for e in table for k in e}, key=lambda k: (k not in ("method", "scale"), k))
    with (run / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    _plots(table, run / "plots.png")
    _grid(rows, run / "grid.png", grid_prompts)
    return table


def _plots(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("fid", "clip", "fd", "full", "effective_scale", "spread_before", "spread_after")
    metrics = [m for m in names if m in table[0]]
    # fidelity against alignment, one curve per method: FID vs CLIP, and the demo domain's fd vs full accuracy
    pairs = [
        p
        for p in (("clip", "fid", "CLIP score", "FID"), ("full", "fd", "full-prompt accuracy", "fd"))
        if {p[0], p[1]} <= set(table[0])
    ]
    panels = len(pairs) + len(metrics)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), dpi=80, squeeze=False)
    axes = list(axes[0])
    methods = list(dict.fromkeys(e["method"] for e in table))
    for x_key, y_key, x_label, y_label in pairs:
        ax = axes.pop(0)
        for method in methods:
            pts = sorted((e["scale"], e[x_key], e[y_key]) for e in table if e["method"] == method)
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=method)
            for scale, x, y in pts:
                ax.annotate(f"{scale:g}", (x, y), fontsize=7)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(f"{y_label} vs {x_label} (labels: g)")
        ax.legend(fontsize=7)
    for ax, metric in zip(axes, metrics, strict=True):
        for method in methods:
            pts = sorted((e["scale"], e[metric]) for e in table if e["method"] == method and e[metric] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xlabel("guidance scale g")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _grid(rows: list[dict[str, Any]], path: Path, prompts: int, tile: int = 96) -> None:
    """Rows: method x scale; columns: the first `prompts` prompts (image 0): same seeds across rows."""
    groups = _groups(rows)
    keys = sorted(groups)
    indices = sorted({r["prompt_index"] for r in rows})[:prompts]
    canvas = Image.new("RGB", (150 + len(indices) * (tile + 2), len(keys) * (tile + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    root = path.parent
    for row_i, key in enumerate(keys):
        draw.text((4, row_i * (tile + 2) + tile // 2 - 6), f"{key[0]} g={key[1]:g}", fill="black")
        by_prompt = {r["prompt_index"]: r for r in groups[key] if r["image_index"] == 0}
        for col, index in enumerate(indices):
            if index in by_prompt:
                image = Image.open(root / by_prompt[index]["path"]).convert("RGB").resize((tile, tile))
                canvas.paste(image, (150 + col * (tile + 2), row_i * (tile + 2)))
    canvas.save(path)
