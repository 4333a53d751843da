"""The `scfg` CLI end to end on a tiny local model folder."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from scfg import SCFGError, cli
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
    params = json.loads(image.text["scfg"])  # the full JSON; `parameters` is A1111 infotext (test_metadata.py)
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
    assert json.loads(panel.text["scfg"])["guidance"] == "compare"
    assert "S-CFG panel: CFG | S-CFG | regions" in panel.text["parameters"].splitlines()[-1]


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
    image = Image.open(tmp_path / "one.png")
    assert json.loads(image.text["scfg"])["scfg_config"] is None
    assert ", S-CFG: off, " in image.text["parameters"]


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
    assert "`--rate-clamp`" in capsys.readouterr().err  # the flag, not the field


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


# -- bad input: one `error:` line naming the flag, a non-zero exit, nothing created or overwritten -----------------


class StubPipe:
    """Stands in for a loaded pipeline: returns `num_images_per_prompt` tiny images, or raises `error`."""

    def __init__(self, error: BaseException | None = None, vae_scale_factor: int = 8, on_call=None):
        self.error, self.vae_scale_factor, self.on_call, self.calls = error, vae_scale_factor, on_call, 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, **kwargs):
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        if self.error is not None:
            raise self.error
        return SimpleNamespace(images=[Image.new("RGB", (16, 16)) for _ in range(kwargs["num_images_per_prompt"])])


@pytest.fixture
def stub_pipe(monkeypatch):
    """Replace model loading by a `StubPipe` (set its attributes in the test); records the loads."""
    pipe = StubPipe()
    loads = []

    def load(model, device=None, dtype=None):
        loads.append(model)
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load)
    pipe.loads = loads
    return pipe


def one_error_line(capsys, argv, code, *needles):
    """Run `main(argv)`; assert the exit code and that stderr is one `error:` line containing `needles`."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "-3"], "--steps"),
        (["--scale", "inf"], "--scale"),
        (["--scale", "nan"], "--scale"),
        (["--scale", "-inf"], "--scale"),
        (["--num-images", "0"], "--num-images"),
        (["--height", "7"], "--height"),
        (["--height", "0"], "--height"),
        (["--width", "-8"], "--width"),
        (["--width", "100"], "--width"),
        (["--seed", str(2**64)], "--seed"),
        (["--device", "gpu"], "--device"),
        (["--device", "meta"], "--device"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "compare"])
def test_bad_generation_flags_fail_before_anything_is_loaded_or_created(
    command, flags, needle, tmp_path, capsys, stub_pipe
):
    out = tmp_path / "out"
    one_error_line(capsys, [command, "a red circle", *flags, "--out", str(out)], 2, needle)
    assert not out.exists() and stub_pipe.loads == []


def test_cuda_without_cuda_says_so(tmp_path, capsys, monkeypatch, stub_pipe):
    import torch

    def unavailable():
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    out = tmp_path / "out"
    line = one_error_line(capsys, ["generate", "x", "--device", "cuda", "--out", str(out)], 2, "--device")
    assert "no cuda device" in line and "--device cpu" in line
    assert not out.exists() and stub_pipe.loads == []


def test_size_is_checked_against_the_models_vae_factor_before_any_output(tmp_path, capsys, stub_pipe):
    stub_pipe.vae_scale_factor = 16
    out = tmp_path / "out"
    line = one_error_line(capsys, ["generate", "x", "--height", "24", "--out", str(out)], 2, "--height", "16")
    assert "--height 32" in line or "--height 16" in line
    assert stub_pipe.loads and stub_pipe.calls == 0 and not out.exists()
    # a multiple of the factor passes
    assert main(["generate", "x", "--height", "32", "--width", "48", "--out", str(out), "--guidance", "cfg"]) == 0
    assert (out / "cfg-seed0-0.png").exists()


@pytest.mark.parametrize("out", ["afile/x.png", "afile/folder", "afile/deeper/x.png"])
def test_out_under_a_file_fails_before_loading(out, tmp_path, capsys, stub_pipe):
    (tmp_path / "afile").write_text("keep")
    one_error_line(capsys, ["generate", "x", "--out", str(tmp_path / out)], 2, "--out", "is a file")
    assert (tmp_path / "afile").read_text() == "keep" and stub_pipe.loads == []


def test_out_in_a_read_only_folder_fails_before_loading(tmp_path, capsys, monkeypatch, stub_pipe):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: emulate what any other user sees
        real_access = os.access

        def access(path, mode):
            return real_access(path, mode) and not (Path(path) == locked and mode & os.W_OK)

        monkeypatch.setattr(os, "access", access)
    try:
        one_error_line(capsys, ["generate", "x", "--out", str(locked / "sub")], 2, "--out", "not")
        one_error_line(capsys, ["generate", "x", "--out", str(locked / "a" / "b.png")], 2, "--out", "not")
        assert list(locked.iterdir()) == [] and stub_pipe.loads == []
    finally:
        locked.chmod(0o755)


