"""Token grids of rank 3 (video latents `(f, h, w)`): segmentation and the rule against per-frame 2-D runs and a
float64 loop (docs/algorithm.md section 2)."""

from __future__ import annotations

import pytest
import torch

from scfg.rule import region_rates, semantic_guidance
from scfg.segment import (
    assign_regions,
    average_layer_maps,
    foreground_mask,
    layer_maps,
    smooth,
    upsample_masks,
)

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """`[B, f, n, n]` per-frame blocks -> `[B, f n, f n]` self-attention that never attends across frames."""
    b, f, n, _ = blocks.shape
    out = torch.zeros(b, f * n, f * n, dtype=blocks.dtype)
    for i in range(f):
        out[:, i * n : (i + 1) * n, i * n : (i + 1) * n] = blocks[:, i]
    return out


def relative_margin(maps: torch.Tensor) -> torch.Tensor:
    """Smallest relative gap between the two largest channels of `[B, C, ...]` maps, over all cells."""
    top = maps.topk(2, dim=1).values
    return ((top[:, 0] - top[:, 1]) / top[:, 0]).min()


def completion_rtol(products: int, keys_per_frame: int) -> float:
    """Relative tolerance between a 3-D run with a block-diagonal self-attention and the per-frame 2-D runs.

    Both do the same operations except the `products` matrix products of the completion, whose sums now run over all
    frames' keys: the added terms are exact zeros, but the BLAS may group the `n` nonzero (nonnegative) terms
    differently. Two orders of a sum of n nonnegative terms differ by at most 2 (n - 1) u relative, and since the
    rows of S are nonnegative and sum to 1, a relative error in X is not amplified by S X: the products add up to
    2 r (n - 1) u. Interpolation, smoothing and layer averaging have nonnegative weights (no amplification); the
    division by a mean at most doubles it; the remaining operations round a few more times (8 u).
    """
    return (4 * products * (keys_per_frame - 1) + 8) * U32


@pytest.mark.parametrize(("completion", "products"), [("official", 2), ("power_mean", 4)])
def test_block_diagonal_video_segments_like_its_frames(completion, products):
    g = torch.Generator().manual_seed(0)
    batch, tokens, frames = 2, 5, 3
    grids = [(2, 3), (4, 6)]  # a coarse level upsampled to the mask grid, and the mask grid itself
    video_layers, frame_layers = [], [[] for _ in range(frames)]
    for h, w in grids:
        n = h * w
        cross = torch.randn(batch, frames * n, tokens, generator=g).mul(3).softmax(-1)
        blocks = torch.randn(batch, frames, n, n, generator=g).mul(2).softmax(-1)  # each row-stochastic
        video_layers.append((cross, block_diagonal(blocks), (frames, h, w)))
        for i in range(frames):
            frame_layers[i].append((cross[:, i * n : (i + 1) * n], blocks[:, i], (h, w)))
    reference = torch.tensor([0, 2])
    token, fg = average_layer_maps(video_layers, (frames, *grids[-1]), completion, reference=reference)
    per_frame = [average_layer_maps(layers, grids[-1], completion, reference=reference) for layers in frame_layers]
    token_2d = torch.stack([t for t, _ in per_frame], dim=2)
    fg_2d = torch.stack([f for _, f in per_frame], dim=2)
    rtol = completion_rtol(products, max(h * w for h, w in grids))
    torch.testing.assert_close(token, token_2d, rtol=rtol, atol=0)
    torch.testing.assert_close(fg, fg_2d, rtol=rtol, atol=0)
    # Masks are compared exactly: every cell's two best tokens (and the two foreground channels) are further apart
    # than the two runs can disagree, so no argmax can flip.
    assert relative_margin(token) > 2 * rtol
    assert relative_margin(fg) > 2 * rtol
    allowed = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]])
    for tie_break in ("multi_hot", "first"):
        assert torch.equal(assign_regions(token, allowed, tie_break), assign_regions(token_2d, allowed, tie_break))
    assert torch.equal(foreground_mask(fg), foreground_mask(fg_2d))
    assert assign_regions(token).shape == (batch, tokens, frames, *grids[-1])
    assert foreground_mask(fg).shape == (batch, 1, frames, *grids[-1])


def test_clip_of_identical_frames_gets_identical_masks():
    g = torch.Generator().manual_seed(1)
    batch, tokens, frames, (h, w) = 2, 4, 4, (3, 5)
    n = h * w
    cross = torch.randn(batch, n, tokens, generator=g).mul(3).softmax(-1).repeat(1, frames, 1)
    block = torch.randn(batch, 1, n, n, generator=g).mul(2).softmax(-1).expand(batch, frames, n, n)
    token, fg = average_layer_maps([(cross, block_diagonal(block), (frames, h, w))], (frames, h, w))
    # the frames differ only by the grouping of each product's sum (see `completion_rtol`)
    rtol = completion_rtol(2, n)
    for i in range(1, frames):
        torch.testing.assert_close(token[:, :, i], token[:, :, 0], rtol=rtol, atol=0)
    assert relative_margin(token) > 2 * rtol and relative_margin(fg) > 2 * rtol
    masks, foreground = assign_regions(token), foreground_mask(fg)
    for i in range(1, frames):
        assert torch.equal(masks[:, :, i], masks[:, :, 0])
        assert torch.equal(foreground[:, :, i], foreground[:, :, 0])


