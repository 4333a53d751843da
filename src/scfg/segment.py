"""Training-free semantic segmentation from attention maps (docs/algorithm.md section 2, steps 1-5).

Pure tensor functions: no diffusers, no transformers, no state. Shapes use `B` (batch), `Q` (image queries of one
attention grid, the product of the grid), `T` (text tokens) and `*grid` for a token grid of any rank: `(h, w)` for
an image, `(f, h, w)` for a video latent, whose frames are images. Spatial operations (interpolation, smoothing, the
per-map normalisations) act on the last two axes, frame by frame.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .attention import AttentionRows

__all__ = [
    "assign_regions",
    "average_layer_maps",
    "complete_cross_attention",
    "foreground_mask",
    "gaussian_kernel",
    "layer_maps",
    "smooth",
    "smooth_frames",
    "upsample_masks",
]

_EPS = 1e-8


def complete_cross_attention(
    cross_probs: torch.Tensor,
    self_probs: torch.Tensor | AttentionRows | None,
    completion: Literal["official", "power_mean", "none"] = "official",
    order: int = 4,
) -> torch.Tensor:
    """Complete cross-attention with self-attention: `C' = S' C` (step 2a).

    `"official"` uses `S' = (S + 3 S²) / 4`, what the released code computes (it meant the mean of `S¹..S⁴`);
    `"power_mean"` uses `S' = (1/R) Σ_{r=1..R} Sʳ` (the paper's text); `"none"` returns `C`. Rows of `S'` still sum
    to 1. `S'` is never formed: `Sʳ C` is built as `S (S^{r-1} C)`, which costs `Q² T` instead of `Q³`, and only
    needs products `S X` with `X` `[B, Q, T]`; an `AttentionRows` forms them in row chunks within its memory budget.

    Args:
        cross_probs (`torch.Tensor`): `[B, Q, T]` cross-attention probabilities (image queries to text tokens).
        self_probs (`torch.Tensor` or `AttentionRows`): `[B, Q, Q]` self-attention probabilities of the same grid.
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
    if isinstance(self_probs, torch.Tensor):
        product = functools.partial(torch.bmm, self_probs)
    else:
        product = self_probs.matmul
    if completion == "official":
        first = product(cross_probs)
        return (first + 3 * product(first)) / 4
    # `total` and `power` are the only [B, Q, T] products kept alive (what `peak_extra_bytes` counts).
    total = power = product(cross_probs)
    for _ in range(order - 1):
        power = product(power)
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
    """Smooth every channel of `maps` `[B, C, *grid]` with a separable Gaussian over the last two (spatial) axes,
    reflect padding (steps 2c and 7). Leading grid axes (video frames) are smoothed independently.

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
    shape = x.shape
    h, w = shape[-2:]
    kernel = gaussian_kernel(sigma, size, x.dtype).to(x.device)
    pad = size // 2
    x = x.reshape(math.prod(shape[:-2]), 1, h, w)
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect" if w > pad else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, size))
    x = F.pad(x, (0, 0, pad, pad), mode="reflect" if h > pad else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, size, 1))
    return x.reshape(shape).to(dtype)


def smooth_frames(maps: torch.Tensor, sigma: float | None, size: int = 3) -> torch.Tensor:
    """Smooth `maps` `[B, C, F, h, w]` with the same Gaussian along the frame axis (docs/algorithm.md section 8),
    reflect padding (replication for a clip of one frame); grids without frames are returned as they are.

    >>> x = torch.zeros(1, 1, 5, 1, 1); x[:, :, 2] = 1.0
    >>> smooth_frames(x, 0.5).flatten()
    tensor([0.0000, 0.2119, 0.5761, 0.2119, 0.0000])
    """
    if sigma is None or maps.ndim != 5:
        return maps
    dtype = maps.dtype
    x = maps.to(torch.promote_types(dtype, torch.float32))
    b, c, f, h, w = x.shape
    kernel = gaussian_kernel(sigma, size, x.dtype).to(x.device)
    pad = size // 2
    x = x.permute(0, 1, 3, 4, 2).reshape(b * c * h * w, 1, f)
    x = F.pad(x, (pad, pad), mode="reflect" if f > pad else "replicate")
    x = F.conv1d(x, kernel.view(1, 1, size))
    return x.reshape(b, c, h, w, f).permute(0, 1, 4, 2, 3).to(dtype)


def layer_maps(
    completed: torch.Tensor,
    grid: Sequence[int],
    mask_grid: Sequence[int],
    smoothing: float | None = 0.5,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn one layer's completed cross-attention into normalised token and foreground maps (steps 2b-2e).

    Args:
        completed (`torch.Tensor`): `[B, Q, T]` completed cross-attention of a layer whose grid is `grid`.
        grid (`tuple[int, ...]`): `(h, w)` or `(f, h, w)` of the layer, its product `Q`; the query index runs over
            frames, then rows, then columns, like the latent.
        mask_grid (`tuple[int, ...]`): the mask grid, of the same rank; coarser maps are upsampled bilinearly over
            the last two axes, frame by frame (the leading axes must match `grid`'s).
        smoothing (`float | None`): `sigma` of the 3x3 Gaussian, or `None`.
        reference (`torch.Tensor`, *optional*): `[B]` index of the token that plays the start token's role in
            the foreground map (an attention sink); token 0 when `None` (CLIP's start token).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: token maps `[B, T, *mask_grid]` (each divided by its spatial mean,
        per frame) and foreground maps `[B, 2, *mask_grid]` (reference token, sum of all other tokens; each divided
        by its spatial mean, per frame).

    >>> token, fg = layer_maps(torch.rand(1, 2 * 3 * 4, 5), (2, 3, 4), (2, 6, 8))
    >>> tuple(token.shape), tuple(fg.shape)
    ((1, 5, 2, 6, 8), (1, 2, 2, 6, 8))
    """
    grid, mask_grid = tuple(grid), tuple(mask_grid)
    b, q, t = completed.shape
    if len(grid) < 2 or len(mask_grid) != len(grid) or grid[:-2] != mask_grid[:-2]:
        raise ValueError(
            f"Expected `grid` and `mask_grid` of the same rank (at least 2) that differ only in their last two "
            f"(spatial) axes, but got {grid} and {mask_grid}. Frames are never interpolated."
        )
    if math.prod(grid) != q:
        raise ValueError(f"Expected `completed` with {math.prod(grid)} queries for the grid {grid}, but got {q}.")
    # 2b. [B, Q, T] -> [B, T, *grid]; the query index runs over frames, then rows, then columns, like the latent.
    maps = completed.to(torch.promote_types(completed.dtype, torch.float32)).transpose(1, 2).reshape(b, t, *grid)
    if grid != mask_grid:
        # bilinear over (h, w) only: the frames are folded into the channels
        lead = grid[:-2]
        maps = F.interpolate(
            maps.reshape(b, t * math.prod(lead), *grid[-2:]),
            size=mask_grid[-2:],
            mode="bilinear",
            align_corners=False,
        ).reshape(b, t, *mask_grid)
    # 2c. smoothing, in float32 (or float64 for a float64 model); spatial, frame by frame.
    maps = smooth(maps, smoothing)
    # 2d. each token over its own spatial mean: attention to frequent tokens no longer wins everywhere. The mean is
    # per frame (the last two axes), as in 2e, so that a video's segmentation is the per-frame image segmentation
    # whenever the self-attention does not couple frames: temporal coupling comes from the spatio-temporal
    # self-attention in the completion (2a), not from the normalisation.
    spatial = (-2, -1)
    token = maps / (maps.mean(dim=spatial, keepdim=True) + _EPS)
    # 2e. start token (or the family's reference token) vs everything else.
    if reference is None:
        fg = torch.stack([maps[:, 0], maps[:, 1:].sum(dim=1)], dim=1)
    else:
        ref = maps[torch.arange(b, device=maps.device), reference.to(maps.device)]
        fg = torch.stack([ref, maps.sum(dim=1) - ref], dim=1)
    # The released code has no epsilon here. With it, the exact tie of uniform attention (e.g. SDXL's all-zero
    # negative embeddings: every token's map is the same) goes to foreground deterministically instead of being
    # decided by rounding; elsewhere it changes values by ~1e-8 relative. An all-zero channel stays zero.
    fg = fg / (fg.mean(dim=spatial, keepdim=True) + _EPS)
    return token, fg


def average_layer_maps(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor | AttentionRows | None, Sequence[int]]],
    mask_grid: Sequence[int],
    completion: Literal["official", "power_mean", "none"] = "official",
    order: int = 4,
    smoothing: float | None = 0.5,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete, map and average every layer; each layer counts once (steps 2-3).

    Args:
        layers: `(cross_probs [B, Q, T], self_probs [B, Q, Q] (a tensor or `AttentionRows`) or None, grid)` per
            layer, `grid` being `(h, w)` or `(f, h, w)`.
        mask_grid: the finest grid used, of the same rank.
        reference: see `layer_maps`.

    Returns:
        token maps `[B, T, *mask_grid]` and foreground maps `[B, 2, *mask_grid]`, averaged over layers.
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
        token_maps (`torch.Tensor`): `[B, T, *grid]` layer-averaged, normalised token maps.
        allowed (`torch.Tensor`, *optional*): `[B, T]` bool, the tokens that may own regions (in every frame); all
            when `None`.
        tie_break (`str`): `"multi_hot"` puts a tied pixel in every tied region (the released code);
            `"first"` gives it to the lowest token index.

    Returns:
        `torch.Tensor`: `[B, T, *grid]` masks of 0/1 in the dtype of `token_maps`.

    >>> m = assign_regions(torch.tensor([[[[1.0, 2.0]], [[3.0, 2.0]]]]))
    >>> m[0, :, 0].tolist()
    [[0.0, 1.0], [1.0, 1.0]]
    """
    maps = token_maps
    if allowed is not None:
        maps = maps.masked_fill(~allowed.view(*allowed.shape, *(1,) * (maps.ndim - 2)), -math.inf)
    if tie_break == "first":
        index = maps.argmax(dim=1, keepdim=True)
        return torch.zeros_like(token_maps).scatter_(1, index, 1.0)
    best = maps.amax(dim=1, keepdim=True)
    return (maps == best).to(token_maps.dtype)


def foreground_mask(foreground_maps: torch.Tensor) -> torch.Tensor:
    """Return `[B, 1, *grid]` 0/1: pixels where the not-start-token channel is strictly larger (step 4).

    >>> foreground_mask(torch.tensor([[[[2.0, 0.5]], [[1.0, 1.5]]]])).tolist()
    [[[[0.0, 1.0]]]]
    """
    return (foreground_maps[:, 1:2] > foreground_maps[:, 0:1]).to(foreground_maps.dtype)


def upsample_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of `[B, C, *grid]` masks to the latent grid `size`, of the same rank (step 5).

    >>> upsample_masks(torch.tensor([[[[[1.0, 0.0]]]]]), (1, 2, 4))[0, 0, 0].tolist()
    [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    """
    size = tuple(size)
    if len(size) != masks.ndim - 2:
        raise ValueError(f"Expected a `size` of rank {masks.ndim - 2} for masks {tuple(masks.shape)}, but got {size}.")
    if tuple(masks.shape[2:]) == size:
        return masks
    return F.interpolate(masks, size=size, mode="nearest")
