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

The paper's protocol, on a domain where everything is known:
- fidelity: `fd`, the Fréchet distance of the generated images' features to those of renderings of the same
  captions, in the feature space of a small network trained on rendered scenes (`scfg.demo.fidelity`: the domain's
  FID);
- alignment: the exact scorer's full-prompt accuracy and its T2I-CompBench-style categories: colour binding
  (`color`), shape binding (`shape`: colour and shape right), texture/background (`background`), spatial relation
  (`relation`);
- 95% bootstrap intervals over captions (`*_ci`), resampled the same way for every method, and `full_vs_cfg`, the
  paired difference to CFG at the same scale; for `fd` and `fd_vs_cfg` (paired) the jackknife's over captions (a
  bootstrap resample's duplicates bias a Fréchet distance upwards);
- `effective_scale`: the mean `g · rate` S-CFG applied, and `full_vs_cfg_matched`: the paired difference to CFG's
  accuracy at that scale (interpolated between the CFG scales around it), methods compared at matched strength;
- `curves.png`: accuracy against `fd` and against the effective scale, one point per scale;
- the ablations of `official` in `METHODS`: the whole-image benchmark (`scfg-mean`), the completion
  (`scfg-no-completion`, `scfg-power-mean`), word tokens only (`scfg-words`), no clamps (`scfg-no-clamp`).
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
from ..eval.methods import METHODS
from ..integration import enable
from . import DemoDomain
from .data import sample_scene
from .fidelity import features, frechet_distance, load_feature_net, render_caption
from .score import object_pixels, parse_caption, score_image, split_background

