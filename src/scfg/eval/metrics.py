"""FID and CLIP score with torchmetrics; weights are local paths so everything runs offline.

- FID: `torchmetrics.image.fid.FrechetInceptionDistance`, either with Inception weights you provide
  (`feature_extractor_weights_path`, the torch-fidelity `pt_inception-2015-12-05` file) or any `nn.Module` that maps
  uint8 images `[N, 3, H, W]` to features `[N, D]`. The reference is a folder of images or an `.npz` with `mu` and
  `sigma` computed with the same extractor (`reference_stats`).
- CLIP score: the cosine similarity of CLIP image and caption embeddings (torchmetrics' `CLIPScore` / 100, as in
  the paper's tables), with a local `transformers` CLIP folder.
- On the demo domain (`demo_metrics`), where both are known without outside weights: the domain's FID (`fd`, the
  Fréchet distance in the features of the network shipped in `scfg.demo.fidelity`, to renderings of the same
  captions) and its CLIP score (the exact scorer `scfg.demo.score`: full-prompt accuracy and its categories).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["clip_scores", "demo_metrics", "fid", "load_images", "reference_stats"]

_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_images(paths: Sequence[str | Path], size: int | None = None) -> torch.Tensor:
    """uint8 `[N, 3, H, W]`; images are resized to `size` x `size` when given (FID needs one size)."""
    arrays = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _image_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in _SUFFIXES)


def _fid_metric(feature: int | torch.nn.Module, weights: str | None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    kwargs: dict[str, Any] = {"reset_real_features": False}
    if weights is not None:
        kwargs["feature_extractor_weights_path"] = weights
    return FrechetInceptionDistance(feature=feature, **kwargs)


def _mean_cov(metric, real: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the features a torchmetrics FID has accumulated (float64)."""
    prefix = "real" if real else "fake"
    n = getattr(metric, f"{prefix}_features_num_samples")
    mu = (getattr(metric, f"{prefix}_features_sum") / n).double()
    cov = (getattr(metric, f"{prefix}_features_cov_sum") - n * torch.outer(mu, mu)) / (n - 1)
    return mu, cov


def _batches(paths: Sequence[Path], batch: int, size: int | None):
    for start in range(0, len(paths), batch):
        yield load_images(paths[start : start + batch], size)


def reference_stats(
    folder: str | Path,
    out: str | Path,
    feature: int | torch.nn.Module = 2048,
    weights: str | None = None,
    size: int | None = 299,
    batch: int = 32,
) -> None:
    """Save `mu` and `sigma` of the reference images' features to `out` (.npz)."""
    metric = _fid_metric(feature, weights)
    for images in _batches(_image_files(folder), batch, size):
        metric.update(images, real=True)
    mu, cov = _mean_cov(metric, real=True)
    np.savez(out, mu=mu.numpy(), sigma=cov.numpy())


def fid(
    fake: Sequence[str | Path],
    reference: str | Path,
    feature: int | torch.nn.Module = 2048,
    weights: str | None = None,
    size: int | None = 299,
    batch: int = 32,
) -> float:
    """FID of the images `fake` against a reference folder or `.npz` statistics."""
    from torchmetrics.image.fid import _compute_fid

    metric = _fid_metric(feature, weights)
    for images in _batches([Path(p) for p in fake], batch, size):
        metric.update(images, real=False)
    mu_fake, cov_fake = _mean_cov(metric, real=False)
    if str(reference).endswith(".npz"):
        stats = np.load(reference)
        mu_real, cov_real = torch.from_numpy(stats["mu"]), torch.from_numpy(stats["sigma"])
    else:
        for images in _batches(_image_files(reference), batch, size):
            metric.update(images, real=True)
        mu_real, cov_real = _mean_cov(metric, real=True)
    return float(_compute_fid(mu_real, cov_real, mu_fake, cov_fake))


def clip_scores(paths: Sequence[str | Path], prompts: Sequence[str], model: str, batch: int = 16) -> list[float]:
    """Per-image CLIP score: `max(cos(image, caption), 0)` with a local `transformers` CLIP model, the same
    quantity as torchmetrics' `CLIPScore` / 100 (the paper's tables use this scale)."""
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(model).eval()
    processor = CLIPProcessor.from_pretrained(model)
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch]]
            inputs = processor(
                text=list(prompts[start : start + batch]),
                images=images,
                return_tensors="pt",
                padding=True,
                truncation=True,
            )
            image_emb = clip.get_image_features(pixel_values=inputs["pixel_values"])
            text_emb = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            image_emb = getattr(image_emb, "pooler_output", image_emb)
            text_emb = getattr(text_emb, "pooler_output", text_emb)
            cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
            scores.extend(cos.clamp_min(0).tolist())
    return scores


def demo_metrics(paths: Sequence[str | Path], prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, float]:
    """The demo domain's fidelity and alignment of generated images of its captions (`builtin:compositional` on a
    demo model): `fd`, the Fréchet distance of their features to those of one rendering per image of its caption,
    laid out from the image's seed (`scfg.demo.fidelity`), and the exact scorer's means over the images: `full`
    (everything right), `color`, `shape` (colour and shape right), `background` and `relation` (over the captions
    that name one)."""
    from ..config import SCFGError
    from ..demo.fidelity import features, frechet_distance, load_feature_net, render_caption
    from ..demo.score import parse_caption, score_image

    for prompt in dict.fromkeys(prompts):
        try:
            parse_caption(prompt)
        except ValueError:
            raise SCFGError(
                f"Expected the run's captions to be the demo domain's (`--prompts builtin:compositional` on a demo "
                f"model) for `--demo-metrics`, but got {prompt!r}. Drop `--demo-metrics` for other captions."
            ) from None
    images = load_images(paths)
    if images.shape[-2:] != (64, 64):
        raise SCFGError(
            f"Expected the demo domain's 64x64 images for `--demo-metrics` (its scorer's sizes are in pixels of that "
            f"canvas), but the run's are {images.shape[-1]}x{images.shape[-2]}. Generate without --height/--width."
        )
    scores = [
        score_image(image, prompt)[0]
        for image, prompt in zip(images.permute(0, 2, 3, 1).numpy(), prompts, strict=True)
    ]
    net = load_feature_net()
    reference = np.stack(
        [render_caption(p, np.random.default_rng(seed)) for p, seed in zip(prompts, seeds, strict=True)]
    )
    generated = features(net, images)
    if len(generated) < 2 * generated.shape[1]:
        warnings.warn(
            f"fd from {len(generated)} images of {generated.shape[1]} features: the covariances are (nearly) singular "
            f"and the distance is biased upwards; use {2 * generated.shape[1]} or more images per method and scale "
            "(--limit, --images-per-prompt) to compare distances.",
            stacklevel=2,
        )
    result = {"fd": frechet_distance(generated, features(net, reference))}
    for field in ("full", "color", "shape", "background", "relation"):
        values = [float(getattr(s, field)) for s in scores if getattr(s, field) is not None]
        result[field] = float(np.mean(values)) if values else float("nan")
    return result
