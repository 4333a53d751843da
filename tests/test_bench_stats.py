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
    distance D (= 8) with any caption left out (a shift moves the means only)."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(16, 8, generator=g, dtype=torch.float64)
    rows = []
    for method in ("cfg", "scfg-official"):
        rows += [_row(method, f"p{k // 2}", True, k) for k in range(16)]
    fidelity = (reference, {("cfg", 5.0): reference.clone(), ("scfg-official", 5.0): reference + 1})
    table = {row["method"]: row for row in summarise(rows, fidelity, resamples=50)}
    assert table["cfg"]["fd"] == pytest.approx(0.0, abs=1e-9)
    assert table["scfg-official"]["fd"] == pytest.approx(8.0, rel=1e-9)
    # every left-out set (14 rows, 8 features) gives 8 up to rounding (1e-9 above), so the jackknife's se is ~0
    assert table["scfg-official"]["fd_ci"] == pytest.approx([8.0, 8.0], abs=1e-6)
    assert table["scfg-official"]["fd_vs_cfg"] == pytest.approx(8.0, rel=1e-9)


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


def test_no_distance_interval_where_a_left_out_set_does_not_span_the_features():
    """9 images of 8 features, one per caption: leaving one out leaves 8 images, whose covariance (rank 7 at most)
    is singular, so no interval is given."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(9, 8, generator=g, dtype=torch.float64)
    rows = [_row("cfg", f"p{k}", True, k) for k in range(9)]
    table = summarise(rows, (reference, {("cfg", 5.0): reference + 1}), resamples=50)
    assert table[0]["fd"] == pytest.approx(8.0, rel=1e-9)
    assert "fd_ci" not in table[0]


def _fd_1d(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two 1-D Gaussians, in closed form: (mu_a - mu_b)^2 + (sd_a - sd_b)^2."""
    return (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2


def test_distance_interval_is_the_jackknife_over_captions():
    """1-D features, 10 captions of 2 images: the interval against a jackknife written out here with the closed-form
    1-D distance (each caption's two images left out of both sets), and the paired difference to CFG's likewise.
    Both sides are float64 sums of 20 terms: 1e-9 is far above their rounding and far below any formula slip."""
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(20, 1))
    fake = {("cfg", 5.0): rng.normal(0.3, 1.5, size=(20, 1)), ("scfg-official", 5.0): rng.normal(0.1, 1.2, (20, 1))}
    rows = [_row(m, f"p{k // 2}", True, k) for m in ("cfg", "scfg-official") for k in range(20)]
    torch_fake = {key: torch.from_numpy(v) for key, v in fake.items()}
    table = {row["method"]: row for row in summarise(rows, (torch.from_numpy(reference), torch_fake), resamples=20)}

    def jackknife(values: np.ndarray) -> float:
        return float(np.sqrt((len(values) - 1) / len(values) * ((values - values.mean()) ** 2).sum()))

    leave_out = {}
    for key, generated in fake.items():
        keep = [np.r_[0 : 2 * k, 2 * k + 2 : 20] for k in range(10)]
        leave_out[key] = np.array([_fd_1d(generated[i, 0], reference[i, 0]) for i in keep])
        estimate = _fd_1d(generated[:, 0], reference[:, 0])
        se = jackknife(leave_out[key])
        assert table[key[0]]["fd"] == pytest.approx(estimate, abs=1e-9)
        assert table[key[0]]["fd_ci"] == pytest.approx([estimate - 1.96 * se, estimate + 1.96 * se], abs=1e-9)
    difference = table["scfg-official"]["fd"] - table["cfg"]["fd"]
    se = jackknife(leave_out[("scfg-official", 5.0)] - leave_out[("cfg", 5.0)])
    assert table["scfg-official"]["fd_vs_cfg"] == pytest.approx(difference, abs=1e-9)
    assert table["scfg-official"]["fd_vs_cfg_ci"] == pytest.approx([difference - 1.96 * se, difference + 1.96 * se])
    assert "fd_vs_cfg" not in table["cfg"]


def test_distance_interval_is_not_narrower_than_the_spread_over_fresh_draws():
    """The bench's regime (3 images per caption, a few times more images than features) in small: 48 captions x 3
    images of 16 Gaussian features against a fixed reference. Over 100 fresh draws, the mean jackknife half-width
    / 1.96 against the standard deviation of the distance itself. Efron-Stein: the jackknife variance is at least
    the true variance in expectation, so the ratio is >= 1 up to the noise of a standard deviation from 100 draws
    (relative error about 1 / sqrt(2 x 100) = 7%; three of those: 0.8); above 2 would mean a misscaled se (a
    missing (n - 1) factor is sqrt(47) ~ 7x off). A percentile bootstrap fails the other way: its interval misses
    the estimate."""
    rng = np.random.default_rng(0)
    reference = torch.from_numpy(rng.normal(size=(144, 16)))
    distances, half_widths = [], []
    for _ in range(100):
        generated = torch.from_numpy(rng.normal(0.2, 1.1, size=(144, 16)))
        rows = [_row("cfg", f"p{k // 3}", True, k) for k in range(144)]
        (row,) = summarise(rows, (reference, {("cfg", 5.0): generated}), resamples=1)
        assert row["fd_ci"][0] < row["fd"] < row["fd_ci"][1]
        distances.append(row["fd"])
        half_widths.append((row["fd_ci"][1] - row["fd_ci"][0]) / 2)
    ratio = np.mean(half_widths) / 1.96 / np.std(distances, ddof=1)
    assert 0.8 <= ratio <= 2.0


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
