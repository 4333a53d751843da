"""PNG metadata: `parameters` holds A1111 infotext that image browsers read, `scfg` the full JSON; both read back."""

from __future__ import annotations

import json

from PIL import Image

from scfg import SCFGConfig, __version__
from scfg.cli import _png_info, main


def metadata(**overrides):
    values = {
        "prompt": "a red cat, on a sofa",
        "negative_prompt": "blurry",
        "model": "org/model",
        "model_name": "org/model",
        "guidance": "scfg",
        "guidance_scale": 7.5,
        "num_inference_steps": 30,
        "scheduler": None,
        "sampler": "DDIM",
        "seed": 0,
        "height": 64,
        "width": 96,
        "scfg_config": SCFGConfig.preset(
            "official", levels=(1, 2), rate_clamp=(0.8, 3.0), max_effective_scale=15.0
        ).to_dict(),
        "scfg_version": __version__,
    }
    return {**values, **overrides}


def written(tmp_path, meta):
    path = tmp_path / "x.png"
    Image.new("RGB", (96, 64)).save(path, pnginfo=_png_info(meta))
    return Image.open(path).text


def test_png_metadata_round_trips_as_infotext_and_json(tmp_path):
    meta = metadata()
    info = written(tmp_path, meta)
    assert json.loads(info["scfg"]) == meta
    prompt, negative, settings = info["parameters"].split("\n")
    assert prompt == "a red cat, on a sofa"  # the prompt line is never quoted
    assert negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 96x64, Model: org/model, ")
    fields = settings.split(", S-CFG")
    assert fields[1] == ": official"
    assert ' levels: "1, 2"' in fields  # a value with a comma is quoted, as A1111 does
    assert " rate clamp: 0.8-3.0" in fields and " max effective scale: 15.0" in fields
    assert fields[-1] == f" version: {__version__}"


def test_infotext_leaves_out_what_is_unknown(tmp_path):
    meta = metadata(negative_prompt=None, sampler=None, model_name="my, model", scfg_config=None, guidance="cfg")
    info = written(tmp_path, meta)
    assert json.loads(info["scfg"]) == meta
    prompt, settings = info["parameters"].split("\n")
    assert prompt == "a red cat, on a sofa"
    assert (
        settings
        == f'Steps: 30, CFG scale: 7.5, Seed: 0, Size: 96x64, Model: "my, model", S-CFG: off, S-CFG version: {__version__}'
    )


def test_generate_writes_infotext_and_the_resolved_config(tiny_sd_path, tmp_path):
    out = tmp_path / "a.png"
    argv = [
        "generate",
        "a red cat:1.5",
        "--model",
        str(tiny_sd_path),
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    assert main([*argv, "--negative-prompt", "blue", "--scheduler", "dpm++-karras", "--preset", "paper"]) == 0
    info = Image.open(out).text
    data = json.loads(info["scfg"])
    assert SCFGConfig.from_dict(data["scfg_config"]).preset_name == "paper"
    assert "auto" not in data["scfg_config"].values()  # resolved for the model's family, as used
    lines = info["parameters"].split("\n")
    assert lines[:2] == ["a red cat:1.5", "Negative prompt: blue"]
    size = "x".join(str(side) for side in Image.open(out).size)
    assert lines[2].startswith(
        f"Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3, Size: {size}, Model: {tiny_sd_path.name}, "
        "S-CFG: paper, "
    )
    assert ", S-CFG completion: power_mean, " in lines[2] and ", S-CFG rate clamp: none, " in lines[2]
    assert data["width"] == Image.open(out).width and data["sampler"] == "DPM++ 2M Karras"
