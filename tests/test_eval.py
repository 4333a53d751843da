"""The evaluation harness end to end, offline: prompts, resumable generation, 2 processes, FID/CLIP, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from conftest import tiny_clip_text_config

from scfg import SCFGError
from scfg.eval.prompts import load_prompts
from scfg.eval.runner import plan_jobs, read_manifest

PROMPTS = ["a red cat", "a blue dog on the sofa", "a green square"]


def write_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"caption": p}) + "\n" for p in PROMPTS))
    return path


def test_load_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,a dog\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.csv")) == ["a cat", "a dog"]
    assert load_prompts(str(write_prompts(tmp_path)), limit=2) == PROMPTS[:2]
    assert len(load_prompts("builtin:compositional", limit=8)) == 8
    (tmp_path / "bad.jsonl").write_text('{"url": "x"}\n')
    with pytest.raises(SCFGError, match="line 1"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_seeds_depend_only_on_prompt_and_index():
    jobs = plan_jobs(PROMPTS, ["cfg", "scfg-official"], [3.0, 7.5], 2)
    assert len(jobs) == 3 * 2 * 2 * 2 and len({j.relpath for j in jobs}) == len(jobs)
    seeds = {(j.prompt_index, j.image_index): set() for j in jobs}
    for j in jobs:
        seeds[(j.prompt_index, j.image_index)].add(j.seed)
    assert all(len(s) == 1 for s in seeds.values())


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "scfg.cli", *args], capture_output=True, text=True, env=env)


def generate_args(model, prompts, run, steps=2):
    return [
        "eval",
        "generate",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--methods",
        "cfg",
        "scfg-official",
        "--scales",
        "3",
        "7.5",
        "--steps",
        str(steps),
        "--height",
        "64",
        "--width",
        "64",
        "--batch-size",
        "1",
        "--out",
        str(run),
    ]


def test_generation_resumes_after_kill_and_reruns_nothing(tiny_sd_path, tmp_path):
    prompts, run = write_prompts(tmp_path), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scfg.cli", *generate_args(tiny_sd_path, prompts, run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = run / "manifest-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_manifest(manifest)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_manifest(manifest))
    assert 2 <= partial < 12
    result = cli(*generate_args(tiny_sd_path, prompts, run, 8), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_manifest(run / "manifest.jsonl")
    assert len(rows) == 12 and len({r["path"] for r in rows}) == 12
    assert all((run / r["path"]).exists() for r in rows)
    stamp = (run / rows[0]["path"]).stat().st_mtime
    assert cli(*generate_args(tiny_sd_path, prompts, run, 8), env=env).returncode == 0
    assert (run / rows[0]["path"]).stat().st_mtime == stamp  # nothing regenerated
    assert len(read_manifest(run / "manifest.jsonl")) == 12
    scfg_row = next(r for r in rows if r["method"] == "scfg-official")
    assert scfg_row["effective_scale"] > 0 and scfg_row["spread_before"] is not None
    cfg_row = next(r for r in rows if r["method"] == "cfg")
    assert cfg_row["effective_scale"] == cfg_row["scale"]


def test_two_processes_split_the_work(tiny_sd_path, tmp_path):
    prompts, run = write_prompts(tmp_path), tmp_path / "run2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # torchrun starts 2 gloo processes; accelerate's PartialState splits the jobs between them
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "scfg.cli",
            *generate_args(tiny_sd_path, prompts, run),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [read_manifest(run / f"manifest-{r}.jsonl") for r in range(2)]
    assert all(per_rank)  # both processes worked
    rows = read_manifest(run / "manifest.jsonl")
    counts = Counter((r["prompt_index"], r["image_index"], r["method"], r["scale"]) for r in rows)
    assert len(counts) == 12 and set(counts.values()) == {1}


class TinyFeatures(torch.nn.Module):
    """Stands in for Inception: uint8 images -> 8 features."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    def forward(self, x):
        return self.net(x.float() / 255)


