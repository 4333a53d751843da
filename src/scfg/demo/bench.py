"""Compositional benchmark on the demo domain: CFG vs S-CFG, scored exactly.

    scfg bench-compositional [--model PATH] [--prompts 60] [--seeds 2] [--scales 3 5 7.5] [--out bench/]

For a fixed held-out prompt set (drawn from `scfg.demo.data` with its own seed; 1-, 2- and 3-object captions) and
fixed seeds, every method (plain CFG, S-CFG `official`, S-CFG `paper`) generates the same noise at each scale.
Reported per method and scale:
- per-attribute accuracies (colour present, shape, size, relation, exact object count) and full-prompt accuracy;
- the spread (coefficient of variation) of the per-region mean score norms before and after rescaling, averaged
  over steps: what S-CFG equalises (CFG is measured with S-CFG's maps at rate 1, which is CFG itself);
- the IoU between S-CFG's token regions (the object's words: size, colour, shape) over the last 20% of steps and the
  object the scorer found in the image: a direct check that the training-free segmentation finds the objects;
  on the `scenes` model also the IoU of the background word's region with the pixels that are not objects.

The prompts and S-CFG's `levels` follow the model's domain (`scfg.demo.demo_domain`): the `scenes` model's
captions name a background, and its cross-attention is at latent/1 and latent/2.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SCFGConfig
from ..diagnostics import Recorder
from ..integration import enable
from . import DemoDomain
from .data import sample_scene
from .score import object_pixels, parse_caption, score_image, split_background

__all__ = ["METHODS", "held_out_prompts", "run_benchmark"]

METHODS: dict[str, SCFGConfig] = {
    "cfg": SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None, rate_map_smoothing=None),
    "scfg-official": SCFGConfig.preset("official"),
    "scfg-paper": SCFGConfig.preset("paper"),
}


def held_out_prompts(count: int, seed: int = 20241129, backgrounds: tuple[str, ...] | None = None) -> list[str]:
    """`count` captions: 25% one object, 45% two, 30% three; distinct; drawn with their own seed; with
    `backgrounds` (the `scenes` domain) each names one of them."""
    rng = np.random.default_rng(seed)
    plan = [1] * round(count * 0.25) + [2] * round(count * 0.45)
    plan += [3] * (count - len(plan))
    prompts: list[str] = []
    for n in plan:
        while True:
            caption = sample_scene(rng, num_objects=n, backgrounds=backgrounds).caption
            if caption not in prompts:
                prompts.append(caption)
                break
    return prompts


def _object_token_positions(caption: str, tokenizer: Any) -> tuple[list[list[int]], list[int]]:
    """Token positions of each object's words (its size word, if any, its colour and its shape; all their tokens), in
    caption order, and of the background word (empty when the caption names none)."""
    from ..tokens import _word_spans

    ids = tokenizer(caption).input_ids
    requested, _ = parse_caption(caption)
    positions, cursor = [], 0
    for obj in requested:
        size = [] if obj.size is None else next(s for s in _word_spans(tokenizer, ids, obj.size) if s[0] >= cursor)
        color = next(span for span in _word_spans(tokenizer, ids, obj.color) if span[0] >= cursor)
        shape = next(span for span in _word_spans(tokenizer, ids, obj.shape) if span[0] > color[-1])
        positions.append([*size, *color, *shape])
        cursor = shape[-1] + 1
    background = split_background(caption)[1]
    spans = (
        [] if background is None else [span for span in _word_spans(tokenizer, ids, background) if span[0] >= cursor]
    )
    return positions, list(spans[-1]) if spans else []


@dataclass
class _Row:
    method: str
    scale: float
    prompt: str
    seed: int
    objects: int
    color: float
    shape: float
    size: float
    relation: bool | None
    count_ok: bool
    full: bool
    spread_before: float
    spread_after: float
    iou: float | None
    background: bool | None = None
    background_iou: float | None = None


def _generate(pipe: Any, prompts: list[str], seeds: list[int], config: SCFGConfig, scale: float, steps: int):
    recorder = Recorder()
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with enable(pipe, config, on_step=recorder):
        images = pipe(
            prompts, guidance_scale=scale, num_inference_steps=steps, generator=generators, output_type="np"
        ).images
    return (images * 255).round().astype(np.uint8), recorder.steps


def run_benchmark(
    pipe: Any,
    num_prompts: int = 60,
    seeds_per_prompt: int = 2,
    scales: tuple[float, ...] = (3.0, 5.0, 7.5),
    methods: tuple[str, ...] = tuple(METHODS),
    steps: int = 25,
    batch_size: int = 16,
    out: str | None = None,
    domain: DemoDomain | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return the per-image rows and the aggregated table (also written to `out`). `domain`
    (`scfg.demo.demo_domain(folder)`) sets the captions' backgrounds and S-CFG's `levels`; None: the `shapes`
    domain with each config's own levels."""
    prompts = held_out_prompts(num_prompts, backgrounds=None if domain is None else domain.backgrounds)
    configs = {
        m: METHODS[m] if domain is None else dataclasses.replace(METHODS[m], levels=domain.levels) for m in methods
    }
    jobs = [(p, 1000 + i * seeds_per_prompt + k) for i, p in enumerate(prompts) for k in range(seeds_per_prompt)]
    rows: list[_Row] = []
    samples: dict[tuple[str, float], list[np.ndarray]] = {}
    started = time.time()
    for method in methods:
        for scale in scales:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                images, reports = _generate(
                    pipe, [p for p, _ in chunk], [s for _, s in chunk], configs[method], scale, steps
                )
                samples.setdefault((method, scale), []).extend(images[:8] if start == 0 else [])
                late = reports[int(len(reports) * 0.8) :]
                for i, ((prompt, seed), image) in enumerate(zip(chunk, images, strict=True)):
                    positions = _object_token_positions(prompt, pipe.tokenizer)
                    rows.append(_score_one(method, scale, prompt, seed, image, reports, late, i, positions))
    table = summarise(rows)
    result = {
        "prompts": prompts,
        "seeds_per_prompt": seeds_per_prompt,
        "scales": list(scales),
        "steps": steps,
        "seconds": round(time.time() - started, 1),
        "table": table,
        "rows": [r.__dict__ for r in rows],
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(result, indent=1))
        (folder / "table.md").write_text(format_table(table))
        _sample_grid(samples).save(folder / "samples.png")
    return result


