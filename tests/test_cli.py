"""The `scfg` CLI end to end on a tiny local model folder."""

from __future__ import annotations

import json

from PIL import Image

from scfg.cli import build_parser, config_from_args, main


def test_generate_writes_png_with_parameters(tiny_sd_path, tmp_path):
    out = tmp_path / "gen"
    argv = [
        "generate",
        "a red cat",
        "--model",
        str(tiny_sd_path),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "96",
        "--scheduler",
        "dpm++",
        "--seed",
        "3",
        "--out",
        str(out),
        "--preset",
        "paper",
        "--levels",
        "4",
    ]
    assert main(argv) == 0
    image = Image.open(out / "scfg-seed3-0.png")
    assert image.size == (96, 64)
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "a red cat" and params["seed"] == 3 and params["scheduler"] == "dpm++"
    assert params["scfg_config"]["completion"] == "power_mean" and params["scfg_config"]["levels"] == [4]
    # never overwrites without --overwrite
    assert main(argv) == 2
    assert main([*argv, "--overwrite"]) == 0


def test_compare_writes_side_by_side_panel(tiny_sd_path, tmp_path):
    out = tmp_path / "cmp.png"
    argv = [
        "compare",
        "--prompt",
        "a blue dog",
        "--model",
        str(tiny_sd_path),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        str(out),
        "--negative-prompt",
        "red",
    ]
    assert main(argv) == 0
    panel = Image.open(out)
    assert panel.width >= 3 * 192  # CFG | S-CFG | regions
    assert json.loads(panel.text["parameters"])["guidance"] == "compare"


def test_plain_cfg_generation(tiny_sd_path, tmp_path):
    argv = [
        "generate",
        "a cat",
        "--model",
        str(tiny_sd_path),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--guidance",
        "cfg",
        "--out",
        str(tmp_path / "one.png"),
    ]
    assert main(argv) == 0
    assert json.loads(Image.open(tmp_path / "one.png").text["parameters"])["scfg_config"] is None


def test_config_flags_are_generated_from_fields():
    args = build_parser().parse_args(
        [
            "generate",
            "x",
            "--rate-clamp",
            "0.5",
            "2",
            "--tie-break",
            "first",
            "--max-effective-scale",
            "none",
            "--start-fraction",
            "0.2",
        ]
    )
    config = config_from_args(args)
    assert config.rate_clamp == (0.5, 2.0) and config.tie_break == "first"
    assert config.max_effective_scale is None and config.start_fraction == 0.2


def test_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_missing_prompt_is_a_clear_error(tiny_sd_path, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_sd_path), "--out", str(tmp_path / "o")]) == 2
    assert "Expected a prompt" in capsys.readouterr().err


def test_invalid_knob_names_the_field(tiny_sd_path, tmp_path, capsys):
    argv = ["generate", "x", "--model", str(tiny_sd_path), "--rate-clamp", "3", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "`rate_clamp`" in capsys.readouterr().err


def test_compare_show_regions_writes_steps_and_curves(tiny_sd_path, tmp_path):
    out = tmp_path / "c.png"
    argv = [
        "compare",
        "a red cat:1.5",
        "--model",
        str(tiny_sd_path),
        "--steps",
        "3",
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        str(out),
        "--show-regions",
    ]
    assert main(argv) == 0
    assert Image.open(tmp_path / "c-steps.gif").n_frames == 3
    assert (tmp_path / "c-steps.png").exists() and (tmp_path / "c-rates.png").exists()
