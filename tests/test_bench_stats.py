"""The compositional benchmark's statistics: bootstrap intervals over captions, paired differences to CFG, the
Fréchet distance per group, the table and the curves (`scfg.demo.bench.summarise`, `format_table`, `plot_curves`)."""

import numpy as np
import pytest
import torch

from scfg.demo.bench import _Row, format_table, plot_curves, summarise


def _row(method, prompt, full, job, scale=5.0, relation=None, background=None, effective=None):
    return _Row(
        method=method,
        scale=scale,
        prompt=prompt,
        seed=job,
        objects=1,
        color=float(full),
        shape=float(full),
        size=1.0,
        relation=relation,
        count_ok=True,
        full=full,
        spread_before=0.5,
        spread_after=0.5,
        iou=None,
        background=background,
        effective_scale=scale if effective is None else effective,
        job=job,
    )


def test_interval_of_two_captions_by_hand():
    """Captions A (right) and B (wrong), one image each: a resample's accuracy is 1 with probability 1/4 (A twice),
    0 with 1/4, 1/2 otherwise. Of 1000 resamples about 250 ± 14 are 0 and as many 1, so the 2.5th and 97.5th
    percentiles are exactly 0 and 1 (the chance that fewer than 25 of them are 0 is below 1e-60)."""
    table = summarise([_row("cfg", "A", True, 0), _row("cfg", "B", False, 1)], resamples=1000)
    assert table[0]["full"] == 0.5
    assert table[0]["full_ci"] == [0.0, 1.0]


def test_interval_weights_captions_by_their_images():
    """A caption with two images counts twice in its resamples: A (2 right) and B (1 wrong) have accuracy 2/3, and
    the resample {B, B} is 0, {A, A} 1, {A, B} 2/3 — never 1/2."""
    rows = [_row("cfg", "A", True, 0), _row("cfg", "A", True, 1), _row("cfg", "B", False, 2)]
    table = summarise(rows, resamples=200)
    assert table[0]["full"] == pytest.approx(2 / 3)
    values = {0.0, 2 / 3, 1.0}
    assert all(any(abs(v - c) < 1e-12 for c in values) for v in table[0]["full_ci"])


def test_difference_to_cfg_is_paired():
    """S-CFG right exactly where CFG is: the paired difference is 0 in every resample, so its interval is [0, 0],
    although each method's own interval is wide."""
    prompts = [f"p{k}" for k in range(10)]
    rows = []
    for method in ("cfg", "scfg-official"):
        rows += [_row(method, p, k % 2 == 0, k) for k, p in enumerate(prompts)]
    table = {row["method"]: row for row in summarise(rows, resamples=300)}
    assert table["cfg"]["full_ci"][1] - table["cfg"]["full_ci"][0] > 0.3
    assert table["scfg-official"]["full_vs_cfg"] == 0.0
    assert table["scfg-official"]["full_vs_cfg_ci"] == [0.0, 0.0]
    assert "full_vs_cfg" not in table["cfg"]


def test_a_method_better_on_every_caption_has_a_positive_interval():
    prompts = [f"p{k}" for k in range(12)]
    rows = [_row("cfg", p, k < 4, k) for k, p in enumerate(prompts)]
    rows += [_row("scfg-paper", p, k < 8, k) for k, p in enumerate(prompts)]
    table = {row["method"]: row for row in summarise(rows, resamples=500)}
    low, high = table["scfg-paper"]["full_vs_cfg_ci"]
    assert table["scfg-paper"]["full_vs_cfg"] == pytest.approx(4 / 12)
    assert 0 < low <= 4 / 12 <= high


def test_fields_without_values_get_no_interval_from_them():
    """Relation exists for 2-object captions only: the interval is of those images alone."""
    rows = [_row("cfg", "A", True, 0, relation=True), _row("cfg", "B", False, 1)]
    table = summarise(rows, resamples=100)
    assert table[0]["relation"] == 1.0
    assert table[0]["relation_ci"] == [1.0, 1.0]  # resamples with no image that has a relation are left out