def _region_iou(late, i: int, tokens: list[int], truth: np.ndarray) -> list[float]:
    """IoU of the union of `tokens`' regions in sample `i` with the `[H, W]` bool `truth`, one per late step."""
    tokens = [t for t in tokens if t < late[0].token_masks.shape[1]]  # cut off at the text length
    if not tokens:
        return []
    ious = []
    for report in late:
        region = report.token_masks[i, tokens].any(dim=0).float()[None, None]
        region = F.interpolate(region, size=truth.shape, mode="nearest")[0, 0].bool().numpy()
        union = np.logical_or(region, truth).sum()
        ious.append(np.logical_and(region, truth).sum() / union if union else 0.0)
    return ious


def _score_one(method, scale, prompt, seed, image, reports, late, i, positions) -> _Row:
    score, matched = score_image(image, prompt)
    spread_before = float(np.mean([float(r.norm_spread(after=False)[i]) for r in reports]))
    # CFG runs at rate 1: its norms are not rescaled
    after = method != "cfg"
    spread_after = float(np.mean([float(r.norm_spread(after=after)[i]) for r in reports]))
    objects, background = positions
    ious = []
    for tokens, detection in zip(objects, matched, strict=True):
        if detection is not None:
            ious += _region_iou(late, i, tokens, detection.mask)
    background_ious = _region_iou(late, i, background, ~object_pixels(image, textured=True)) if background else []
    return _Row(
        method=method,
        scale=scale,
        prompt=prompt,
        seed=seed,
        objects=score.num_requested,
        color=score.color,
        shape=score.shape,
        size=score.size,
        relation=score.relation,
        count_ok=score.num_detected == score.num_requested,
        full=score.full,
        spread_before=spread_before,
        spread_after=spread_after,
        iou=float(np.mean(ious)) if ious else None,
        background=score.background,
        background_iou=float(np.mean(background_ious)) if background_ious else None,
    )


def summarise(rows: list[_Row]) -> list[dict[str, Any]]:
    table = []
    for method in dict.fromkeys(r.method for r in rows):
        for scale in dict.fromkeys(r.scale for r in rows if r.method == method):
            group = [r for r in rows if r.method == method and r.scale == scale]
            relations = [r.relation for r in group if r.relation is not None]
            ious = [r.iou for r in group if r.iou is not None]
            backgrounds = [r.background for r in group if r.background is not None]
            background_ious = [r.background_iou for r in group if r.background_iou is not None]
            entry = {
                "method": method,
                "scale": scale,
                "images": len(group),
                "color": np.mean([r.color for r in group]),
                "shape": np.mean([r.shape for r in group]),
                "size": np.mean([r.size for r in group]),
                "relation": np.mean(relations) if relations else float("nan"),
                "count": np.mean([r.count_ok for r in group]),
                "full": np.mean([r.full for r in group]),
                "full_1obj": np.mean([r.full for r in group if r.objects == 1] or [np.nan]),
                "full_2obj": np.mean([r.full for r in group if r.objects == 2] or [np.nan]),
                "full_3obj": np.mean([r.full for r in group if r.objects == 3] or [np.nan]),
                "spread_before": np.mean([r.spread_before for r in group]),
                "spread_after": np.mean([r.spread_after for r in group]),
                "region_iou": np.mean(ious) if ious else float("nan"),
                "background": np.mean(backgrounds) if backgrounds else float("nan"),
                "background_iou": np.mean(background_ious) if background_ious else float("nan"),
            }
            table.append({k: float(v) if isinstance(v, np.floating | float) else v for k, v in entry.items()})
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    columns = [
        "method",
        "scale",
        "images",
        "color",
        "shape",
        "size",
        "relation",
        "count",
        "full",
        "full_1obj",
        "full_2obj",
        "full_3obj",
        "spread_before",
        "spread_after",
        "region_iou",
    ]
    if any(not np.isnan(row.get("background", float("nan"))) for row in table):  # the `scenes` domain
        columns += ["background", "background_iou"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [
            f"{row[c]:.3f}"
            if isinstance(row[c], float) and c != "scale"
            else f"{row[c]:g}"
            if isinstance(row[c], float)
            else str(row[c])
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sample_grid(samples: dict[tuple[str, float], list[np.ndarray]]):
    from PIL import Image, ImageDraw

    keys = list(samples)
    width = max(len(v) for v in samples.values())
    tile = 64
    canvas = Image.new("RGB", (140 + width * (tile + 2), len(keys) * (tile + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, key in enumerate(keys):
        draw.text((4, row * (tile + 2) + tile // 2 - 6), f"{key[0]} g={key[1]:g}", fill="black")
        for col, image in enumerate(samples[key]):
            canvas.paste(Image.fromarray(image).resize((tile, tile)), (140 + col * (tile + 2), row * (tile + 2)))
    return canvas
