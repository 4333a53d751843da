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