__all__ = ["METHODS", "held_out_prompts", "run_benchmark"]


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
    effective_scale: float | None = None  # g x the mean rate S-CFG applied, over the image and the steps
    job: int = -1  # index into the (prompt, seed) jobs: the same noise for every method and scale


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
    methods: tuple[str, ...] = ("cfg", "scfg-official", "scfg-paper"),
    steps: int = 25,
    batch_size: int = 16,
    out: str | None = None,
    domain: DemoDomain | None = None,
    fidelity: Any = "shipped",
    resamples: int = 1000,
) -> dict[str, Any]:
    """Run the benchmark; return the per-image rows and the aggregated table (also written to `out`, with
    `curves.png`). `domain` (`scfg.demo.demo_domain(folder)`) sets the captions' backgrounds and S-CFG's `levels`;
    None: the `shapes` domain with each config's own levels. `fidelity`: the feature network of the Fréchet distance
    (`scfg.demo.fidelity`; "shipped" loads the package's, None skips the distance). `resamples`: bootstrap
    resamples of the captions for the 95% intervals (0: none)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Expected methods among {sorted(METHODS)}, but got {unknown}.")
    if out is not None:
        try:
            import matplotlib  # noqa: F401  (curves.png; checked before the long run, not after it)
        except ImportError as err:
            raise ImportError(
                "Expected matplotlib for the benchmark's curves.png: `pip install 'semantic-cfg[eval]'`."
            ) from err
    prompts = held_out_prompts(num_prompts, backgrounds=None if domain is None else domain.backgrounds)
    configs = {
        m: METHODS[m] if domain is None else dataclasses.replace(METHODS[m], levels=domain.levels) for m in methods
    }
    jobs = [(p, 1000 + i * seeds_per_prompt + k) for i, p in enumerate(prompts) for k in range(seeds_per_prompt)]
    net = load_feature_net() if isinstance(fidelity, str) and fidelity == "shipped" else fidelity
    fake: dict[tuple[str, float], list[torch.Tensor]] = {}
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
                if net is not None:
                    fake.setdefault((method, scale), []).append(features(net, images))
                late = reports[int(len(reports) * 0.8) :]
                for i, ((prompt, seed), image) in enumerate(zip(chunk, images, strict=True)):
                    positions = _object_token_positions(prompt, pipe.tokenizer)
                    row = _score_one(method, scale, prompt, seed, image, reports, late, i, positions)
                    rows.append(dataclasses.replace(row, job=start + i))
    fidelity_features = None
    if net is not None:
        size = samples[(methods[0], scales[0])][0].shape[:2]
        # the reference: one rendering per job of its caption on the domain's 64x64 canvas, its layout drawn from the
        # job's seed, resized (area) to the generated images' size so that both reach the network at one resolution
        reference = np.stack([_resized(render_caption(p, np.random.default_rng(seed)), size) for p, seed in jobs])
        fidelity_features = (features(net, reference), {key: torch.cat(v) for key, v in fake.items()})
    table = summarise(rows, fidelity_features, resamples)
    result = {
        "prompts": prompts,
        "seeds_per_prompt": seeds_per_prompt,
        "scales": list(scales),
        "steps": steps,
        "resamples": resamples,
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
        plot_curves(table, folder / "curves.png")
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


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BOX))


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
        effective_scale=float(np.mean([r.guidance_scale * float(r.rate_map[i].mean()) for r in reports]))
        if reports
        else None,
    )


# the statistics that get a bootstrap interval: per-image fields averaged over the images that have them
_INTERVALS = ("full", "color", "shape", "background", "relation")


def _per_prompt(group: list[_Row], prompts: list[str], field: str) -> tuple[np.ndarray, np.ndarray]:
    """Per caption: the sum of `field` over its images that have a value, and how many do."""
    sums, counts = np.zeros(len(prompts)), np.zeros(len(prompts))
    index = {p: k for k, p in enumerate(prompts)}
    for r in group:
        value = getattr(r, field)
        if value is not None:
            sums[index[r.prompt]] += float(value)
            counts[index[r.prompt]] += 1
    return sums, counts


def _interval(values: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap values (NaN where a resample had no image with the field)."""
    values = values[np.isfinite(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else [np.nan] * 2


def _leave_one_out_fd(
    generated: torch.Tensor, reference: torch.Tensor, jobs_of: dict[str, list[int]], prompts: list[str]
) -> np.ndarray | None:
    """The Fréchet distance with each caption's images (generated and reference) left out in turn, or None where a
    left-out set would have no more images than features (singular covariances) or there are fewer than 3 captions.

    Why not the bootstrap used for the accuracies: a resample keeps about 63% of the images distinct, and a Fréchet
    distance from fewer distinct images is biased upwards (by about the traces of the covariances over n), so the
    resampled distances sit well above the estimate and their percentile interval misses it (144 images of 64
    features: estimate 13.4, percentile interval [17.0, 27.4]). A left-out set has no duplicates and nearly all the
    images, so its bias is the estimate's own."""
    largest = max(len(jobs_of[p]) for p in prompts)
    if len(prompts) < 3 or len(generated) - largest <= generated.shape[1]:
        return None
    everything = np.arange(len(generated))
    values = []
    for p in prompts:
        keep = np.setdiff1d(everything, jobs_of[p])
        values.append(frechet_distance(generated[keep], reference[keep]))
    return np.array(values)


def _jackknife_interval(estimate: float, leave_out: np.ndarray) -> list[float]:
    """`estimate ± 1.96 se`, with the jackknife's standard error over `n` left-out values: `se² = (n-1)/n Σ (v_i -
    mean v)²` (Efron & Stein: in expectation at least the statistic's variance, so the interval errs wide)."""
    n = len(leave_out)
    se = float(np.sqrt((n - 1) / n * np.square(leave_out - leave_out.mean()).sum()))
    return [estimate - 1.96 * se, estimate + 1.96 * se]


def summarise(
    rows: list[_Row],
    fidelity: tuple[torch.Tensor, dict[tuple[str, float], torch.Tensor]] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One entry per (method, scale). Intervals: the captions are resampled with replacement (`resamples` times,
    every image of a drawn caption kept), the same draws for every method and scale, so that differences between
    methods are paired; `full_vs_cfg` is the interval of the full-accuracy difference to CFG at the same scale.
    `fidelity`: the reference's and each group's generated images' features (in job order), for `fd`; its interval
    and that of `fd_vs_cfg` (paired, the same caption left out on both sides) are the jackknife's over captions
    (`_leave_one_out_fd`)."""
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    draws = np.random.default_rng(seed).integers(0, len(prompts), (resamples, len(prompts)))
    jobs_of = {p: sorted({r.job for r in rows if r.prompt == p}) for p in prompts}
    boot_full: dict[tuple[str, float], np.ndarray] = {}
    jack_fd: dict[tuple[str, float], np.ndarray] = {}
    table = []
    for method in dict.fromkeys(r.method for r in rows):
        for scale in dict.fromkeys(r.scale for r in rows if r.method == method):
            group = [r for r in rows if r.method == method and r.scale == scale]
            relations = [r.relation for r in group if r.relation is not None]
            ious = [r.iou for r in group if r.iou is not None]
            backgrounds = [r.background for r in group if r.background is not None]
            background_ious = [r.background_iou for r in group if r.background_iou is not None]
            scales = [r.effective_scale for r in group if r.effective_scale is not None]
            entry: dict[str, Any] = {
                "method": method,
                "scale": scale,
                "images": len(group),
                "effective_scale": np.mean(scales) if scales else float("nan"),
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
            if resamples:
                for field in _INTERVALS:
                    sums, counts = _per_prompt(group, prompts, field)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        values = sums[draws].sum(1) / counts[draws].sum(1)
                    entry[f"{field}_ci"] = _interval(values)
                    if field == "full":
                        boot_full[(method, scale)] = values
            if fidelity is not None:
                reference, fake = fidelity
                generated = fake[(method, scale)]
                entry["fd"] = frechet_distance(generated, reference)
                leave_out = _leave_one_out_fd(generated, reference, jobs_of, prompts) if resamples else None
                if leave_out is not None:
                    jack_fd[(method, scale)] = leave_out
                    entry["fd_ci"] = _jackknife_interval(entry["fd"], leave_out)
            table.append({k: float(v) if isinstance(v, np.floating | float) else v for k, v in entry.items()})
    cfg_full = {row["scale"]: row["full"] for row in table if row["method"] == "cfg"}
    cfg_fd = {row["scale"]: row["fd"] for row in table if row["method"] == "cfg" and "fd" in row}
    cfg_scales = sorted(cfg_full)
    for row in table:
        if row["method"] == "cfg":
            continue
        if row["scale"] in cfg_full:
            row["full_vs_cfg"] = row["full"] - cfg_full[row["scale"]]
            if "fd" in row and row["scale"] in cfg_fd:
                row["fd_vs_cfg"] = row["fd"] - cfg_fd[row["scale"]]
                key, cfg_key = (row["method"], row["scale"]), ("cfg", row["scale"])
                if key in jack_fd and cfg_key in jack_fd:  # paired: the same caption left out on both sides
                    row["fd_vs_cfg_ci"] = _jackknife_interval(row["fd_vs_cfg"], jack_fd[key] - jack_fd[cfg_key])
            if resamples:
                row["full_vs_cfg_ci"] = _interval(
                    boot_full[(row["method"], row["scale"])] - boot_full[("cfg", row["scale"])]
                )
        # at matched strength: the difference to CFG's accuracy at the scale S-CFG applied on average, linear in g
        # between the two CFG scales around it (only inside the range of two or more CFG scales), the same draws on
        # both sides; the interval takes the effective scale as measured (it is not redrawn per resample)
        effective = row["effective_scale"]
        if len(cfg_scales) >= 2 and cfg_scales[0] <= effective <= cfg_scales[-1]:
            upper = min(int(np.searchsorted(cfg_scales, effective)), len(cfg_scales) - 1)
            low, high = cfg_scales[max(upper - 1, 0)], cfg_scales[max(upper, 1)]
            weight = (effective - low) / (high - low)
            row["full_vs_cfg_matched"] = row["full"] - ((1 - weight) * cfg_full[low] + weight * cfg_full[high])
            if resamples:
                at = (1 - weight) * boot_full[("cfg", low)] + weight * boot_full[("cfg", high)]
                row["full_vs_cfg_matched_ci"] = _interval(boot_full[(row["method"], row["scale"])] - at)
    return table


_COLUMNS = (
    "method",
    "scale",
    "effective_scale",
    "images",
    "fd",
    "fd_vs_cfg",
    "full",
    "full_vs_cfg",
    "full_vs_cfg_matched",
    "color",
    "shape",
    "size",
    "relation",
    "count",
    "full_1obj",
    "full_2obj",
    "full_3obj",
    "spread_before",
    "spread_after",
    "region_iou",
)


def format_table(table: list[dict[str, Any]]) -> str:
    """Markdown; a statistic with an interval reads `value [low, high]`."""
    columns = [c for c in _COLUMNS if any(c in row for row in table)]
    if any(not np.isnan(row.get("background", float("nan"))) for row in table):  # the `scenes` domain
        columns += ["background", "background_iou"]

    def cell(row: dict[str, Any], c: str) -> str:
        value = row.get(c)
        if value is None:
            return "-"
        if not isinstance(value, float):
            return str(value)
        if c == "scale":
            return f"{value:g}"
        text = f"{value:+.3f}" if "_vs_cfg" in c else f"{value:.3f}"
        interval = row.get(f"{c}_ci")
        return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def plot_curves(table: list[dict[str, Any]], path: str | Path) -> None:
    """Fidelity-alignment curves: per method, one point per guidance scale, full-prompt accuracy against the
    Fréchet distance (left; where the table has one) and against the mean effective scale S-CFG applied (right: the
    methods compared at matched effective scale), each with its 95% intervals over captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_fd = any("fd" in row for row in table)
    fig, axes = plt.subplots(1, 2 if has_fd else 1, figsize=(11 if has_fd else 5.5, 4.2), squeeze=False)
    panels = (["fd"] if has_fd else []) + ["effective_scale"]
    labels = {
        "fd": "Fréchet distance (domain features; lower is closer to renderings)",
        "effective_scale": "mean effective scale g·rate",
    }
    for ax, x_key in zip(axes[0], panels, strict=True):
        for method in dict.fromkeys(row["method"] for row in table):
            points = sorted((row for row in table if row["method"] == method), key=lambda row: row["scale"])
            x = np.array([row[x_key] for row in points])
            y = np.array([row["full"] for row in points])
            y_ci = np.array([row.get("full_ci", [v, v]) for row, v in zip(points, y, strict=True)])
            x_ci = np.array([row.get(f"{x_key}_ci", [v, v]) for row, v in zip(points, x, strict=True)])
            ax.errorbar(
                x,
                y,
                yerr=np.abs(y_ci.T - y),
                xerr=np.abs(x_ci.T - x),
                marker="o",
                capsize=2,
                label=method,
            )
            for row, xi, yi in zip(points, x, y, strict=True):
                ax.annotate(f"{row['scale']:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(labels[x_key])
        ax.set_ylabel("full-prompt accuracy (exact scorer)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("CFG vs S-CFG over guidance scales (labels: g); bars: 95% intervals over captions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