def test_frechet_distance_per_group_and_its_interval():
    """Generated features equal to the reference's: distance 0 for CFG; shifted by 1 in every coordinate for S-CFG:
    distance D (= 8) in every resample (a shift moves the means only)."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(16, 8, generator=g, dtype=torch.float64)
    rows = []
    for method in ("cfg", "scfg-official"):
        rows += [_row(method, f"p{k // 2}", True, k) for k in range(16)]
    fidelity = (reference, {("cfg", 5.0): reference.clone(), ("scfg-official", 5.0): reference + 1})
    table = {row["method"]: row for row in summarise(rows, fidelity, resamples=50)}
    assert table["cfg"]["fd"] == pytest.approx(0.0, abs=1e-9)
    assert table["scfg-official"]["fd"] == pytest.approx(8.0, rel=1e-9)
    # a resample of 8 captions can have fewer than 9 distinct rows, so its 8x8 covariances are singular: an
    # eigenvalue that is 0 comes out as about 1e-16 x the largest, and its square root as up to 1e-8, over the 8
    # eigenvalues at most 1e-7 (the full set is not singular: 1e-9 above)
    assert table["scfg-official"]["fd_ci"] == pytest.approx([8.0, 8.0], abs=1e-6)


def test_table_and_curves(tmp_path):
    rows = []
    for scale in (3.0, 5.0):
        for method in ("cfg", "scfg-official"):
            rows += [_row(method, f"p{k}", (k + int(scale)) % 3 == 0, k, scale=scale) for k in range(6)]
    reference = torch.randn(6, 4, dtype=torch.float64)
    fake = {(m, s): reference + s / 10 for m in ("cfg", "scfg-official") for s in (3.0, 5.0)}
    table = summarise(rows, (reference, fake), resamples=50)
    text = format_table(table)
    header = text.splitlines()[0]
    assert "| fd |" in header and "full_vs_cfg" in header and "effective_scale" in header
    cfg_line = next(line for line in text.splitlines() if line.startswith("| cfg | 3 "))
    assert "[" in cfg_line  # value [low, high]
    plot_curves(table, tmp_path / "curves.png")
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size[0] > 800  # two panels


def test_no_resamples_no_intervals():
    table = summarise([_row("cfg", "A", True, 0), _row("scfg-official", "A", True, 0)], resamples=0)
    assert not any(key.endswith("_ci") for row in table for key in row)
    assert np.isfinite(table[1]["full_vs_cfg"])


def test_no_distance_interval_from_fewer_images_than_twice_the_features():
    """12 images of 8 features: a resample's distinct images (about 63%, 7-8) do not span the features, the
    resampled distances are biased upwards and their interval would exclude the estimate, so none is given."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(12, 8, generator=g, dtype=torch.float64)
    rows = [_row("cfg", f"p{k}", True, k) for k in range(12)]
    table = summarise(rows, (reference, {("cfg", 5.0): reference + 1}), resamples=50)
    assert table[0]["fd"] == pytest.approx(8.0, rel=1e-9)
    assert "fd_ci" not in table[0]


def test_difference_at_matched_strength_interpolates_cfg_in_the_effective_scale():
    """CFG at g=3 right on captions 0-1 of 10 and at g=7 on 0-5; S-CFG at g=5 applied g·rate = 4 on average and is
    right on 0-4. CFG at 4, linear in g: 0.75 * 0.2 + 0.25 * 0.6 = 0.3, so the difference is 0.5 - 0.3 = 0.2 (by
    hand). A method identical to CFG at 3 with effective scale 3 differs by 0 in every paired resample: [0, 0]. An
    effective scale outside CFG's scales gets no matched difference (no extrapolation)."""
    prompts = [f"p{k}" for k in range(10)]
    rows = [_row("cfg", p, k < 2, k, scale=3.0) for k, p in enumerate(prompts)]
    rows += [_row("cfg", p, k < 6, k, scale=7.0) for k, p in enumerate(prompts)]
    rows += [_row("scfg-official", p, k < 5, k, scale=5.0, effective=4.0) for k, p in enumerate(prompts)]
    rows += [_row("scfg-paper", p, k < 2, k, scale=5.0, effective=3.0) for k, p in enumerate(prompts)]
    rows += [_row("scfg-mean", p, k < 2, k, scale=5.0, effective=9.0) for k, p in enumerate(prompts)]
    table = {row["method"]: row for row in summarise(rows, resamples=400) if row["scale"] == 5.0}
    assert table["scfg-official"]["full_vs_cfg_matched"] == pytest.approx(0.2, abs=1e-12)
    low, high = table["scfg-official"]["full_vs_cfg_matched_ci"]
    assert low < 0.2 < high  # not the paired-to-itself [0, 0]: the captions disagree
    assert table["scfg-paper"]["full_vs_cfg_matched"] == 0.0
    assert table["scfg-paper"]["full_vs_cfg_matched_ci"] == [0.0, 0.0]
    assert "full_vs_cfg_matched" not in table["scfg-mean"]
