"""For every family: after the `with` block, the pipeline's output equals the untouched pipeline's bit for bit."""

from __future__ import annotations

import diffusers
import pytest
import torch

import scfg

CASES = {
    "sd_unet": ("tiny_sd_path", "StableDiffusionPipeline", {}),
    "sdxl_unet": ("tiny_sdxl_path", "StableDiffusionXLPipeline", {}),
    "deepfloyd_if": ("tiny_if_path", "IFPipeline", {"clean_caption": False}),
    "pixart": (
        "tiny_pixart_path",
        "PixArtSigmaPipeline",
        {"use_resolution_binning": False, "max_sequence_length": 24},
    ),
    "sd3_mmdit": ("tiny_sd3_path", "StableDiffusion3Pipeline", {"max_sequence_length": 16}),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_output_is_bit_identical_after_the_context(family, request):
    fixture, cls_name, extra = CASES[family]
    pipe = getattr(diffusers, cls_name).from_pretrained(str(request.getfixturevalue(fixture)))
    pipe.set_progress_bar_config(disable=True)
    size = 32 if family == "deepfloyd_if" else 64
    kwargs = dict(
        height=size,
        width=size,
        num_inference_steps=2,
        output_type="pt" if family == "deepfloyd_if" else "latent",
        **extra,
    )

    def run():
        return pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images

    stock = run()
    guard = scfg.enable(pipe)
    assert guard.family.name == family
    with guard:
        guided = run()
    after = run()
    assert torch.equal(after, stock)
    assert not torch.equal(guided, stock)
