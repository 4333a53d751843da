"""The demo domain's fidelity metric: a Fréchet distance of features from a small network trained on rendered
scenes (the domain's FID), between generated images and renderings of the same captions.

    python -m scfg.demo.fidelity --train OUT [--steps 3000] [--threads 2]   # train the network (minutes on a CPU)

- `render_caption(caption, rng)`: a rendering of a demo caption with its objects placed at random so that its
  relation holds: one draw from the distribution a caption stands for (the reference images).
- `FeatureNet`: four strided 3x3 conv stages on a 64x64 image, mean- and max-pooled to `features` numbers. It is
  trained to name each (colour, shape) object in the image, the background, and where each colour is on a 4x4 grid,
  so the features carry what the scorer reads and where it is; the augmentation (blur, noise) keeps them from
  telling a sharp rendering from a slightly soft generated image by sharpness alone. Inception features (FID) know
  nothing of these images; this network is the domain's own feature space.
- `frechet_distance(a, b)`: `|mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½)` of two feature sets, as torchmetrics'
  `FrechetInceptionDistance` computes it (a test checks the two agree), but on features already computed, so that
  bootstrap resamples cost no network passes.

The shipped weights (`scfg/demo/fidelity/`) are loaded by `load_feature_net()`; `card.json` beside them records the
training command and the held-out accuracies of the heads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneObject,
    place_objects,
    relation_between,
    render,
    sample_scene,
    shape_mask,
)
from .score import parse_caption, split_background

__all__ = ["FeatureNet", "features", "frechet_distance", "load_feature_net", "render_caption", "scene_labels"]

SHIPPED = Path(__file__).parent / "fidelity"
_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_BACKGROUND_CLASSES = ("white", *BACKGROUNDS)
_CELLS = 4  # the colour-position head's grid
_POSITIVE_WEIGHT = 4.0  # the multi-hot heads' positives against their many negatives (`_loss`)


def render_caption(caption: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """`[size, size, 3]` uint8: the caption's objects (its size words; a random size where it names none) at
    random places where its relation holds, on its background (white when it names none)."""
    requested, relation = parse_caption(caption)
    background = split_background(caption)[1]
    for _ in range(1000):
        sizes = [obj.size or str(rng.choice(list(SIZES))) for obj in requested]
        extents = [int(rng.integers(SIZES[s][0], SIZES[s][1] + 1)) for s in sizes]
        centers = place_objects(rng, extents, size)
        if centers is None:
            continue
        objects = [
            SceneObject(obj.shape, obj.color, s, c, e, shape_mask(obj.shape, c, e, size))
            for obj, s, c, e in zip(requested, sizes, centers, extents, strict=True)
        ]
        if relation is None or relation_between(objects[0], objects[1]) == relation:
            return render(objects, size, background, rng)
    raise ValueError(f"Expected a caption whose objects fit a {size}x{size} image, but could not place {caption!r}.")


def scene_labels(objects: list[SceneObject], background: str | None) -> np.ndarray:
    """The training targets of one scene: (colour, shape) objects present, the background class, and for each
    colour the 4x4 cells its pixels touch (multi-hot, then one-hot, then multi-hot)."""
    pairs = np.zeros(len(_PAIRS), np.float32)
    cells = np.zeros((len(COLORS), _CELLS, _CELLS), np.float32)
    colors = list(COLORS)
    for obj in objects:
        pairs[_PAIRS.index((obj.color, obj.shape))] = 1
        size = obj.mask.shape[0]
        touched = obj.mask.reshape(_CELLS, size // _CELLS, _CELLS, size // _CELLS).any(axis=(1, 3))
        cells[colors.index(obj.color)] = np.maximum(cells[colors.index(obj.color)], touched)
    klass = np.zeros(len(_BACKGROUND_CLASSES), np.float32)
    klass[_BACKGROUND_CLASSES.index(background or "white")] = 1
    return np.concatenate([pairs, klass, cells.ravel()])


class FeatureNet(nn.Module):
    """uint8 images `[N, 3, H, W]` (any size; resized to 64x64) to `[N, features]`; `heads` maps features to the
    training targets' logits (`scene_labels`)."""

    def __init__(self, width: int = 32, features: int = 64, pool: str = "mean_max") -> None:
        super().__init__()
        if pool not in ("mean", "mean_max"):
            raise ValueError(f"Expected pool 'mean' or 'mean_max', but got {pool!r}.")
        if pool == "mean_max" and features % 2:
            raise ValueError(f"Expected an even number of features for pool='mean_max', but got {features}.")
        self.pool = pool
        channels = [3, width, 2 * width, 4 * width, features // 2 if pool == "mean_max" else features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(channels)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.Linear(features, len(_PAIRS) + len(_BACKGROUND_CLASSES) + len(COLORS) * _CELLS**2)
        self.config = {"width": width, "features": features, "pool": pool}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (64, 64):
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        x = self.body(x)
        if self.pool == "mean":
            return x.mean(dim=(-2, -1))
        # the mean carries the background, the max a small object that the mean of an 8x8 map dilutes
        return torch.cat([x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))], dim=1)


