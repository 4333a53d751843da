"""S-CFG on a stock StableDiffusionXLPipeline (tiny, built from configs and reloaded)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import scfg
from scfg import SCFGConfig, SCFGError


@pytest.fixture
def tiny_sdxl(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, latents, **kwargs):
    h, w = latents.shape[-2] * 2, latents.shape[-1] * 2
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 6.0)
    return pipe(prompt, height=h, width=w, latents=latents.clone(), output_type="latent", **kwargs).images


def latents(n, h=32, w=48, seed=0):
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_sdxl_uses_latent4_by_default_and_masks_are_per_sample(tiny_sdxl):
    prompts = ["a red cat on the sofa", "a blue dog"]
    tiny_sdxl.to(torch.float64)  # batched and single matmuls round differently in float32 and flip near-ties
    recorder = scfg.Recorder()
    guard = scfg.enable(tiny_sdxl, on_step=recorder)
    assert guard.levels == (4,)
    assert {p.cross.split(".")[0] for p in guard.pairs} == {"down_blocks", "mid_block", "up_blocks"}
    x = latents(4, seed=1).double()
    with guard:
        batched = run(tiny_sdxl, prompts, x, num_images_per_prompt=2)
        singles = [run(tiny_sdxl, prompts[i // 2], x[i : i + 1]) for i in range(4)]
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; through 3 Euler
    # steps of the tiny UNet the latents differ by ~2e-15, so 1e-9 is loose by orders of magnitude, while a mask or
    # rate taken from another sample moves them by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 77, 8, 12)  # 32x48 latent -> latent/4
    assert report.rate_map.shape == (4, 1, 32, 48)
    assert report.tokens[2][1:4] == ["a</w>", "blue</w>", "dog</w>"]


def test_sdxl_latent2_option_and_non_square_odd_size(tiny_sdxl):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sdxl, SCFGConfig(levels=(2, 4)), on_step=recorder):
        out = run(tiny_sdxl, "a cat", latents(1, 36, 52))
    assert torch.isfinite(out).all()
    assert recorder.steps[0].token_masks.shape[-2:] == (18, 26)


def test_sdxl_unit_rate_equals_plain_cfg_and_restores(tiny_sdxl):
    tiny_sdxl.to(torch.float64)
    before = dict(tiny_sdxl.unet.attn_processors)
    x = latents(1, seed=2).double()
    plain = run(tiny_sdxl, "a red cat", x)
    with scfg.enable(tiny_sdxl, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        forced = run(tiny_sdxl, "a red cat", x)
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); 3 Euler steps through a tiny UNet amplify that far less
    # than 1e4× (measured: ~2e-16 of max|latents|), so 1e-9 of max|latents| is loose by orders of magnitude, while
    # a rate of 1.001 everywhere already moves the latents by ~4e-4 of their maximum
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-9 * float(plain.abs().max()))
    assert all(tiny_sdxl.unet.attn_processors[k] is v for k, v in before.items())
    assert not tiny_sdxl.unet._forward_hooks and not tiny_sdxl.unet._forward_pre_hooks
    assert type(tiny_sdxl) is StableDiffusionXLPipeline


def test_sdxl_rejects_latent8(tiny_sdxl):
    with pytest.raises(SCFGError, match="only at levels \\[2, 4\\]"):
        scfg.enable(tiny_sdxl, SCFGConfig(levels=(4, 8)))


def test_sdxl_presets_use_the_last_block_of_each_attention_stack(tiny_sdxl):
    every = scfg.enable(tiny_sdxl, SCFGConfig(layers_per_stack=None))  # set explicitly: every block
    # a config that leaves the field "auto" gets the family's value, whichever way it is built
    assert scfg.resolve_config(tiny_sdxl, SCFGConfig()).layers_per_stack == 1
    stacks: dict[str, list[str]] = {}
    for pair in every.pairs:
        stacks.setdefault(pair.cross.rsplit(".transformer_blocks.", 1)[0], []).append(pair.cross)
    assert any(len(layers) > 1 for layers in stacks.values())  # the tiny config has 2-deep stacks at latent/4
    for preset in ("official", "paper"):
        guard = scfg.enable(tiny_sdxl, preset)
        assert guard.config.layers_per_stack == 1
        assert [p.cross for p in guard.pairs] == [layers[-1] for layers in stacks.values()]
        assert all(p.self_attn == p.cross[: -len("attn2")] + "attn1" for p in guard.pairs)
    two = scfg.enable(tiny_sdxl, SCFGConfig(layers_per_stack=2, layers_per_level=1))
    assert [p.cross for p in two.pairs] == [every.pairs[-1].cross]  # stacks first, then the level's last one


def test_sdxl_fewer_layers_still_guide(tiny_sdxl):
    x = latents(1, seed=3)
    plain = run(tiny_sdxl, "a red cat", x)
    with scfg.enable(tiny_sdxl, "official"):
        ours = run(tiny_sdxl, "a red cat", x)
    with scfg.enable(tiny_sdxl, SCFGConfig(layers_per_stack=None)):
        every = run(tiny_sdxl, "a red cat", x)
    assert torch.isfinite(ours).all() and not torch.equal(ours, plain) and not torch.equal(ours, every)
