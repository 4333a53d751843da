"""The demo model shipped in the package: checksums, the real loading path, a short S-CFG generation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import scfg
from scfg.demo import shipped_model_path

MODEL = shipped_model_path()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the demo model is not installed")


def test_weights_match_recorded_checksums():
    folder = Path(MODEL)
    lines = (folder / "CHECKSUMS.sha256").read_text().split("\n")
    recorded = dict(reversed(line.split("  ", 1)) for line in lines if line.strip())
    assert any(name.endswith(".safetensors") for name in recorded)
    for name, digest in recorded.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def test_folder_is_small_and_safetensors_only():
    files = [p for p in Path(MODEL).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    card = (Path(MODEL) / "README.md").read_text()
    assert "Licence" in card and "Training" in card


def test_loads_with_from_pretrained_and_generates_with_scfg():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        image = pipe(
            "a large red circle",
            num_inference_steps=6,
            guidance_scale=5.0,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert len(recorder.steps) == 6 and recorder.steps[0].token_masks.shape[-2:] == (8, 8)
    state = json.loads((Path(MODEL) / "training_state.json").read_text())
    assert state["step"] > 0


def test_cli_uses_the_shipped_model_by_default(tmp_path):
    from PIL import Image

    from scfg.cli import main

    assert main(["generate", "a small blue square", "--steps", "4", "--out", str(tmp_path / "x.png")]) == 0
    assert Image.open(tmp_path / "x.png").size == (64, 64)