def test_equal_region_norms_on_video_give_plain_cfg():
    g = torch.Generator().manual_seed(2)
    batch, channels, grid, mask_grid = 2, 4, (3, 4, 6), (3, 2, 3)
    # scores of entries ±1 over 4 channels have norm exactly 2 everywhere, so every region's mean norm is exactly 2
    # and every rate exactly 1 (sums of a few 2.0s are exact)
    pred_uncond = torch.randn(batch, channels, *grid, generator=g)
    signs = torch.randint(0, 2, (batch, channels, *grid), generator=g).mul(2).sub(1).float()
    pred_cond = pred_uncond + signs
    regions = torch.randint(0, 3, (batch, *mask_grid), generator=g)
    token_masks = torch.stack([regions == t for t in range(4)], dim=1).float()  # token 3 owns nothing
    fg = token_masks[:, 1:2]
    result = semantic_guidance(pred_uncond, pred_cond, token_masks, fg, 5.0, smoothing=None)
    score = pred_cond - pred_uncond
    assert torch.equal(result.region_norms[:, :3], torch.full((batch, 3), 2.0))
    assert torch.equal(result.token_rates, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * batch))
    assert torch.equal(result.rate_map, torch.ones(batch, 1, *grid))
    assert torch.equal(result.guided, pred_uncond + 5.0 * result.rate_map * score)
    # with the default smoothing the rate map is a blur of ones: three float32 weights summing to 1 within 2 u, two
    # passes, so 1 within 8 u; the prediction then rounds once more
    smoothed = semantic_guidance(pred_uncond, pred_cond, token_masks, fg, 5.0)
    torch.testing.assert_close(smoothed.rate_map, torch.ones(batch, 1, *grid), rtol=8 * U32, atol=0)
    torch.testing.assert_close(smoothed.guided, pred_uncond + 5.0 * score, rtol=16 * U32, atol=16 * U32)


def test_region_rates_on_video_match_float64_loop():
    g = torch.Generator().manual_seed(3)
    batch, tokens, grid = 2, 4, (3, 4, 5)
    score_norm = torch.rand(batch, *grid, generator=g, dtype=torch.float64) + 0.1
    token_masks = (torch.rand(batch, tokens, *grid, generator=g) > 0.6).double()  # multi-hot, overlapping
    token_masks[0, 2] = 0  # an empty region
    token_masks[1, 1, 1:] = 0  # a region that lives in the first frame only
    benchmark = (torch.rand(batch, 1, *grid, generator=g) > 0.5).double()
    rates, region, bench = region_rates(score_norm, token_masks, benchmark)

    def loop_mean(b, mask):
        total, count = 0.0, 0
        for f in range(grid[0]):
            for y in range(grid[1]):
                for x in range(grid[2]):
                    if mask[f, y, x] > 0:
                        total += float(score_norm[b, f, y, x])
                        count += 1
        return total / count if count else 0.0

    f64 = torch.float64
    expected_region = torch.tensor(
        [[loop_mean(b, token_masks[b, t]) for t in range(tokens)] for b in range(batch)], dtype=f64
    )
    expected_bench = torch.tensor([loop_mean(b, benchmark[b, 0]) for b in range(batch)], dtype=f64)
    expected_rates = torch.tensor(
        [[float(expected_bench[b] / r) if r > 0 else 0.0 for r in expected_region[b]] for b in range(batch)], dtype=f64
    )
    # reordered float64 sums of at most N = f h w positive terms differ by 2 (N - 1) u relative; a ratio of two such
    # means by twice that
    rtol = 4 * (torch.Size(grid).numel() - 1) * U64
    torch.testing.assert_close(region, expected_region, rtol=rtol, atol=0)
    torch.testing.assert_close(bench, expected_bench, rtol=rtol, atol=0)
    torch.testing.assert_close(rates, expected_rates, rtol=rtol, atol=0)
    assert rates[0, 2] == 0 and region[0, 2] == 0


def test_video_interpolation_never_changes_frames():
    completed = torch.rand(1, 3 * 2 * 3, 4)
    with pytest.raises(ValueError, match="Frames are never interpolated"):
        layer_maps(completed, (3, 2, 3), (6, 4, 6))
    with pytest.raises(ValueError, match="same rank"):
        layer_maps(completed, (3, 2, 3), (4, 6))
    with pytest.raises(ValueError, match="12 queries"):
        layer_maps(completed, (2, 2, 3), (2, 4, 6))


def test_spatial_operations_run_frame_by_frame():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 3, 4, 5, 7, generator=g)
    video = smooth(maps, 0.5)
    # the same 1-D convolutions on each frame; only the batch of the convolution differs
    for f in range(maps.shape[2]):
        torch.testing.assert_close(video[:, :, f], smooth(maps[:, :, f], 0.5), rtol=4 * U32, atol=4 * U32)
    masks = (maps > 0.5).float()
    up = upsample_masks(masks, (4, 10, 14))
    for f in range(maps.shape[2]):
        assert torch.equal(up[:, :, f], upsample_masks(masks[:, :, f], (10, 14)))
    with pytest.raises(ValueError, match="rank 3"):
        upsample_masks(masks, (10, 14))
