"""The pure algorithm (scfg.segment, scfg.rule, scfg.config): hand-made tensors and docs/algorithm.md's invariants."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import gaussian_blur, gaussian_weights, reference_maps, reference_rate

from scfg import PRESETS, SCFGConfig, SCFGError
from scfg.rule import finish_rate_map, region_rates, semantic_guidance
from scfg.segment import (
    assign_regions,
    average_layer_maps,
    complete_cross_attention,
    foreground_mask,
    gaussian_kernel,
    smooth,
)


def random_probs(*shape, generator=None, sharpness=3.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * sharpness).softmax(dim=-1)


def two_regions(h=4, w=6):
    """Token 1 owns the left half, token 2 the right half; token 0 owns nothing."""
    masks = torch.zeros(1, 3, h, w)
    masks[0, 1, :, : w // 2] = 1
    masks[0, 2, :, w // 2 :] = 1
    return masks


# -- segmentation ---------------------------------------------------------------------------------------------


F32 = torch.finfo(torch.float32).eps
F64 = torch.finfo(torch.float64).eps


def test_gaussian_kernel_matches_released_code_weights():
    # docs/algorithm.md prints the weights to 4 decimals: half a unit of the last digit
    torch.testing.assert_close(gaussian_kernel(0.5), torch.tensor([0.2119, 0.5761, 0.2119]), atol=5e-5, rtol=0)
    # against the formula in float64: the float32 kernel is a float64 one rounded once (half an ulp; one ulp also
    # covers the float64 roundings by which the two formulas differ)
    exact = torch.tensor(gaussian_weights(0.5), dtype=torch.float64)
    torch.testing.assert_close(gaussian_kernel(0.5).double(), exact, rtol=F32, atol=0)


def test_smooth_matches_explicit_reflect_sum():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    # values in [0, 1), 9 products with weights summing to 1, added in another order: < 9 float64 roundings of 1
    torch.testing.assert_close(smooth(x, 0.5), gaussian_blur(x), rtol=0, atol=16 * F64)


def test_smooth_handles_one_pixel_wide_grids():
    for h, w in [(1, 5), (5, 1), (1, 1)]:
        x = torch.rand(1, 2, h, w, dtype=torch.float64)
        out = smooth(x, 0.5)
        assert out.shape == x.shape
        # a 1-wide axis is padded by replication, as the reference reflects a 1-wide grid: the bound of the test above
        torch.testing.assert_close(out, gaussian_blur(x), rtol=0, atol=16 * F64)


@pytest.mark.parametrize("completion", ["official", "power_mean"])
def test_completion_matches_matrix_powers(completion):
    g = torch.Generator().manual_seed(0)
    s, c = random_probs(2, 12, 12, generator=g), random_probs(2, 12, 5, generator=g)
    if completion == "official":
        expected = (s + 3 * s @ s) / 4 @ c
    else:
        expected = sum(torch.linalg.matrix_power(s, r) for r in range(1, 5)) / 4 @ c
    # row-stochastic 12x12 products: each of <= 5 products per term rounds a 12-term sum of entries <= 1 that adds
    # up to <= 1, so any entry is within ~5·12 float64 roundings of 1 of the exact one, on either side
    torch.testing.assert_close(complete_cross_attention(c, s, completion, 4), expected, rtol=0, atol=128 * F64)


@pytest.mark.parametrize("completion", ["official", "power_mean"])
def test_completed_self_attention_rows_sum_to_one(completion):
    s = random_probs(1, 9, 9, generator=torch.Generator().manual_seed(1))
    identity = torch.eye(9, dtype=torch.float64)[None]
    completed = complete_cross_attention(identity, s, completion)  # S' itself
    # <= 4 products of 9x9 row-stochastic matrices and one 9-term row sum: ~4·9 + 9 float64 roundings of 1
    torch.testing.assert_close(completed.sum(-1), torch.ones(1, 9, dtype=torch.float64), rtol=0, atol=64 * F64)


def test_layer_maps_match_reference_with_coarse_level():
    g = torch.Generator().manual_seed(2)
    probs = {
        "fine.attn2": random_probs(1, 4 * 6, 5, generator=g),
        "fine.attn1": random_probs(1, 24, 24, generator=g),
        "coarse.attn2": random_probs(1, 2 * 3, 5, generator=g),
        "coarse.attn1": random_probs(1, 6, 6, generator=g),
    }
    layers = [("fine.attn2", "fine.attn1", 4), ("coarse.attn2", "coarse.attn1", 8)]
    token, fg = average_layer_maps(
        [(probs["fine.attn2"], probs["fine.attn1"], (4, 6)), (probs["coarse.attn2"], probs["coarse.attn1"], (2, 3))],
        (4, 6),
    )
    ref_token, ref_fg = reference_maps(probs, layers, (16, 24), 0)
    # float64 both; the maps are O(1) (divided by their spatial mean) after a 24-term completion, a bilinear
    # upsampling, a 9-tap smoothing and a 24-pixel mean: some 100 roundings of ~1 apart at most
    torch.testing.assert_close(token[0], ref_token, rtol=0, atol=256 * F64)
    torch.testing.assert_close(fg[0], ref_fg, rtol=0, atol=256 * F64)


def test_assign_regions_first_partitions_and_multi_hot_keeps_ties():
    maps = torch.tensor([[[[1.0, 2.0, 0.0]], [[1.0, 0.5, 0.0]], [[0.0, 2.0, 3.0]]]])
    first = assign_regions(maps, tie_break="first")
    assert first.sum(dim=1).eq(1).all()
    assert first[0, :, 0].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    multi = assign_regions(maps)
    assert multi[0, :, 0].tolist() == [[1, 1, 0], [1, 0, 0], [0, 1, 1]]


def test_assign_regions_respects_allowed_tokens():
    maps = torch.tensor([[[[5.0, 5.0]], [[1.0, 2.0]], [[2.0, 1.0]]]])
    masks = assign_regions(maps, allowed=torch.tensor([[False, True, True]]))
    assert masks[0, 0].sum() == 0
    assert masks[0, :, 0].tolist() == [[0, 0], [0, 1], [1, 0]]


def test_foreground_mask_is_strictly_larger_channel():
    fg = torch.tensor([[[[1.0, 1.0, 2.0]], [[0.5, 1.0, 3.0]]]])
    assert foreground_mask(fg)[0, 0, 0].tolist() == [0, 0, 1]


# -- the rule -------------------------------------------------------------------------------------------------


def test_equal_region_norms_give_plain_cfg():
    masks = two_regions()
    u = torch.randint(-8, 8, (1, 4, 4, 6), generator=torch.Generator().manual_seed(0)) / 4.0
    c = u + 2.0  # every pixel has the same score norm, exactly: quarters are exact in float32
    result = semantic_guidance(u, c, masks, masks[:, 1:2], 7.5)
    # the rate is exactly 1 before the smoothing, whose two 3-tap passes have float32 weights summing to 1 within
    # ~2 roundings each: 4·eps bounds it
    torch.testing.assert_close(result.rate_map, torch.ones_like(result.rate_map), rtol=4 * F32, atol=0)
    # 7.5·rate·2 is then off by <= 15·4·eps (the rate) plus one rounding of ~15, and both sides round u + 15 once
    expected = u + 7.5 * (c - u)
    torch.testing.assert_close(result.guided, expected, rtol=0, atol=(64 + float(expected.abs().max())) * F32)


def test_rate_is_constant_above_scale_cap():
    masks = two_regions()
    u, c = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6) * 5
    for g in (18.8, 20.0, 50.0):
        result = semantic_guidance(u, c, masks, masks[:, 1:2], g)
        # the cap is the float32 rounding of 15/g on both sides; the smoothing of a constant map adds <= 4·eps
        torch.testing.assert_close(result.rate_map, torch.full_like(result.rate_map, 15.0 / g), rtol=4 * F32, atol=0)


def test_empty_foreground_gives_lower_clamp():
    masks = two_regions()
    u, c = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    result = semantic_guidance(u, c, masks, torch.zeros(1, 1, 4, 6), 5.0)
    assert torch.all(result.token_rates == 0)
    # the clamp is the float32 rounding of 0.8 on both sides; the smoothing of a constant map adds <= 4·eps
    torch.testing.assert_close(result.rate_map, torch.full_like(result.rate_map, 0.8), rtol=4 * F32, atol=0)


def test_region_rates_bring_each_region_to_foreground_level():
    masks = two_regions()
    u = torch.zeros(1, 4, 4, 6)
    c = torch.zeros(1, 4, 4, 6)
    c[:, 0, :, :3] = 1.0  # left norm 1
    c[:, 0, :, 3:] = 4.0  # right norm 4
    fg = masks[:, 1:2]  # foreground = left region
    result = semantic_guidance(u, c, masks, fg, 5.0, rate_clamp=None, max_effective_scale=None, smoothing=None)
    # exact: norms 1 and 4 of a single channel, means of 12 equal values, and ratios 1/1 and 1/4 are all exact
    assert torch.equal(result.token_rates, torch.tensor([[0.0, 1.0, 0.25]]))
    # after rescaling, both regions' mean score norms are equal (1·1 and 0.25·4, exactly)
    scaled = torch.linalg.vector_norm(result.rate_map * (c - u), dim=1)
    assert torch.equal(scaled[0, :, :3], scaled[0, :, 3:].mean().expand(4, 3))


def test_rule_matches_reference_with_multi_hot_ties():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 4, 8, 12, generator=g, dtype=torch.float64)
    c = torch.randn(1, 4, 8, 12, generator=g, dtype=torch.float64)
    masks = (torch.rand(1, 5, 4, 6, generator=g) > 0.6).double()  # overlapping, some pixels in none
    fg = (torch.rand(1, 1, 4, 6, generator=g) > 0.5).double()
    result = semantic_guidance(u, c, masks, fg, 7.5)
    rate, rates = reference_rate(u[0], c[0], masks[0], fg[0, 0], 7.5)
    # float64 both: 4-channel norms, region means of <= 96 pixels (summed in another order) and one ratio put each
    # rate within ~2·96 roundings (relative) of the reference's; the rate map adds tied rates and smooths: ~16 more
    torch.testing.assert_close(result.rate_map[0, 0], rate, rtol=256 * F64, atol=0)
    torch.testing.assert_close(result.token_rates[0], rates, rtol=256 * F64, atol=0)


def test_mean_benchmark_uses_whole_image():
    masks = two_regions()
    u = torch.zeros(1, 1, 4, 6)
    c = torch.ones(1, 1, 4, 6)
    c[..., 3:] = 3.0
    rates, _, bench = region_rates(torch.linalg.vector_norm(c - u, dim=1), masks, torch.ones(1, 1, 4, 6))
    # exact: sums of small integers, and one correctly rounded division (2/3) on both sides
    assert torch.equal(bench, torch.tensor([2.0]))
    assert torch.equal(rates, torch.tensor([[0.0, 2.0, 2.0 / 3.0]]))


def test_finish_rate_map_clamps_then_caps():
    rate = torch.tensor([[[[0.1, 1.0, 9.0]]]])
    out = finish_rate_map(rate, 10.0, smoothing=None)
    # exact: the clamp returns float32(0.8) itself, and the cap 15/10 = 1.5 is exact
    assert torch.equal(out, torch.tensor([[[[0.8, 1.0, 1.5]]]]))


# -- properties -----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(2, 6),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    g=st.floats(1.5, 40.0),
    scale=st.floats(1e-3, 1e3),
)
def test_rule_properties(seed, tokens, h, w, g, scale):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(2, tokens, h, w, generator=gen, dtype=torch.float64)
    masks = assign_regions(maps, tie_break="first")
    assert torch.all(masks.sum(dim=1) == 1)  # a partition of the grid
    u, c = (
        torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64),
        torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64),
    )
    fg = foreground_mask(torch.rand(2, 2, h, w, generator=gen, dtype=torch.float64))
    result = semantic_guidance(u, c, masks, fg, g)
    low, high = 0.8, min(3.0, 15.0 / g)
    assert torch.isfinite(result.rate_map).all()
    # clamp and cap are exact; the smoothing is a convex combination whose float64 weights sum to 1 within a few
    # ulps, so the bounds hold to a few ulps of the bound (16 ulps of 3 is ~1e-14)
    slack = 16 * F64 * 3.0
    assert result.rate_map.min() >= min(low, high) - slack and result.rate_map.max() <= high + slack
    # a uniform scaling of the score leaves the rates unchanged: (u + s·η) − u carries a rounding of up to
    # eps·|u| on each channel, which is ~1e-12 of the score itself for s = 1e-3; the norms, means and ratio keep
    # that relative size, so 1e-9 is loose by orders of magnitude, while a real dependence on the scale moves a
    # rate by far more
    scaled = semantic_guidance(u, u + scale * (c - u), masks, fg, g)
    torch.testing.assert_close(scaled.rate_map, result.rate_map, rtol=1e-9, atol=1e-9)
    # permuting tokens permutes the regions and their rates
    perm = torch.randperm(tokens, generator=gen)
    permuted = assign_regions(maps[:, perm], tie_break="first")
    if torch.equal(permuted, masks[:, perm]):  # unless a tie resolved differently
        again = semantic_guidance(u, c, permuted, fg, g)
        # each region's mean is the same float64 sum over the same pixels, at most reassociated by another GEMM
        # blocking (<= h·w = 36 roundings); every pixel then takes the one rate of its region
        torch.testing.assert_close(again.token_rates, result.token_rates[:, perm], rtol=64 * F64, atol=0)
        torch.testing.assert_close(again.rate_map, result.rate_map, rtol=64 * F64, atol=0)


# -- config -----------------------------------------------------------------------------------------------------


def test_presets_differ_as_documented():
    official, paper = SCFGConfig.preset("official").resolve(), SCFGConfig.preset("paper").resolve()
    assert official == SCFGConfig().resolve() == PRESETS["official"] and paper == PRESETS["paper"]
    different = {f.name for f in dataclasses.fields(SCFGConfig) if getattr(official, f.name) != getattr(paper, f.name)}
    assert different == {
        "preset_name",
        "completion",
        "token_map_smoothing",
        "rate_map_smoothing",
        "tie_break",
        "rate_clamp",
        "max_effective_scale",
        "temporal_smoothing",  # video only: the paper has no smoothing at all (docs/algorithm.md section 8)
    }


def test_config_round_trips_through_dict():
    config = SCFGConfig.preset("paper", levels=(4,), start_fraction=0.1)
    assert SCFGConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rate_clamp": (3.0, 0.8)}, "rate_clamp"),
        ({"completion_order": -1}, "completion_order"),
        ({"levels": (3,)}, "levels"),
        ({"completion": "cubic"}, "completion"),
        ({"start_fraction": 0.5, "stop_fraction": 0.5}, "start_fraction"),
        ({"max_effective_scale": -1.0}, "max_effective_scale"),
        ({"token_map_smoothing": 0.0}, "token_map_smoothing"),
        ({"layers_per_level": 0}, "layers_per_level"),
        ({"layers_per_stack": 1.5}, "layers_per_stack"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(SCFGError, match=f"`{field}`"):
        SCFGConfig(**overrides)


def test_unknown_preset_lists_presets():
    with pytest.raises(SCFGError, match="official"):
        SCFGConfig.preset("fast")


def test_pure_modules_import_neither_diffusers_nor_transformers():
    code = (
        "import sys, scfg.segment, scfg.rule, scfg.config; "
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    # scfg/__init__ imports the integration; import the submodules without running it.
    code = (
        "import importlib.util, sys, types; "
        + (
            "spec = importlib.util.find_spec('scfg'); pkg = types.ModuleType('scfg'); "
            "pkg.__path__ = list(spec.submodule_search_locations); sys.modules['scfg'] = pkg; "
        )
        + code
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
