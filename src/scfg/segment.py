"""Training-free semantic segmentation from attention maps (docs/algorithm.md section 2, steps 1-5).

Pure tensor functions: no diffusers, no transformers, no state. Shapes use `B` (batch), `Q` (image queries of one
attention grid, `h * w`), `T` (text tokens), `(h, w)` (the mask grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "assign_regions",
    "average_layer_maps",
    "complete_cross_attention",
    "foreground_mask",
    "gaussian_kernel",
    "layer_maps",
    "smooth",
    "upsample_masks",
]

_EPS = 1e-8


def complete_cross_attention(
    cross_probs: torch.Tensor,
    self_probs: torch.Tensor | None,
    completion: Literal["official", "power_mean", "none"] = "official",
    order: int = 4,
) -> torch.Tensor:
    """Complete cross-attention with self-attention: `C' = S' C` (step 2a).

    `"official"` uses `S' = (S + 3 S²) / 4`, what the released code computes (it meant the mean of `S¹..S⁴`);
    `"power_mean"` uses `S' = (1/R) Σ_{r=1..R} Sʳ` (the paper's text); `"none"` returns `C`. Rows of `S'` still sum
    to 1. `S'` is never formed: `Sʳ C` is built as `S (S^{r-1} C)`, which costs `Q² T` instead of `Q³`.

    Args:
        cross_probs (`torch.Tensor`): `[B, Q, T]` cross-attention probabilities (image queries to text tokens).
        self_probs (`torch.Tensor`): `[B, Q, Q]` self-attention probabilities of the same grid.
        completion (`str`, defaults to `"official"`): which completion.
        order (`int`, defaults to `4`): `R` of the power mean.

    Returns:
        `torch.Tensor`: `[B, Q, T]` completed cross-attention.

    >>> s = torch.full((1, 4, 4), 0.25); c = torch.rand(1, 4, 3)
    >>> torch.allclose(complete_cross_attention(c, s), c.mean(1, keepdim=True).expand(1, 4, 3))
    True
    """
    if completion == "none" or self_probs is None:
        return cross_probs
    first = torch.bmm(self_probs, cross_probs)
    if completion == "official":
        return (first + 3 * torch.bmm(self_probs, first)) / 4
    total, power = first, first
    for _ in range(order - 1):
        power = torch.bmm(self_probs, power)
        total = total + power
    return total / order


def gaussian_kernel(sigma: float, size: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the normalised 1-D kernel `exp(-(d / (2 sigma))²)` of the released code.

    Note the formula: `sigma = 0.5` gives weights `[0.2119, 0.5761, 0.2119]`, an effective standard deviation of
    about 0.707.

    >>> gaussian_kernel(0.5)
    tensor([0.2119, 0.5761, 0.2119])
    """
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-((d / (2 * sigma)) ** 2))
    return (weights / weights.sum()).to(dtype)


def smooth(maps: torch.Tensor, sigma: float | None, size: int = 3) -> torch.Tensor:
    """Smooth every channel of `maps` `[B, C, h, w]` with a separable Gaussian, reflect padding (steps 2c and 7).

    A grid dimension of size 1 cannot be reflected; it is padded by replication, which is what reflection of a
    1-wide grid would mean.

    >>> x = torch.ones(1, 2, 3, 5)
    >>> torch.allclose(smooth(x, 0.5), x)
    True
    """
    if sigma is None:
        return maps
    dtype = maps.dtype
    x = maps.to(torch.promote_types(dtype, torch.float32))
    b, c, h, w = x.shape
    kernel = gaussian_kernel(sigma, size, x.dtype).to(x.device)
    pad = size // 2
    x = x.reshape(b * c, 1, h, w)
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect" if w > pad else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, size))
    x = F.pad(x, (0, 0, pad, pad), mode="reflect" if h > pad else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, size, 1))
    return x.reshape(b, c, h, w).to(dtype)


