"""Visualisations render from recorded steps, legibly sized and with consistent token colours."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from scfg.diagnostics import StepReport
from scfg.viz import (
    OTHER_COLOUR,
    compare_panel,
    group_tokens,
    rate_curves,
    region_map,
    save_step_animation,
    step_figure,
    step_grid,
    token_colour,
    word_rates,
)


def fake_report(step=0, t=6):
    masks = torch.zeros(1, t, 4, 6, dtype=torch.bool)
    masks[0, 1, :, :3] = True
    masks[0, 2, :, 3:] = True
    return StepReport(
        step=step,
        timestep=900.0 - step,
        guidance_scale=7.5,
        token_masks=masks,
        foreground_mask=masks[:, 1:2],
        rate_map=torch.linspace(0.8, 2.0, 16 * 24).view(1, 1, 16, 24),
        token_rates=torch.tensor([[0.0, 1.2, 0.9, 0, 0, 0]]) + step * 0.1,
        region_norms=torch.ones(1, t),
        benchmark_norm=torch.ones(1),
        tokens=[["<|startoftext|>", "red</w>", "cat</w>", "<|endoftext|>", "x", "y"]],
    )


def test_region_map_colours_tokens_consistently_with_legend():
    image, legend = region_map(fake_report(), size=(60, 40))
    assert image.size == (60, 40)
    assert image.getpixel((5, 5)) == token_colour(1) and image.getpixel((55, 5)) == token_colour(2)
    assert [(label, share) for label, _, share in legend] == [("red", 0.5), ("cat", 0.5)]


def split_word_report(step=0):
    """ "a yellow triangle" with "triangle" in pieces; the end tokens own the bottom row."""
    tokens = ["<|startoftext|>", "yellow</w>", "tri", "an", "gle</w>", "<|endoftext|>", "<|endoftext|>"]
    masks = torch.zeros(1, len(tokens), 4, 6, dtype=torch.bool)
    masks[0, 1, :3, :2] = True  # yellow: 6 cells
    masks[0, 2, :3, 2:4] = True  # tri: 6 cells
    masks[0, 3, :3, 4:] = True  # an: 6 cells
    masks[0, 4, :3, 5] = True  # gle: 3 cells, all shared with "an" (multi-hot ties)
    masks[0, 6, 3, :] = True  # the second <end>: the bottom row
    return StepReport(
        step=step,
        timestep=900.0 - step,
        guidance_scale=7.5,
        token_masks=masks,
        foreground_mask=masks.any(dim=1, keepdim=True),
        rate_map=torch.ones(1, 1, 8, 12),
        token_rates=torch.tensor([[0.0, 1.0, 2.0, 2.0, 4.0, 0.0, 0.5]]),
        region_norms=torch.ones(1, len(tokens)),
        benchmark_norm=torch.ones(1),
        tokens=[tokens],
    )


def test_region_map_groups_pieces_into_words_and_specials_into_other():
    image, legend = region_map(split_word_report(), size=(6, 4))
    # a word's area is the union of its pieces' masks ("gle" lies inside "an"): 12 of 24 cells
    assert [(label, share) for label, _, share in legend] == [("triangle", 0.5), ("yellow", 0.25), ("other", 0.25)]
    assert image.getpixel((2, 0)) == image.getpixel((5, 0)) == token_colour(2)  # one colour for the whole word
    assert image.getpixel((0, 0)) == token_colour(1) and image.getpixel((0, 3)) == OTHER_COLOUR
    _, pieces = region_map(split_word_report(), group_words=False, show_special=True)
    assert [label for label, _, _ in pieces] == ["yellow", "tri", "an", "<end> #6", "gle"]


def test_group_tokens_covers_every_token_once_and_numbers_repeats():
    tokens = ["<|startoftext|>", "a</w>", "red</w>", "cat</w>", "a</w>", "red</w>", "dog</w>", "<|endoftext|>"]
    groups = group_tokens(tokens)
    assert [label for label, _ in groups] == ["a #1", "red #1", "cat", "a #2", "red #2", "dog", "other"]
    assert sorted(i for _, indices in groups for i in indices) == list(range(len(tokens)))
    assert [label for label, _ in group_tokens(tokens, group_words=False)][:5] == [
        "a #1",
        "red #2",
        "cat",
        "a #4",
        "red #5",
    ]
    # T5 (sentencepiece) and a sequence of two encoders (CLIP then T5) split at each start-of-word marker
    assert group_tokens(["▁yel", "low", "▁tri", "angle", "</s>"]) == [
        ("yellow", [0, 1]),
        ("triangle", [2, 3]),
        ("other", [4]),
    ]
    assert [label for label, _ in group_tokens(["tri", "<|endoftext|>", "▁tri", "angle"], show_special=True)] == [
        "tri",
        "<end>",
        "triangle",
    ]


def test_word_rates_weight_each_piece_by_its_area():
    rows = word_rates([split_word_report(0), split_word_report(1)])
    assert [row[0] for row in rows] == ["triangle", "yellow", "other"]
    _, colour, rates, area = rows[0]
    assert colour == token_colour(2) and area == 1.0  # half the grid at each of two steps
    assert rates == [(6 * 2.0 + 6 * 2.0 + 3 * 4.0) / 15] * 2
    assert rows[2][2] == [0.5, 0.5]  # "other": only the second <end> owns cells
    curves = rate_curves([split_word_report(0), split_word_report(1)], group_words=False)
    assert curves.width > 300


def test_figures_and_animation(tmp_path):
    reports = [fake_report(i) for i in range(5)]
    fig = step_figure(reports[0], image=Image.new("RGB", (64, 64), "white"))
    assert fig.width > 2 * fig.height
    curves = rate_curves(reports)
    assert curves.width > 300 and curves.height > 200
    grid = step_grid(reports, columns=2)
    assert grid.width == 2 * step_figure(reports[0]).width
    save_step_animation(reports, str(tmp_path / "a.gif"))
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 5


def test_compare_panel_without_report():
    panel = compare_panel(Image.new("RGB", (64, 32)), Image.new("RGB", (64, 32)), None)
    assert panel.width == 2 * 192 + 4


def test_norm_spread_after_uses_the_applied_rate():
    report = fake_report()
    report.region_norms = torch.tensor([[0.0, 1.0, 2.0, 0, 0, 0]])
    report.rate_map = torch.ones(1, 1, 16, 24)
    before = report.norm_spread()
    # rate 1: nothing equalised, exactly (each region's mean rate is a sum of ones divided by their count)
    assert torch.equal(before, report.norm_spread(after=True))
    report.rate_map[..., :12] = 2.0  # token 1 (left half) guided twice as much: norms 2 and 2
    assert float(report.norm_spread(after=True)) == 0.0 and float(before) > 0.3


def test_video_reports_are_seen_frame_by_frame():
    from scfg import SCFGError
    from scfg.viz import rate_heatmap, region_map

    masks = torch.zeros(1, 3, 2, 4, 6, dtype=torch.bool)
    masks[0, 0, 0], masks[0, 1, 1] = True, True  # token 0 owns frame 0, token 1 frame 1
    rate = torch.stack([torch.full((4, 6), 0.8), torch.linspace(1, 2, 24).view(4, 6)])[None, None]
    report = StepReport(
        step=0,
        timestep=1.0,
        guidance_scale=5.0,
        token_masks=masks,
        foreground_mask=masks[:, 1:2],
        rate_map=rate,
        token_rates=torch.ones(1, 3),
        region_norms=torch.ones(1, 3),
        benchmark_norm=torch.ones(1),
    )
    assert report.frames == 2 and report.frame(1).frames is None
    assert torch.equal(report.frame(1).token_masks, masks[:, :, 1]) and torch.equal(
        report.frame(-1).rate_map, rate[:, :, 1]
    )
    _, legend0 = region_map(report.frame(0))
    _, legend1 = region_map(report.frame(1))
    assert [label for label, _, _ in legend0] == ["token 0"] and [label for label, _, _ in legend1] == ["token 1"]
    assert rate_heatmap(report.frame(1)).size == (6, 4)
    with pytest.raises(SCFGError, match="frame index"):
        report.frame(2)
    assert report.norm_spread(after=True).shape == (1,)
