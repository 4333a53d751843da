"""Visualisations render from recorded steps, legibly sized and with consistent token colours."""

from __future__ import annotations

import torch
from PIL import Image

from scfg.diagnostics import StepReport
from scfg.viz import compare_panel, rate_curves, region_map, save_step_animation, step_figure, step_grid, token_colour


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
    assert torch.allclose(before, report.norm_spread(after=True))  # rate 1: nothing equalised
    report.rate_map[..., :12] = 2.0  # token 1 (left half) guided twice as much: norms 2 and 2
    assert float(report.norm_spread(after=True)) == 0.0 and float(before) > 0.3
