"""Every entry point (CLI, web UI, `scfg eval`, the compositional benchmark, the guider) gives S-CFG the same resolved
config as `scfg.enable(pipe, preset)`, for every family: a family's preset differences cannot be dropped on the way.

Each entry point is stopped the moment S-CFG is entered, after recording the config it resolved to, so nothing is
sampled with S-CFG here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

import scfg
from scfg.integration import guider
from scfg.integration.pipeline import SemanticGuidance

FAMILY_PATHS = ["tiny_sd_path", "tiny_sdxl_path", "tiny_if_path", "tiny_pixart_path", "tiny_sd3_path"]


class Stop(Exception):
    """Raised when S-CFG is entered, to end the entry point there."""


@pytest.fixture
def entered(monkeypatch):
    configs = []

    def record(self):
        configs.append(self.config)
        raise Stop

    monkeypatch.setattr(SemanticGuidance, "__enter__", record)
    return configs


def load(path):
    pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fixture", FAMILY_PATHS)
def test_every_entry_point_resolves_the_family_preset(fixture, request, entered, tmp_path):
    from scfg.cli import main
    from scfg.demo.bench import run_benchmark
    from scfg.eval.runner import run_generation
    from scfg.ui import generate_pair

    path = request.getfixturevalue(fixture)
    pipe = load(path)
    official = scfg.resolve_config(pipe, "official")
    paper = scfg.resolve_config(pipe, "paper")
    assert official.is_resolved and paper.is_resolved

    size = ["--height", "64", "--width", "64"]
    resolved = {}  # entry point -> the config S-CFG was entered with
    for preset in ("official", "paper"):
        code = main(["generate", "a red cat", "--model", str(path), "--steps", "1", *size, "--preset", preset,
                     "--device", "cpu", "--out", str(tmp_path / f"cli-{preset}")])  # fmt: skip
        assert code != 0  # stopped at the door of S-CFG by the fixture
        resolved[f"cli-{preset}"] = entered.pop()
        # The UI draws the CFG image first; PixArt's resolution binning has no bin for the tiny model's sample size.
        if fixture != "tiny_pixart_path":
            with pytest.raises(Stop):
                generate_pair(pipe, "a red cat", preset=preset, steps=1, height=64, width=64)
            resolved[f"ui-{preset}"] = entered.pop()
    for method in ("scfg-official", "scfg-paper"):
        with pytest.raises(Stop):
            run_generation(pipe, ["a red cat"], tmp_path / method, [method], [5.0], steps=1, progress=False)
        resolved[f"eval-{method[5:]}"] = entered.pop()
    with pytest.raises(Stop):
        run_benchmark(pipe, num_prompts=1, seeds_per_prompt=1, scales=(5.0,), methods=("scfg-official",), steps=1)
    resolved["bench-official"] = entered.pop()
    assert not entered
    for name, config in resolved.items():
        assert config == (official if name.endswith("official") else paper), name


@pytest.mark.skipif(
    guider.ClassifierFreeGuidance is None, reason=f"SemanticGuider needs diffusers>={guider.MIN_DIFFUSERS}"
)
@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_guider_resolves_the_family_preset(fixture, request):
    from scfg.integration.guider import SemanticGuider

    pipe = load(request.getfixturevalue(fixture))
    guider = SemanticGuider(guidance_scale=5.0)
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(500))
    guider.prepare_models(pipe.unet)
    try:
        assert guider._engine.config == scfg.resolve_config(pipe, "official")
    finally:
        guider.cleanup_models(pipe.unet)


def test_family_values_fill_only_auto_fields(tiny_sdxl_path, tiny_pixart_path):
    sdxl, pixart = load(tiny_sdxl_path), load(tiny_pixart_path)
    assert scfg.resolve_config(sdxl, scfg.SCFGConfig()).layers_per_stack == 1
    assert scfg.resolve_config(sdxl, scfg.SCFGConfig(layers_per_stack=None)).layers_per_stack is None
    assert scfg.resolve_config(pixart, scfg.SCFGConfig.preset("paper")).foreground_source == "cond"
    assert scfg.resolve_config(pixart, scfg.SCFGConfig(foreground_source="uncond")).foreground_source == "uncond"


def test_mask_pool_is_the_familys_in_both_presets_and_checked(tiny_sd_path, tiny_pixart_path):
    """Transformers whose tokens are 16 pixels apart pool 2x2 into masks (32 pixels apart, SD's recipe grid);
    SD's latent/4 layers are already there. A value the user gives is kept, and a bad one named at the door."""
    sd, pixart = load(tiny_sd_path), load(tiny_pixart_path)
    for preset in ("official", "paper"):
        assert scfg.resolve_config(sd, preset).mask_pool == 1
        assert scfg.resolve_config(pixart, preset).mask_pool == 2
    assert scfg.resolve_config(pixart, scfg.SCFGConfig(mask_pool=1)).mask_pool == 1
    for bad in (0, 3, 2.0, True):
        with pytest.raises(scfg.SCFGError, match="mask_pool"):
            scfg.SCFGConfig(mask_pool=bad)


@pytest.mark.filterwarnings("ignore:.*never entered:RuntimeWarning")  # only the chosen layers are read
def test_max_layers_keeps_the_middle_ones_in_forward_order(tiny_sd_path, tiny_pixart_path):
    sd, pixart = load(tiny_sd_path), load(tiny_pixart_path)
    assert scfg.resolve_config(sd, "official").max_layers is None
    assert scfg.resolve_config(pixart, "paper").max_layers == 3
    every = scfg.enable(sd, scfg.SCFGConfig(max_layers=None)).pairs
    assert len(every) >= 3
    for k in range(1, len(every) + 2):
        chosen = scfg.enable(sd, scfg.SCFGConfig(max_layers=k)).pairs
        start = max(0, (len(every) - k) // 2)
        assert chosen == every[start : start + k], k  # the middle k; all of them when k is larger
    with pytest.raises(scfg.SCFGError, match="max_layers"):
        scfg.SCFGConfig(max_layers=0)
