"""The modular-pipeline guider: separate cond/uncond passes give the same result as the stock integration."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch

import scfg
from scfg import SCFGError
from scfg.integration import guider as guider_module
from scfg.integration.guider import SemanticGuider

needs_guiders = pytest.mark.skipif(
    guider_module.ClassifierFreeGuidance is None,
    reason=f"SemanticGuider needs diffusers>={guider_module.MIN_DIFFUSERS}; installed: {diffusers.__version__}",
)


@pytest.mark.skipif(guider_module.ClassifierFreeGuidance is not None, reason="this diffusers has the guider API")
def test_guider_on_old_diffusers_says_which_version_it_needs():
    with pytest.raises(SCFGError, match=r"diffusers>=0\.36 .* but diffusers .* is installed"):
        SemanticGuider(guidance_scale=7.5)


def holder(pipe, guidance_scale):
    """What the engine reads from a pipeline during a step, without a pipeline call (as benchmarks/overhead.py)."""
    return SimpleNamespace(
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        do_classifier_free_guidance=True,
        guidance_scale=guidance_scale,
        guidance_rescale=0.0,
    )


@needs_guiders
def test_guider_matches_stock_integration(tiny_sd):
    pipe = tiny_sd.to(torch.float64)
    unet = pipe.unet
    cond_emb, uncond_emb = pipe.encode_prompt("a red cat on the sofa", "cpu", 1, True, "green")
    x = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor(500)

    # reference: the stock integration on one [uncond, cond] pass. A direct `unet(...)` call is only guided for a
    # holder that has no pipeline calls to observe (inside a real pipeline's block it would be left alone).
    recorder = scfg.Recorder()
    with scfg.enable(holder(pipe, 7.5), on_step=recorder):
        u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond_emb, cond_emb])).sample.chunk(2)
    expected = u + 7.5 * (c - u)

    guider = SemanticGuider(guidance_scale=7.5)
    guider.on_step = guider_recorder = scfg.Recorder()
    guider.set_state(step=0, num_inference_steps=10, timestep=t)
    preds = {}
    for name, emb in [("pred_cond", cond_emb), ("pred_uncond", uncond_emb)]:  # modular order: cond first
        guider.prepare_models(unet)
        preds[name] = unet(x, t, encoder_hidden_states=emb).sample
        guider.cleanup_models(unet)
    out = guider.forward(**preds).pred
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(guider_recorder.steps[0].token_masks, recorder.steps[0].token_masks)
    assert not unet._forward_pre_hooks and not any(m._forward_pre_hooks for m in unet.modules())


@needs_guiders
def test_guider_outside_cfg_is_plain(tiny_sd):
    guider = SemanticGuider(guidance_scale=1.0)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    guider.prepare_models(tiny_sd.unet)
    guider.cleanup_models(tiny_sd.unet)
    pred = torch.randn(1, 4, 8, 8)
    assert torch.equal(guider.forward(pred).pred, pred)


@needs_guiders
def test_guider_rejects_original_formulation():
    with pytest.raises(SCFGError, match="use_original_formulation"):
        SemanticGuider(use_original_formulation=True)


@needs_guiders
def test_guider_reuses_regions_like_the_stock_integration(tiny_sd, monkeypatch):
    pipe = tiny_sd.to(torch.float64)
    unet = pipe.unet
    config = scfg.SCFGConfig(mask_interval=2)
    cond_emb, uncond_emb = pipe.encode_prompt("a red cat on the sofa", "cpu", 1, True, "")
    pipe.scheduler.set_timesteps(3)
    timesteps = pipe.scheduler.timesteps
    xs = [torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]

    expected, recorder = [], scfg.Recorder()
    with scfg.enable(holder(pipe, 5.0), config, on_step=recorder):
        for x, t in zip(xs, timesteps, strict=True):
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond_emb, cond_emb])).sample.chunk(2)
            expected.append(u + 5.0 * (c - u))

    calls = []
    original = scfg.capture.rows_from_projections
    monkeypatch.setattr("scfg.capture.rows_from_projections", lambda *a, **k: calls.append(1) or original(*a, **k))
    guider = SemanticGuider(guidance_scale=5.0, scfg_config=config.to_dict())
    guider.on_step = guider_recorder = scfg.Recorder()
    captured_per_step = []
    for step, (x, t) in enumerate(zip(xs, timesteps, strict=True)):
        before = len(calls)
        guider.set_state(step=step, num_inference_steps=3, timestep=t)
        preds = {}
        for name, emb in [("pred_cond", cond_emb), ("pred_uncond", uncond_emb)]:
            guider.prepare_models(unet)
            preds[name] = unet(x, t, encoder_hidden_states=emb).sample
            guider.cleanup_models(unet)
        torch.testing.assert_close(guider.forward(**preds).pred, expected[step], rtol=1e-9, atol=1e-9)
        captured_per_step.append(len(calls) > before)
    assert captured_per_step == [True, False, True]
    assert torch.equal(guider_recorder.steps[1].token_masks, guider_recorder.steps[0].token_masks)
    assert len(guider_recorder.steps) == len(recorder.steps) == 3
    for ours, stock in zip(guider_recorder.steps, recorder.steps, strict=True):
        assert torch.equal(ours.token_masks, stock.token_masks)