def tiny_clip(folder):
    from conftest import write_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tokenizer(str(folder / "tok"))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tok"))
    config = CLIPConfig(
        text_config={**tiny_clip_text_config(tokenizer), "num_hidden_layers": 1},
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder / "clip"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(str(folder / "clip"))
    return str(folder / "clip")


def test_metrics_and_report(tiny_sd_path, tmp_path):
    from PIL import Image

    from scfg.eval.metrics import clip_scores, fid, reference_stats
    from scfg.eval.report import build_report

    prompts, run = write_prompts(tmp_path), tmp_path / "run3"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert cli(*generate_args(tiny_sd_path, prompts, run), env=env).returncode == 0
    reference = tmp_path / "ref"
    reference.mkdir()
    for i in range(6):
        Image.effect_noise((64, 64), 40 + i).convert("RGB").save(reference / f"{i}.png")
    features = TinyFeatures()
    reference_stats(reference, tmp_path / "ref.npz", feature=features, size=64)
    rows = read_manifest(run / "manifest.jsonl")
    paths = [run / r["path"] for r in rows[:6]]
    from_folder = fid(paths, reference, feature=features, size=64)
    from_stats = fid(paths, tmp_path / "ref.npz", feature=features, size=64)
    # the .npz holds the float64 mean and covariance that the folder's features give, accumulated the same way in
    # the same order: the two FIDs are the same computation, bit for bit
    assert from_folder == from_stats and from_folder > 0
    clip_model = tiny_clip(tmp_path)
    scores = clip_scores(paths[:2], [r["prompt"] for r in rows[:2]], clip_model)
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    table = build_report(
        run,
        lambda p: fid(p, tmp_path / "ref.npz", feature=features, size=64),
        lambda p, t: clip_scores(p, t, clip_model),
    )
    assert {(e["method"], e["scale"]) for e in table} == {(m, s) for m in ("cfg", "scfg-official") for s in (3, 7.5)}
    cfg_rows = {e["scale"]: e for e in table if e["method"] == "cfg"}
    for entry in (e for e in table if e["method"] == "scfg-official"):
        # each S-CFG row is matched to the CFG scale nearest its effective scale, and carries that row's metrics
        nearest = min(cfg_rows, key=lambda s: abs(s - entry["effective_scale"]))
        assert entry["matched_cfg_scale"] == nearest
        assert entry["matched_cfg_fid"] == cfg_rows[nearest]["fid"]
        assert entry["matched_cfg_clip"] == cfg_rows[nearest]["clip"]
    for name in ("report.json", "report.csv", "plots.png", "grid.png"):
        assert (run / name).exists()


def _write_rendered_run(run, prompts, seeds, layout_seeds, method, scale=5.0):
    """A run folder as `scfg eval generate` leaves it, whose images are renderings of the captions (laid out from
    `layout_seeds`) recorded under `seeds`: where the two agree the images are the reference itself."""
    import numpy as np
    from PIL import Image

    from scfg.demo.fidelity import render_caption

    rows = []
    for index, (prompt, seed, layout) in enumerate(zip(prompts, seeds, layout_seeds, strict=True)):
        path = f"images/{method}/g{scale:g}/{index:05d}_0.png"
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_caption(prompt, np.random.default_rng(layout))).save(run / path)
        rows.append(
            {"prompt_index": index, "image_index": 0, "prompt": prompt, "seed": seed, "method": method}
            | {"scale": scale, "path": path, "effective_scale": scale}
        )
    with (run / "manifest.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_demo_metrics_report_the_domains_fd_and_exact_scores(tmp_path):
    """`scfg eval report --demo-metrics` on images that are renderings of their captions: the exact scorer finds
    everything (it is exact on rendered ground truth), and the distance is 0 where each image is its own reference
    (same caption, same layout seed) and the distance of the other layouts' features where it is not."""
    import numpy as np

    from scfg.demo.bench import held_out_prompts
    from scfg.demo.data import BACKGROUNDS
    from scfg.demo.fidelity import features, frechet_distance, load_feature_net, render_caption
    from scfg.eval.metrics import demo_metrics, load_images
    from scfg.eval.report import build_report

    prompts = held_out_prompts(12, backgrounds=tuple(BACKGROUNDS))
    seeds = list(range(100, 112))
    run = tmp_path / "run"
    run.mkdir()
    _write_rendered_run(run, prompts, seeds, seeds, "cfg")
    _write_rendered_run(run, prompts, seeds, [s + 1000 for s in seeds], "scfg-official")
    with pytest.warns(UserWarning, match="12 images of 64 features.*biased upwards"):  # 12 < 2 x 64
        table = {e["method"]: e for e in build_report(run, demo_fn=demo_metrics)}
    for entry in table.values():
        assert entry["full"] == entry["color"] == entry["shape"] == entry["background"] == entry["relation"] == 1.0
    net = load_feature_net()
    renderings = [render_caption(p, np.random.default_rng(s)) for p, s in zip(prompts, seeds, strict=True)]
    reference = features(net, np.stack(renderings))
    # identical feature sets: the means cancel exactly and tr(S + S - 2 (S S)^1/2) = 2 tr S - 2 sum sqrt(eig(S S));
    # the eigenvalues of S S carry an absolute error of about D eps |S|^2 (D = 64 features), so each square root of
    # a (near-)zero one is off by up to sqrt(D eps) |S|: the sum by at most 2 D sqrt(D eps) |S|
    spectral = float(torch.linalg.matrix_norm(torch.cov(reference.T), ord=2))
    d = reference.shape[1]
    assert abs(table["cfg"]["fd"]) <= 2 * d * (d * torch.finfo(torch.float64).eps) ** 0.5 * spectral
    other = sorted(run.glob("images/scfg-official/g5/*.png"))
    expected = frechet_distance(features(net, load_images(other)), reference)
    assert expected > 1.0 and table["scfg-official"]["fd"] == expected  # the same computation on the same images
    assert table["scfg-official"]["matched_cfg_fd"] == table["cfg"]["fd"]
    assert (run / "plots.png").exists()


def test_demo_metrics_refuse_images_of_another_size(tmp_path):
    from PIL import Image

    from scfg.eval.metrics import demo_metrics

    Image.new("RGB", (128, 128), "white").save(tmp_path / "big.png")
    with pytest.raises(SCFGError, match=r"64x64.*128x128"):
        demo_metrics([tmp_path / "big.png"], ["a small red circle"], [0])


def test_demo_metrics_refuse_captions_outside_the_domain(tmp_path):
    from scfg.eval.metrics import demo_metrics
    from scfg.eval.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    _write_rendered_run(run, ["a small red circle"], [0], [0], "cfg")
    rows = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    rows[0]["prompt"] = "a red cat"
    (run / "manifest.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SCFGError, match=r"builtin:compositional.*'a red cat'"):
        build_report(run, demo_fn=demo_metrics)


def test_eval_generate_on_a_scenes_model_uses_its_captions_and_levels(tiny_demo_path, tmp_path, monkeypatch):
    """A model folder exported by the `scenes` recipe: `builtin:compositional` names a background in every caption
    and every method runs at the folder's `scfg_levels`, as `generate`/`compare` do."""
    import shutil

    import scfg.eval.runner as runner
    from scfg.cli import main
    from scfg.demo.data import BACKGROUNDS

    model = tmp_path / "scenes-model"
    shutil.copytree(tiny_demo_path, model)
    (model / "training_state.json").write_text(json.dumps({"recipe": "scenes", "scfg_levels": [4]}))
    seen = []
    real_enable = runner.enable

    def spy(pipe, config, **kwargs):
        seen.append(config.levels)
        return real_enable(pipe, config, **kwargs)

    monkeypatch.setattr(runner, "enable", spy)
    run = tmp_path / "run"
    args = ["eval", "generate", "--model", str(model), "--prompts", "builtin:compositional", "--limit", "2"]
    assert main([*args, "--scales", "3", "--steps", "2", "--out", str(run)]) == 0
    rows = read_manifest(run / "manifest.jsonl")
    assert len(rows) == 4 and all(r["prompt"].rsplit(" on ", 1)[-1] in BACKGROUNDS for r in rows)
    assert seen and all(levels == (4,) for levels in seen)  # not the presets' AUTO