def test_output_folder_is_created_only_once_images_exist(tmp_path, capsys, stub_pipe):
    stub_pipe.error = RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
    out = tmp_path / "new" / "sub"
    line = one_error_line(capsys, ["generate", "x", "--guidance", "cfg", "--out", str(out)], 1, "RuntimeError")
    assert "CUDA out of memory. Tried to allocate" in line
    assert not (tmp_path / "new").exists()
    stub_pipe.error = None
    assert main(["generate", "x", "--guidance", "cfg", "--num-images", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg-seed0-0.png", "cfg-seed0-1.png"]


def test_file_appearing_while_generating_is_not_overwritten(tmp_path, capsys, stub_pipe):
    out = tmp_path / "x.png"

    def write_meanwhile():
        out.write_text("someone else's")

    stub_pipe.on_call = write_meanwhile
    one_error_line(capsys, ["generate", "x", "--guidance", "cfg", "--out", str(out)], 2, "--overwrite")
    assert out.read_text() == "someone else's"
    assert main(["generate", "x", "--guidance", "cfg", "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).size == (16, 16)


def test_rate_clamp_with_none_points_to_no_rate_clamp(tmp_path, capsys):
    out = tmp_path / "out"
    one_error_line(capsys, ["generate", "x", "--rate-clamp", "0.8", "none", "--out", str(out)], 2, "--no-rate-clamp")
    assert not out.exists()
    assert config_from_args(build_parser().parse_args(["generate", "x", "--no-rate-clamp"])).rate_clamp is None


@pytest.mark.parametrize("flag", ["--layers-per-stack", "--layers-per-level"])
def test_optional_int_knobs_accept_none(flag, tmp_path, capsys):
    dest = "cfg_" + flag[2:].replace("-", "_")
    assert getattr(build_parser().parse_args(["generate", "x", flag, "none"]), dest) is None
    assert getattr(build_parser().parse_args(["generate", "x", flag, "2"]), dest) == 2
    config = config_from_args(build_parser().parse_args(["generate", "x", flag, "None"]))
    assert getattr(config, dest[4:]) is None
    out = tmp_path / "out"
    one_error_line(capsys, ["generate", "x", flag, "two", "--out", str(out)], 2, flag, "integer or none")
    one_error_line(capsys, ["generate", "x", flag, "0", "--out", str(out)], 2, flag)
    assert not out.exists()


def test_show_regions_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch, stub_pipe):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "c.png"
    line = one_error_line(capsys, ["compare", "x", "--show-regions", "--out", str(out)], 2, "--show-regions")
    assert 'pip install "semantic-cfg[viz]"' in line
    assert not out.exists() and stub_pipe.loads == []


@pytest.mark.parametrize("suffix", ["-rates.png", "-steps.png", "-steps.gif"])
def test_compare_show_regions_never_overwrites_its_companion_files(suffix, tmp_path, capsys, stub_pipe):
    existing = tmp_path / f"c{suffix}"
    existing.write_text("keep")
    argv = ["compare", "x", "--show-regions", "--out", str(tmp_path / "c.png")]
    one_error_line(capsys, argv, 2, "--overwrite", str(existing))
    assert existing.read_text() == "keep" and not (tmp_path / "c.png").exists() and stub_pipe.loads == []


@pytest.mark.parametrize(
    ("argv", "needle", "see"),
    [
        (["generate", "x", "--steps", "abc"], "--steps", "scfg generate --help"),
        (["generate", "x", "--bogus"], "--bogus", "scfg generate --help"),
        (["generate", "x", "--scheduler", "nope"], "--scheduler", "scfg generate --help"),
        (["compare", "x", "--rate-clamp", "1"], "--rate-clamp", "scfg compare --help"),
        (["eval", "generate", "--prompts", "p.txt"], "--out", "scfg eval generate --help"),
        (["frobnicate"], "frobnicate", "scfg --help"),
        ([], "command", "scfg --help"),
    ],
)
def test_argparse_errors_are_one_line(argv, needle, see, capsys):
    line = one_error_line(capsys, argv, 2, needle)
    assert line.endswith(f"(see {see})")


def test_help_still_works(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: scfg generate") and "--layers-per-stack" in out and "none for None" in out


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), RuntimeError("Expected all tensors on the same device")]
)
def test_unexpected_errors_are_one_line_and_exit_1(error, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "load_pipeline", load)
    line = one_error_line(capsys, ["generate", "x", "--out", str(tmp_path / "o")], 1, type(error).__name__)
    assert str(error) in line and "-v" in line
    assert not (tmp_path / "o").exists()


def test_verbose_logs_the_traceback(tmp_path, capsys, caplog, stub_pipe):
    stub_pipe.error = RuntimeError("boom")
    argv = ["generate", "x", "--guidance", "cfg", "--out", str(tmp_path / "o")]
    with caplog.at_level(logging.INFO):
        one_error_line(capsys, argv, 1, "RuntimeError: boom")
        assert not [r for r in caplog.records if r.exc_info]
        assert main(["-v", *argv]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: RuntimeError: boom"
    assert [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]


def test_keyboard_interrupt_is_one_line_and_exit_130(tmp_path, capsys, stub_pipe):
    stub_pipe.error = KeyboardInterrupt()
    out = tmp_path / "o"
    one_error_line(capsys, ["generate", "x", "--guidance", "cfg", "--out", str(out)], 130, "interrupted")
    assert not out.exists()


def test_missing_model_without_demo_is_one_line(tmp_path, capsys, monkeypatch):
    def no_demo_model():
        return None

    monkeypatch.setattr(cli, "default_model", no_demo_model)
    one_error_line(capsys, ["generate", "x", "--out", str(tmp_path / "o")], 2, "--model")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--steps", "0"], "--steps"),
        (["--scales", "3", "inf"], "--scales"),
        (["--scales", "nan"], "--scales"),
        (["--batch-size", "0"], "--batch-size"),
        (["--images-per-prompt", "0"], "--images-per-prompt"),
        (["--limit", "0"], "--limit"),
        (["--height", "30"], "--height"),
        (["--device", "gpu"], "--device"),
        (["--prompts", "missing.txt"], "--prompts"),
    ],
)
def test_eval_generate_validates_before_loading(flags, needle, tmp_path, capsys, stub_pipe):
    run = tmp_path / "run"
    argv = ["eval", "generate", "--prompts", "builtin:compositional", "--out", str(run), *flags]
    one_error_line(capsys, argv, 2, needle)
    assert not run.exists() and stub_pipe.loads == []


