"""The per-region guidance rule (docs/algorithm.md section 2, steps 5-8).

Pure tensor functions: no diffusers, no transformers, no state. `score = pred_cond - pred_uncond` is the classifier
score η; `rate` is the per-pixel multiplier of the guidance scale `g`. Predictions are `[B, C, *grid]` and masks
`[B, T, *grid]` for a grid `(H, W)` or `(F, H, W)` (video); a region of a video is spatio-temporal, one rate per token
for the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .segment import smooth, smooth_frames, upsample_masks

__all__ = ["GuidanceResult", "apply_token_scales", "finish_rate_map", "region_rates", "semantic_guidance"]


@dataclass
class GuidanceResult:
    """What one S-CFG step computed.

    Attributes:
        guided: `[B, C, *grid]` `pred_uncond + g * rate * score`, in the dtype of the predictions.
        rate_map: `[B, 1, *grid]` float32 final per-pixel rate (after clamps, cap and smoothing).
        token_rates: `[B, T]` float32 per-region rates before the clamps (0 for empty regions).
        region_norms: `[B, T]` float32 mean score norm inside each region (0 for empty regions).
        benchmark_norm: `[B]` float32 mean score norm inside the benchmark region.
    """

    guided: torch.Tensor
    rate_map: torch.Tensor
    token_rates: torch.Tensor
    region_norms: torch.Tensor
    benchmark_norm: torch.Tensor


def _grid_axes(rank: int) -> str:
    """einsum letters of a grid of `rank` axes: `"hw"` for an image, `"fhw"` for a video (frames first)."""
    if rank not in (2, 3):
        raise ValueError(f"Expected a grid of rank 2 (H, W) or 3 (F, H, W), but got rank {rank}.")
    return "fhw"[-rank:]


def _masked_mean(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of `values` `[B, *grid]` inside each mask `[B, K, *grid]`, over all its cells (all frames of a video);
    0 for empty masks. Returns `[B, K]`."""
    axes = _grid_axes(values.ndim - 1)
    total = torch.einsum(f"bk{axes},b{axes}->bk", masks, values)
    count = masks.sum(dim=tuple(range(2, masks.ndim)))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def region_rates(
    score_norm: torch.Tensor,
    token_masks: torch.Tensor,
    benchmark_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return each region's rate `mean_{benchmark} n / mean_{region} n` (step 6; the paper's `g_i / g`).

    Args:
        score_norm (`torch.Tensor`): `[B, *grid]` per-pixel L2 norm of the score over latent channels.
        token_masks (`torch.Tensor`): `[B, T, *grid]` 0/1 region masks at the latent grid.
        benchmark_mask (`torch.Tensor`): `[B, 1, *grid]` 0/1 benchmark region (the foreground).

    Returns:
        rates `[B, T]` (0 for an empty region, and 0 everywhere for an empty benchmark), region norms `[B, T]`,
        benchmark norm `[B]`. On a video grid each norm is the mean over the region's cells in all frames.

    >>> n = torch.tensor([[[1.0, 3.0]]]); m = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    >>> region_rates(n, m, torch.ones(1, 1, 1, 2))[0]
    tensor([[2.0000, 0.6667]])
    """
    region = _masked_mean(score_norm, token_masks)
    benchmark = _masked_mean(score_norm, benchmark_mask)[:, 0]
    rates = torch.where(region > 0, benchmark[:, None] / region.clamp_min(torch.finfo(region.dtype).tiny), 0.0)
    return rates, region, benchmark


def finish_rate_map(
    rate: torch.Tensor,
    guidance_scale: float,
    rate_clamp: tuple[float, float] | None = (0.8, 3.0),
    max_effective_scale: float | None = 15.0,
    smoothing: float | None = 0.5,
) -> torch.Tensor:
    """Clamp, cap and smooth a `[B, 1, *grid]` rate map (step 7; smoothing is spatial, frame by frame).

    The cap `rate <= max_effective_scale / g` comes after the clamp, so for `g > 15 / 0.8 = 18.75` the rate is the
    constant `15 / g` everywhere.

    >>> finish_rate_map(torch.tensor([[[[0.1, 9.0]]]]), 7.5, smoothing=None)
    tensor([[[[0.8000, 2.0000]]]])
    """
    if rate_clamp is not None:
        rate = rate.clamp(rate_clamp[0], rate_clamp[1])
    if max_effective_scale is not None:
        rate = rate.clamp_max(max_effective_scale / guidance_scale)
    return smooth(rate, smoothing)


def apply_token_scales(
    rate: torch.Tensor,
    token_masks: torch.Tensor,
    token_scales: torch.Tensor,
    mode: Literal["multiply", "replace"] = "multiply",
) -> torch.Tensor:
    """Apply user multipliers `token_scales` `[B, T]` (NaN: not set) to the regions `[B, T, *grid]` of a rate map
    `[B, 1, *grid]`.

    `"multiply"` multiplies the rate inside each scaled region; `"replace"` sets it to the scale (the effective
    scale there is then `g * scale`). A pixel shared by several scaled regions takes their mean.

    >>> m = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    >>> apply_token_scales(torch.full((1, 1, 1, 2), 2.0), m, torch.tensor([[1.5, float("nan")]]))
    tensor([[[[3., 2.]]]])
    """
    is_set = ~torch.isnan(token_scales)
    value = torch.where(is_set, token_scales, 0.0).to(rate.dtype)
    axes = _grid_axes(token_masks.ndim - 2)
    owners = torch.einsum(f"bt,bt{axes}->b{axes}", is_set.to(rate.dtype), token_masks)[:, None]
    mean_scale = torch.einsum(f"bt,bt{axes}->b{axes}", value, token_masks)[:, None] / owners.clamp_min(1)
    if mode == "replace":
        return torch.where(owners > 0, mean_scale, rate)
    return torch.where(owners > 0, rate * mean_scale, rate)


def semantic_guidance(
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    token_masks: torch.Tensor,
    foreground_mask: torch.Tensor,
    guidance_scale: float,
    *,
    benchmark: Literal["foreground", "mean"] = "foreground",
    rate_clamp: tuple[float, float] | None = (0.8, 3.0),
    max_effective_scale: float | None = 15.0,
    smoothing: float | None = 0.5,
    token_scales: torch.Tensor | None = None,
    token_scale_mode: Literal["multiply", "replace"] = "multiply",
    out_dtype: torch.dtype | None = None,
    temporal_smoothing: float | None = None,
) -> GuidanceResult:
    """Apply per-region guidance scales: `pred_uncond + g * rate * (pred_cond - pred_uncond)` (steps 5-8).

    Args:
        pred_uncond (`torch.Tensor`): `[B, C, *grid]` unconditional prediction, `grid` `(H, W)` or `(F, H, W)` (ε, v
            or flow velocity alike: rates are ratios of norms of the same difference).
        pred_cond (`torch.Tensor`): `[B, C, *grid]` conditional prediction.
        token_masks (`torch.Tensor`): `[B, T, *mask_grid]` 0/1 region masks on the mask grid, of the same rank.
        foreground_mask (`torch.Tensor`): `[B, 1, *mask_grid]` 0/1 foreground on the mask grid.
        guidance_scale (`float`): `g`.
        benchmark (`str`): `"foreground"` (the paper) or `"mean"` (whole image, "S-CFG-mean").
        rate_clamp, max_effective_scale, smoothing: see `finish_rate_map`.
        token_scales (`torch.Tensor`, *optional*): `[B, T]` user multipliers per token (NaN: not set), applied
            after the clamp and cap (the user asked for them) and before smoothing; see `apply_token_scales`.
        token_scale_mode (`str`): `"multiply"` or `"replace"`.
        out_dtype (`torch.dtype`, *optional*): dtype of `GuidanceResult.guided`; defaults to `pred_cond`'s.
        temporal_smoothing (`float`, *optional*): on a grid of frames, `sigma` of the 3-tap Gaussian applied to the
            rate map along the frames after the spatial smoothing (`segment.smooth_frames`); images ignore it.

    Returns:
        `GuidanceResult`.

    With equal score norms in every region the rate is 1 and the result is plain CFG:

    >>> u = torch.zeros(1, 4, 2, 2); c = torch.ones(1, 4, 2, 2)
    >>> m = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    >>> torch.allclose(semantic_guidance(u, c, m, m[:, :1], 5.0).guided, u + 5.0 * (c - u))
    True
    """
    size = pred_cond.shape[2:]
    # Everything below runs in float32 at least, whatever the model's dtype (float64 stays float64).
    dtype = torch.promote_types(pred_cond.dtype, torch.float32)
    # 5. masks to the latent grid (nearest, every axis).
    token_masks = upsample_masks(token_masks.to(dtype), size)
    foreground_mask = upsample_masks(foreground_mask.to(dtype), size)
    # 6. per-region rates from per-pixel score norms; a video's region spans all its frames.
    pred_uncond_hi = pred_uncond.to(dtype)
    score = pred_cond.to(dtype) - pred_uncond_hi
    score_norm = torch.linalg.vector_norm(score, dim=1)
    bench_mask = torch.ones_like(foreground_mask) if benchmark == "mean" else foreground_mask
    rates, region_norms, bench_norm = region_rates(score_norm, token_masks, bench_mask)
    axes = _grid_axes(token_masks.ndim - 2)
    rate = torch.einsum(f"bt,bt{axes}->b{axes}", rates, token_masks)[:, None]
    # 7. clamp, cap, (user's per-word scales), smooth.
    rate = finish_rate_map(rate, guidance_scale, rate_clamp, max_effective_scale, None)
    if token_scales is not None:
        rate = apply_token_scales(rate, token_masks, token_scales.to(rate.device), token_scale_mode)
    rate = smooth_frames(smooth(rate, smoothing), temporal_smoothing)
    # 8. combine.
    guided = pred_uncond_hi + guidance_scale * rate * score
    return GuidanceResult(guided.to(out_dtype or pred_cond.dtype), rate, rates, region_norms, bench_norm)
