"""S-CFG on a stock StableDiffusionPipeline: relations between runs, restoration, and what is (not) captured."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import scfg
from scfg import SCFGConfig, SCFGError

H, W = 64, 96


def latents_for(n, seed=0, h=H, w=W):
    return torch.randn(n, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def run(pipe, prompt, latents, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 7.5)
    height, width = latents.shape[-2] * 2, latents.shape[-1] * 2
    return pipe(prompt, height=height, width=width, latents=latents.clone(), output_type="latent", **kwargs).images


def snapshot(pipe):
    unet = pipe.unet
    hooks = {
        name: (dict(m._forward_pre_hooks), dict(m._forward_hooks))
        for name, m in unet.named_modules()
        if m._forward_pre_hooks or m._forward_hooks
    }
    return dict(unet.attn_processors), hooks, {k: v for k, v in vars(pipe).items() if callable(v)}, type(pipe)


def assert_restored(pipe, before):
    processors, hooks, attrs, _ = snapshot(pipe)
    assert processors.keys() == before[0].keys()
    assert all(processors[k] is before[0][k] for k in processors)
    assert hooks == before[1]
    assert attrs == before[2] and type(pipe) is before[3]


def test_forced_unit_rate_equals_plain_cfg(tiny_sd):
    tiny_sd.to(torch.float64)
    latents = latents_for(2).double()
    plain = run(tiny_sd, ["a red cat", "a blue dog on the sofa"], latents)
    config = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)
    with scfg.enable(tiny_sd, config):
        forced = run(tiny_sd, ["a red cat", "a blue dog on the sofa"], latents)
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); 3 DDIM steps through a tiny UNet amplify that far less
    # than 1e4× (measured: ~7e-16 of max|latents|), so 1e-9 of max|latents| is loose by orders of magnitude, while a
    # rate of 1.001 everywhere already moves the latents by ~2e-4 of their maximum
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-9 * float(plain.abs().max()))


def test_scfg_changes_the_output(tiny_sd):
    latents = latents_for(1)
    plain = run(tiny_sd, "a red cat", latents)
    with scfg.enable(tiny_sd):
        ours = run(tiny_sd, "a red cat", latents)
    # float32 rounding alone (the rewrite, the sampler) moves these latents by ~5e-6 (a float32 run of
    # test_forced_unit_rate_equals_plain_cfg), so a difference above 1e-4 is guidance; S-CFG moves them by ~0.4
    assert not torch.allclose(ours, plain, rtol=0, atol=1e-4)


def test_masks_are_per_sample_in_batches(tiny_sd):
    prompts = ["a red cat on the sofa", "a blue dog"]
    tiny_sd.to(torch.float64)  # batched and single matmuls round differently in float32 and flip near-ties
    latents = latents_for(4, seed=1).double()
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, on_step=recorder):
        batched = run(tiny_sd, prompts, latents, num_images_per_prompt=2, negative_prompt=["green", "the"])
        singles = [
            run(tiny_sd, prompts[i // 2], latents[i : i + 1], negative_prompt=["green", "the"][i // 2])
            for i in range(4)
        ]
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; through 3 steps of
    # the tiny UNet the latents differ by ~4e-14, so 1e-9 is loose by orders of magnitude, while a mask or rate
    # taken from another sample moves them by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    masks = recorder.steps[2].token_masks  # first batched step
    assert masks.shape[0] == 4
    assert not torch.equal(masks[0], masks[2])
    assert recorder.steps[0].tokens[0][1:4] == ["a</w>", "red</w>", "cat</w>"]
    assert recorder.steps[0].tokens[2][1:4] == ["a</w>", "blue</w>", "dog</w>"]


def test_restores_pipeline_after_run(tiny_sd):
    before = snapshot(tiny_sd)
    with scfg.enable(tiny_sd):
        run(tiny_sd, "a cat", latents_for(1))
        assert snapshot(tiny_sd)[0].keys() == before[0].keys()
    assert_restored(tiny_sd, before)


def test_restores_pipeline_after_exception_in_callback(tiny_sd):
    before = snapshot(tiny_sd)

    def explode(pipe, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("boom")
        return kwargs

    guard = scfg.enable(tiny_sd)
    with pytest.raises(RuntimeError, match="boom"), guard:
        run(tiny_sd, "a cat", latents_for(1), callback_on_step_end=explode)
    assert_restored(tiny_sd, before)
    assert not guard.recording
    # the pipeline still works, unpatched
    run(tiny_sd, "a cat", latents_for(1))


def test_guidance_scale_one_captures_nothing(tiny_sd, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("attention maps computed without CFG")

    monkeypatch.setattr("scfg.capture.rows_from_projections", forbidden)
    recorder = scfg.Recorder()
    latents = latents_for(1)
    plain = run(tiny_sd, "a cat", latents, guidance_scale=1.0)
    with scfg.enable(tiny_sd, on_step=recorder):
        ours = run(tiny_sd, "a cat", latents, guidance_scale=1.0)
    assert recorder.steps == []
    assert torch.equal(ours, plain)


def test_step_fractions_limit_guided_steps(tiny_sd):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, SCFGConfig(start_fraction=0.25, stop_fraction=0.75), on_step=recorder):
        run(tiny_sd, "a cat", latents_for(1), num_inference_steps=8)
    assert [r.step for r in recorder.steps] == [2, 3, 4, 5]


def test_words_only_regions_exclude_special_tokens(tiny_sd):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, SCFGConfig(region_tokens="words"), on_step=recorder):
        run(tiny_sd, "a red cat", latents_for(1))
    owners = recorder.steps[-1].token_masks[0].flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert owners and set(owners) <= {1, 2, 3}


def test_prompt_embeds_without_text(tiny_sd):
    cond, uncond = tiny_sd.encode_prompt("a red cat", "cpu", 1, True, "green")
    latents = latents_for(1)
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, on_step=recorder):
        with_embeds = run(tiny_sd, None, latents, prompt_embeds=cond, negative_prompt_embeds=uncond)
        with_text = run(tiny_sd, "a red cat", latents, negative_prompt="green")
    # the pipeline encodes the text with the same `encode_prompt`, and the regions do not depend on the token
    # strings (every token takes part): the two runs are the same computation, bit for bit
    assert torch.equal(with_embeds, with_text)
    assert recorder.steps[0].tokens is None and recorder.steps[-1].tokens is not None


def test_non_square_odd_latent(tiny_sd):
    recorder = scfg.Recorder()
    latents = latents_for(1, h=72, w=104)  # latent 36x52 -> 9x13 -> 5x7
    with scfg.enable(tiny_sd, on_step=recorder):
        out = run(tiny_sd, "a cat", latents)
    assert out.shape == (1, 4, 36, 52) and torch.isfinite(out).all()
    assert recorder.steps[0].token_masks.shape[-2:] == (9, 13)
    assert recorder.steps[0].rate_map.shape[-2:] == (36, 52)


def test_v_prediction_pipeline(tiny_sd_v_path):
    from conftest import load_pipe

    pipe = load_pipe(tiny_sd_v_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        out = run(pipe, "a cat", latents_for(1))
    assert torch.isfinite(out).all() and len(recorder.steps) == 3


def denoiser_outputs(pipe, on_step=None, **kwargs):
    """Run S-CFG and return the denoiser's outputs as the model gave them and as the pipeline received them.

    Forward hooks run in registration order and each sees the output the previous one returned: the first hook is
    registered ahead of S-CFG's (outside its block), the second behind it (inside).
    """
    before, after = [], []

    def recorder_for(store):
        def record(module, args, output):
            store.append(output[0].detach().clone() if isinstance(output, tuple) else output.sample.detach().clone())

        return record

    first = pipe.unet.register_forward_hook(recorder_for(before))
    try:
        with scfg.enable(pipe, on_step=on_step):
            last = pipe.unet.register_forward_hook(recorder_for(after))
            try:
                run(pipe, "a red cat", latents_for(1), **kwargs)
            finally:
                last.remove()
    finally:
        first.remove()
    return before, after


def test_rewrite_keeps_cond_and_the_line_gives_the_guided_prediction(tiny_sd):
    """The cond half reaches the pipeline unchanged (so `guidance_rescale` rescales against the model's own cond,
    docs/algorithm.md step 8), and the pipeline's own line `u' + g (c - u')` is S-CFG's `u + g·rate·η`."""
    g = 7.5
    recorder = scfg.Recorder()
    befores, afters = denoiser_outputs(tiny_sd, recorder, guidance_scale=g, guidance_rescale=0.7)
    assert len(befores) == len(recorder.steps) == 3
    for before, after, report in zip(befores, afters, recorder.steps, strict=True):
        u, c = before.chunk(2)
        new_u, new_c = after.chunk(2)
        assert torch.equal(new_c, c)  # bit for bit
        target = u.double() + g * report.rate_map.double() * (c.double() - u.double())
        line = new_u + g * (new_c - new_u)  # float32, as the pipeline computes it
        # express_guided accepts the rewrite only within 64 float32 ulps of max|target|; the guided prediction
        # itself is a few roundings (≤ 4 ulp) from the float64 target: 128 ulps bound both with margin.
        bound = 128 * torch.finfo(torch.float32).eps * target.abs().max()
        assert (line.double() - target).abs().max() <= bound


@pytest.mark.parametrize("g", [50.0, 1e8])
def test_scale_cap_holds_for_huge_scales(tiny_sd, g):
    """Above g = 18.75 the official rate is 15/g everywhere: the pipeline's line must give u + 15 η, also at
    g = 1e8 where float32 cannot carry `g·(c − u')` for a rewritten uncond (both halves then carry the result)."""
    (before,), (after,) = denoiser_outputs(tiny_sd, guidance_scale=g, num_inference_steps=1)
    u, c = before.double().chunk(2)
    new_u, new_c = after.chunk(2)
    target = u + 15.0 * (c - u)
    line = (new_u + g * (new_c - new_u)).double()  # the pipeline's line, float32
    # 15/g and the smoothing of a constant map are each within a few ulps; the accepted line within 64 ulps.
    bound = 128 * torch.finfo(torch.float32).eps * target.abs().max()
    assert (line - target).abs().max() <= bound


def test_nested_enable_is_refused_and_outer_survives(tiny_sd):
    before = snapshot(tiny_sd)
    with scfg.enable(tiny_sd):
        with pytest.raises(SCFGError, match=r"another `scfg\.enable`"), scfg.enable(tiny_sd):
            pass
        run(tiny_sd, "a cat", latents_for(1))  # the outer context still guides
    assert_restored(tiny_sd, before)


def test_unsupported_pipeline_names_supported_families():
    class NotAPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(SCFGError, match="sd_unet"):
        scfg.enable(NotAPipeline())


def test_missing_level_is_reported(tiny_sd):
    with pytest.raises(SCFGError, match=r"latent/2"):
        scfg.enable(tiny_sd, SCFGConfig(levels=(2, 4)))


SCHEDULERS = [
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
]


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler(tiny_sd, scheduler_cls):
    tiny_sd.scheduler = scheduler_cls.from_config(tiny_sd.scheduler.config)
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, on_step=recorder):
        out = run(tiny_sd, "a red cat", latents_for(1), num_inference_steps=4)
    assert torch.isfinite(out).all()
    # one report per pass of the loop, with the loop's own index (PNDM and Heun repeat timesteps)
    assert [r.step for r in recorder.steps] == list(range(len(tiny_sd.scheduler.timesteps)))