def layer_maps(
    completed: torch.Tensor,
    grid: tuple[int, int],
    mask_grid: tuple[int, int],
    smoothing: float | None = 0.5,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn one layer's completed cross-attention into normalised token and foreground maps (steps 2b-2e).

    Args:
        completed (`torch.Tensor`): `[B, Q, T]` completed cross-attention of a layer whose grid is `grid`.
        grid (`tuple[int, int]`): `(h, w)` of the layer, `h * w == Q`.
        mask_grid (`tuple[int, int]`): `(h, w)` of the mask grid; coarser maps are upsampled bilinearly.
        smoothing (`float | None`): `sigma` of the 3x3 Gaussian, or `None`.
        reference (`torch.Tensor`, *optional*): `[B]` index of the token that plays the start token's role in
            the foreground map (an attention sink); token 0 when `None` (CLIP's start token).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: token maps `[B, T, h, w]` (each divided by its spatial mean) and
        foreground maps `[B, 2, h, w]` (reference token, sum of all other tokens; each divided by its spatial
        mean).
    """
    b, _q, t = completed.shape
    # 2b. [B, Q, T] -> [B, T, h, w]; the query index runs over rows first, like the latent.
    maps = (
        completed.to(torch.promote_types(completed.dtype, torch.float32))
        .transpose(1, 2)
        .reshape(b, t, grid[0], grid[1])
    )
    if tuple(grid) != tuple(mask_grid):
        maps = F.interpolate(maps, size=mask_grid, mode="bilinear", align_corners=False)
    # 2c. smoothing, in float32 (or float64 for a float64 model).
    maps = smooth(maps, smoothing)
    # 2d. each token over its own spatial mean: attention to frequent tokens no longer wins everywhere.
    token = maps / (maps.mean(dim=(2, 3), keepdim=True) + _EPS)
    # 2e. start token (or the family's reference token) vs everything else.
    if reference is None:
        fg = torch.stack([maps[:, 0], maps[:, 1:].sum(dim=1)], dim=1)
    else:
        ref = maps[torch.arange(b, device=maps.device), reference.to(maps.device)]
        fg = torch.stack([ref, maps.sum(dim=1) - ref], dim=1)
    # The released code has no epsilon here. With it, the exact tie of uniform attention (e.g. SDXL's all-zero
    # negative embeddings: every token's map is the same) goes to foreground deterministically instead of being
    # decided by rounding; elsewhere it changes values by ~1e-8 relative. An all-zero channel stays zero.
    fg = fg / (fg.mean(dim=(2, 3), keepdim=True) + _EPS)
    return token, fg


def average_layer_maps(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]],
    mask_grid: tuple[int, int],
    completion: Literal["official", "power_mean", "none"] = "official",
    order: int = 4,
    smoothing: float | None = 0.5,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete, map and average every layer; each layer counts once (steps 2-3).

    Args:
        layers: `(cross_probs [B, Q, T], self_probs [B, Q, Q] or None, (h, w))` per layer.
        mask_grid: `(h, w)` of the finest grid used.
        reference: see `layer_maps`.

    Returns:
        token maps `[B, T, h, w]` and foreground maps `[B, 2, h, w]`, averaged over layers.
    """
    token_total: torch.Tensor | None = None
    fg_total: torch.Tensor | None = None
    for cross_probs, self_probs, grid in layers:
        completed = complete_cross_attention(cross_probs, self_probs, completion, order)
        token, fg = layer_maps(completed, grid, mask_grid, smoothing, reference)
        token_total = token if token_total is None else token_total + token
        fg_total = fg if fg_total is None else fg_total + fg
    if token_total is None or fg_total is None:
        raise ValueError("Expected at least one attention layer, but got none.")
    return token_total / len(layers), fg_total / len(layers)


def assign_regions(
    token_maps: torch.Tensor,
    allowed: torch.Tensor | None = None,
    tie_break: Literal["multi_hot", "first"] = "multi_hot",
) -> torch.Tensor:
    """Give every pixel to the token with the largest map value (step 4).

    Args:
        token_maps (`torch.Tensor`): `[B, T, h, w]` layer-averaged, normalised token maps.
        allowed (`torch.Tensor`, *optional*): `[B, T]` bool, the tokens that may own regions; all when `None`.
        tie_break (`str`): `"multi_hot"` puts a tied pixel in every tied region (the released code);
            `"first"` gives it to the lowest token index.

    Returns:
        `torch.Tensor`: `[B, T, h, w]` masks of 0/1 in the dtype of `token_maps`.

    >>> m = assign_regions(torch.tensor([[[[1.0, 2.0]], [[3.0, 2.0]]]]))
    >>> m[0, :, 0].tolist()
    [[0.0, 1.0], [1.0, 1.0]]
    """
    maps = token_maps
    if allowed is not None:
        maps = maps.masked_fill(~allowed[:, :, None, None], -math.inf)
    if tie_break == "first":
        index = maps.argmax(dim=1, keepdim=True)
        return torch.zeros_like(token_maps).scatter_(1, index, 1.0)
    best = maps.amax(dim=1, keepdim=True)
    return (maps == best).to(token_maps.dtype)


def foreground_mask(foreground_maps: torch.Tensor) -> torch.Tensor:
    """Return `[B, 1, h, w]` 0/1: pixels where the not-start-token channel is strictly larger (step 4).

    >>> foreground_mask(torch.tensor([[[[2.0, 0.5]], [[1.0, 1.5]]]])).tolist()
    [[[[0.0, 1.0]]]]
    """
    return (foreground_maps[:, 1:2] > foreground_maps[:, 0:1]).to(foreground_maps.dtype)


def upsample_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of `[B, C, h, w]` masks to the latent `size` (step 5)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode="nearest")