def test_eval_generate_run_under_a_file_fails_before_loading(tmp_path, capsys, stub_pipe):
    (tmp_path / "afile").write_text("keep")
    argv = ["eval", "generate", "--prompts", "builtin:compositional", "--out", str(tmp_path / "afile" / "run")]
    one_error_line(capsys, argv, 2, "--out", "is a file")
    assert stub_pipe.loads == []


def test_eval_report_rejects_a_zero_fid_size(tmp_path, capsys):
    one_error_line(capsys, ["eval", "report", "--out", str(tmp_path), "--fid-size", "0"], 2, "--fid-size")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--prompts", "0"], "--prompts"),
        (["--seeds", "0"], "--seeds"),
        (["--steps", "-1"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--scales", "5", "nan"], "--scales"),
        (["--device", "gpu"], "--device"),
    ],
)
def test_bench_validates_before_loading(flags, needle, tmp_path, capsys, stub_pipe):
    out = tmp_path / "bench"
    one_error_line(capsys, ["bench-compositional", "--out", str(out), *flags], 2, needle)
    assert not out.exists() and stub_pipe.loads == []


def test_bench_never_overwrites_results_without_overwrite(tmp_path, capsys, stub_pipe):
    (tmp_path / "results.json").write_text("earlier run")
    one_error_line(capsys, ["bench-compositional", "--out", str(tmp_path)], 2, "--overwrite", "results.json")
    assert (tmp_path / "results.json").read_text() == "earlier run" and stub_pipe.loads == []


def test_demo_model_names_resolve_to_the_shipped_folders(tmp_path, capsys):
    from scfg.demo import resolve_model, shipped_model_name, shipped_model_path

    assert resolve_model(None) == shipped_model_path() == resolve_model("demo:shapes")
    assert resolve_model("org/some-model") == "org/some-model" and resolve_model(str(tmp_path)) == str(tmp_path)
    if shipped_model_path() is not None:
        assert shipped_model_name(shipped_model_path()) == "scfg-demo"
    assert shipped_model_name(str(tmp_path)) is None and shipped_model_name("org/some-model") is None
    with pytest.raises(SCFGError, match="demo:shapes, demo:scenes"):
        resolve_model("demo:faces")
    # the CLI: one error line naming the choices, exit 2, nothing written
    one_error_line(capsys, ["generate", "x", "--model", "demo:faces", "--out", str(tmp_path / "o")], 2, "demo:scenes")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["generate", "x"], ["ui"], ["bench-compositional"]])
def test_an_uninstalled_demo_model_is_one_error_line_naming_its_folder(command, tmp_path, capsys, monkeypatch):
    """`demo:scenes` where that folder holds no model: every command (the UI too, which would otherwise fall back
    to the default model) stops with one line naming the folder, before anything loads or is written."""
    from scfg import demo

    missing = tmp_path / "model-scenes"
    monkeypatch.setitem(demo.DEMO_MODELS, "scenes", missing)
    with pytest.raises(SCFGError, match="not installed"):
        demo.resolve_model("demo:scenes")
    out = ["--out", str(tmp_path / "o")] if command[0] != "ui" else []
    one_error_line(capsys, [*command, "--model", "demo:scenes", *out], 2, str(missing))
    assert not (tmp_path / "o").exists()
