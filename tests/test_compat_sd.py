"""S-CFG composes with ControlNet, img2img, inpainting and LoRA on SD 1.x (their processors are not replaced)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)

import scfg
from scfg import SCFGConfig

UNIT = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)  # S-CFG that must equal CFG


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def three_ways(pipe, **kwargs):
    """Plain CFG, S-CFG forced to rate 1, and S-CFG, all from the same seed and in float64; plus the recorder."""
    pipe.to(torch.float64)
    kwargs = {"num_inference_steps": 3, "output_type": "pt", **kwargs}
    plain = pipe(generator=gen(), **kwargs).images
    with scfg.enable(pipe, UNIT):
        unit = pipe(generator=gen(), **kwargs).images
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        guided = pipe(generator=gen(), **kwargs).images
    return plain, unit, guided, recorder


def check(pipe, processors, plain, unit, guided, recorder, steps):
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); at most 3 guided steps and the tiny VAE decoder amplify
    # that far less than 1e4× (measured: <= 4e-15 on images in [0, 1]), so 1e-9 is loose by orders of magnitude,
    # while S-CFG proper moves the images by ~3e-2
    torch.testing.assert_close(unit, plain, rtol=0, atol=1e-9)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, rtol=0, atol=1e-4)
    assert len(recorder.steps) == steps
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())


def test_controlnet(tiny_sd):
    torch.manual_seed(0)
    # the tiny VAE downsamples by 2, so the conditioning embedding must too
    controlnet = ControlNetModel.from_unet(tiny_sd.unet, conditioning_embedding_out_channels=(16, 16))
    pipe = StableDiffusionControlNetPipeline(**tiny_sd.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    processors = dict(pipe.unet.attn_processors)
    image = torch.rand(1, 3, 64, 96, dtype=torch.float64)
    results = three_ways(pipe, prompt="a red cat", image=image, height=64, width=96)
    check(pipe, processors, *results, steps=3)


def test_img2img_guides_only_the_steps_it_runs(tiny_sd):
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd.components)
    pipe.set_progress_bar_config(disable=True)
    processors = dict(pipe.unet.attn_processors)
    image = torch.rand(1, 3, 64, 96, dtype=torch.float64)
    results = three_ways(pipe, prompt="a red cat", image=image, strength=0.5, num_inference_steps=6)
    check(pipe, processors, *results, steps=3)
    assert [r.step for r in results[3].steps] == [3, 4, 5]


def test_inpainting(tiny_sd):
    pipe = StableDiffusionInpaintPipeline(**tiny_sd.components)
    pipe.set_progress_bar_config(disable=True)
    processors = dict(pipe.unet.attn_processors)
    image, mask = torch.rand(1, 3, 64, 96, dtype=torch.float64), torch.zeros(1, 1, 64, 96, dtype=torch.float64)
    mask[..., 16:48, 24:72] = 1
    results = three_ways(pipe, prompt="a red cat", image=image, mask_image=mask, height=64, width=96, strength=1.0)
    check(pipe, processors, *results, steps=3)


def test_lora_adapters_are_seen_by_the_capture(tiny_sd):
    pytest.importorskip("peft")
    from peft import LoraConfig

    # float64, so that the adapter's `W x + B A x` and the merged `(W + B A) x` differ by rounding only (~1e-16
    # relative) and no near-tie of the masks flips between the two
    tiny_sd.to(torch.float64)
    x = torch.randn(1, 4, 32, 48, generator=gen(3), dtype=torch.float64)
    kwargs = dict(height=64, width=96, num_inference_steps=2, output_type="latent")

    def maps():
        recorder = scfg.Recorder()
        with scfg.enable(tiny_sd, on_step=recorder):
            out = tiny_sd("a red cat on the sofa", latents=x.clone(), **kwargs).images
        return out, torch.stack([r.token_rates for r in recorder.steps])

    _, base_rates = maps()
    tiny_sd.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    processors = dict(tiny_sd.unet.attn_processors)
    with torch.no_grad():
        for name, param in tiny_sd.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=gen(4))
    lora_out, lora_rates = maps()
    # the adapter reaches the capture: the rates move by far more than the rounding bound used below
    assert not torch.allclose(lora_rates, base_rates, rtol=0, atol=1e-9 * float(base_rates.abs().max()))
    weight = tiny_sd.unet.get_submodule("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k").base_layer.weight
    unmerged = weight.detach().clone()
    tiny_sd.unet.fuse_lora()  # merge the adapter into the weights, then drop it: a missing method fails here
    tiny_sd.unet.unload_lora()
    assert not any("lora_" in name for name, _ in tiny_sd.unet.named_parameters())
    merged = tiny_sd.unet.get_submodule("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k").weight
    assert not torch.equal(merged, unmerged)  # the merge really changed the weights
    fused_out, fused_rates = maps()
    # the maps S-CFG computed with the adapter on equal those of the adapter merged into the weights
    # Merging reassociates each projection's rounding (a 16-term sum: ~16 ulps, ~4e-15 relative); the rates are
    # ratios of region means of score norms and the latents 2 steps of a tiny UNet away, which amplify that far less
    # than 1e4× (measured: ~1e-14 relative), so 1e-9 of their maximum is loose by orders of magnitude, while the
    # adapter itself moves the rates by ~2.5 (`lora_rates` against `base_rates`)
    torch.testing.assert_close(lora_rates, fused_rates, rtol=0, atol=1e-9 * float(lora_rates.abs().max()))
    torch.testing.assert_close(lora_out, fused_out, rtol=0, atol=1e-9 * float(lora_out.abs().max()))
    assert all(
        tiny_sd.unet.attn_processors[k] is v for k, v in processors.items() if k in tiny_sd.unet.attn_processors
    )