def load_feature_net(folder: str | Path = SHIPPED) -> FeatureNet:
    """The trained network from `folder` (default: the one shipped with the package), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "feature_net.safetensors").exists():
        raise FileNotFoundError(
            f"Expected the fidelity network's weights in {folder}/feature_net.safetensors; train them with "
            f"`python -m scfg.demo.fidelity --train {folder}`."
        )
    config = json.loads((folder / "config.json").read_text())
    net = FeatureNet(**config)
    net.load_state_dict(load_file(folder / "feature_net.safetensors"))
    return net.eval()


@torch.no_grad()
def features(net: FeatureNet, images: np.ndarray | torch.Tensor, batch: int = 256) -> torch.Tensor:
    """float64 `[N, features]` of uint8 images, `[N, H, W, 3]` (numpy, as the pipelines' output) or `[N, 3, H, W]`."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return torch.cat([net(images[i : i + batch]) for i in range(0, len(images), batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance of Gaussians fitted to feature sets `a` `[N, D]` and `b` `[M, D]` (float64).
    `tr (S_a S_b)^½` is the sum of the square roots of the eigenvalues of `S_a S_b`, which are real and >= 0 (the
    product of two positive semi-definite matrices is similar to a PSD one); rounding can leave tiny imaginary parts
    and negative values, which are dropped."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # 0-D for 1 feature
    root = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root)


# -- training -----------------------------------------------------------------------------------------------------


def _sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training image and its labels: half of them white `shapes` scenes, half textured `scenes`."""
    scene = sample_scene(rng, backgrounds=BACKGROUNDS if rng.random() < 0.5 else None)
    return scene.image, scene_labels(scene.objects, scene.background)


def _dataset(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, labels = zip(*(_sample(rng) for _ in range(count)), strict=True)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(labels))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a Gaussian blur of sigma in [0, 1] px and noise of sigma in [0, 8] levels (generated images are a
    little soft and noisy; the features should not separate them from renderings by that alone)."""
    x = images.float()
    sigma = torch.rand(len(x), generator=generator)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(3, 0)  # [3N, 5]
    flat = x.reshape(1, -1, *x.shape[-2:])
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=flat.shape[1])
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="reflect"), kernel[:, None, :, None], groups=flat.shape[1])
    noise = torch.randn(x.shape, generator=generator) * torch.rand(len(x), 1, 1, 1, generator=generator) * 8
    return (flat.reshape(x.shape) + noise).clamp(0, 255).round().to(torch.uint8)


def _loss(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = net.heads(net(images))
    pairs, klass = len(_PAIRS), len(_BACKGROUND_CLASSES)
    multi = torch.cat([logits[:, :pairs], logits[:, pairs + klass :]], dim=1)
    multi_target = torch.cat([labels[:, :pairs], labels[:, pairs + klass :]], dim=1)
    background = F.cross_entropy(logits[:, pairs : pairs + klass], labels[:, pairs : pairs + klass].argmax(1))
    # 1-3 of the 18 pairs and a few of the 96 cells are positive: without the weight the heads learn "absent"
    positive = torch.full((multi.shape[1],), _POSITIVE_WEIGHT)
    return F.binary_cross_entropy_with_logits(multi, multi_target, pos_weight=positive) + background


@torch.no_grad()
def held_out_accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Exact-set accuracy of the objects head, accuracy of the background head, cell accuracy of the position head."""
    logits = net.heads(net(images))
    pairs, klass = len(_PAIRS), len(_BACKGROUND_CLASSES)
    objects = ((logits[:, :pairs] > 0) == (labels[:, :pairs] > 0.5)).all(1).float().mean()
    background = (logits[:, pairs : pairs + klass].argmax(1) == labels[:, pairs : pairs + klass].argmax(1)).float()
    cells = ((logits[:, pairs + klass :] > 0) == (labels[:, pairs + klass :] > 0.5)).float().mean()
    return {"objects_exact": float(objects), "background": float(background.mean()), "cells": float(cells)}


def train(
    out: str | Path, steps: int = 3000, batch: int = 64, images: int = 12000, seed: int = 0, held_out: int = 1000
) -> dict:
    """Train a `FeatureNet` on `images` rendered scenes (both domains) and save it to `out` with its card (the heads'
    accuracies on `held_out` other scenes)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    started = time.time()
    train_images, train_labels = _dataset(images, seed)
    test_images, test_labels = _dataset(held_out, seed + 1)
    net = FeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, images, (batch,), generator=generator)
        loss = _loss(net, _augment(train_images[index], generator), train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    net.eval()
    card = {
        "command": f"python -m scfg.demo.fidelity --train OUT --steps {steps} --batch {batch} --images {images}",
        "seed": seed,
        "held_out": held_out_accuracy(net, test_images, test_labels),
        "held_out_augmented": held_out_accuracy(net, _augment(test_images, generator), test_labels),
        "seconds": round(time.time() - started),
        "relations": list(RELATIONS),
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), folder / "feature_net.safetensors")
    (folder / "config.json").write_text(json.dumps(net.config, indent=1) + "\n")
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, metavar="OUT", help="folder for the weights, config and card")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=12000, help="rendered training images")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(train(args.train, args.steps, args.batch, args.images), indent=1))


if __name__ == "__main__":
    main()
