"""The demo domain's fidelity metric (`scfg.demo.fidelity`): renderings of captions, the feature network, and the
Fréchet distance against torchmetrics' own."""

import numpy as np
import pytest
import torch

from scfg.demo.bench import held_out_prompts
from scfg.demo.data import BACKGROUNDS, COLORS, SHAPES, SceneObject, shape_mask
from scfg.demo.fidelity import (
    FeatureNet,
    features,
    frechet_distance,
    load_feature_net,
    render_caption,
    scene_labels,
    train,
)
from scfg.demo.score import score_image


def test_render_caption_draws_what_the_caption_says():
    """The exact scorer (an independent reading of the image) finds every rendering right: objects, sizes,
    relation and background, over held-out captions of both domains and several draws each."""
    rng = np.random.default_rng(0)
    captions = held_out_prompts(12) + held_out_prompts(12, backgrounds=BACKGROUNDS)
    for caption in captions:
        for _ in range(3):
            score, _ = score_image(render_caption(caption, rng), caption)
            assert score.full, caption


def test_render_caption_varies_the_layout():
    rng = np.random.default_rng(1)
    images = [render_caption("a small red circle left of a large blue square", rng) for _ in range(4)]
    assert len({image.tobytes() for image in images}) == 4


def test_scene_labels_by_hand():
    """One red circle of diameter 12 centred at (8, 30) on grass covers rows 2-13 and columns 24-35, so it touches
    the 4x4 grid's (16-px) cells (0, 1) and (0, 2) only."""
    obj = SceneObject("circle", "red", "small", (8.0, 30.0), 12, shape_mask("circle", (8.0, 30.0), 12, 64))
    labels = scene_labels([obj], "grass")
    pairs, background, cells = labels[:18], labels[18:24], labels[24:].reshape(6, 4, 4)
    assert pairs.tolist() == [1.0] + [0.0] * 17  # ("red", "circle") is the first pair
    assert background.tolist() == [0, 0, 1, 0, 0, 0]  # white, sky, grass, ...
    expected = np.zeros((6, 4, 4), np.float32)
    expected[0, 0, 1] = expected[0, 0, 2] = 1
    np.testing.assert_array_equal(cells, expected)


def _feature_sets(seed: int, n: int = 96, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    b = torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g).double() * 0.5
    return a, b + 0.3


def test_frechet_distance_is_the_mean_shift_for_equal_covariances():
    # the covariance terms cancel exactly: S + S - 2 (S S)^½ = 0 for a PSD S; float64 eigenvalues of a 16x16 product
    # are accurate to about 1e-13 of its largest, far inside 1e-9
    a, _ = _feature_sets(0)
    shift = torch.linspace(-1, 1, a.shape[1], dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_frechet_distance_matches_torchmetrics_fid():
    """torchmetrics' FrechetInceptionDistance with the network as its feature extractor, fed the images, against
    ours on the features. Both are float64 from the same float32 features; torchmetrics forms the covariance from
    running sums (`Σxxᵀ - n μμᵀ`), which loses about `|μ|² / var` times float64's 2e-16 to cancellation, so 1e-7
    relative is generous for features of order 1."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = FeatureNet(width=8, features=16).eval()
    rng = np.random.default_rng(0)
    real = np.stack([render_caption(c, rng) for c in held_out_prompts(48, backgrounds=BACKGROUNDS) * 2])
    fake = np.stack([render_caption(c, rng) for c in held_out_prompts(48) * 2])
    metric = FrechetInceptionDistance(feature=net, reset_real_features=False)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    ours = frechet_distance(features(net, real), features(net, fake))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-7)


def _swap(caption: str, words: dict[str, str]) -> str:
    return " ".join(words.get(w, w) for w in caption.split())


def test_shipped_network_sees_the_background_and_the_objects():
    """Held-out renderings on grass: two draws of the same captions (new layouts) against the same captions with
    another background, with every colour changed (red -> green -> blue -> ... cyclically), and with every shape
    changed. A Fréchet distance that only read the background would find the colour- and shape-swapped sets as close
    as a redraw; the bench needs it to see objects, so each swap must be far beyond the redraw's distance."""
    net = load_feature_net()
    rng = np.random.default_rng(5)
    captions = [f"{c} on grass" for c in held_out_prompts(96, backgrounds=None)]
    colors, shapes = list(COLORS), list(SHAPES)
    recolor = {c: colors[(k + 1) % len(colors)] for k, c in enumerate(colors)}
    reshape = {s: shapes[(k + 1) % len(shapes)] for k, s in enumerate(shapes)}

    def fd_to(other: list[str]) -> float:
        return frechet_distance(base, features(net, np.stack([render_caption(c, rng) for c in other])))

    base = features(net, np.stack([render_caption(c, rng) for c in captions]))
    same = fd_to(captions)
    assert fd_to([c.replace("on grass", "on sky") for c in captions]) > 5 * same
    assert fd_to([_swap(c, recolor) for c in captions]) > 3 * same
    assert fd_to([_swap(c, reshape) for c in captions]) > 1.5 * same
    sky = np.stack([render_caption(c.replace("on grass", "on sky"), rng) for c in captions[:32]])
    with torch.no_grad():
        logits = net.heads(net(torch.from_numpy(sky).permute(0, 3, 1, 2)))
    assert (logits[:, 18:24].argmax(1) == 1).float().mean() >= 0.95  # class 1: sky


def test_train_saves_a_network_that_loads_back(tmp_path):
    card = train(tmp_path / "net", steps=3, batch=8, images=32, held_out=16)
    assert set(card["held_out"]) == {"objects_exact", "background", "cells"}
    net = load_feature_net(tmp_path / "net")
    images = torch.from_numpy(np.stack([render_caption("a red circle", np.random.default_rng(0))])).permute(0, 3, 1, 2)
    assert features(net, images).shape == (1, 64)


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m scfg\.demo\.fidelity --train"):
        load_feature_net(tmp_path)
