"""The step engine: CFG layouts as data, the exact rewrite of any affine CFG line, and a sampling loop that runs CFG
as separate passes (either order, either line) guided exactly as the same model through one batched pass."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import scfg
from scfg import SCFGConfig
from scfg.engine import CFGLayout, rewrite

F64 = torch.finfo(torch.float64)


def test_layout_combine_and_effective_scale():
    assert CFGLayout("batched", scale=7.5).combine == (7.5, -6.5)
    assert CFGLayout("separate", ("cond", "uncond"), "cond", 4.0).combine == (5.0, -4.0)
    assert CFGLayout("separate", ("cond", "uncond"), "cond", 4.0).effective_scale == 5.0
    assert not CFGLayout("batched", scale=1.0).is_guided and CFGLayout("separate", anchor="cond", scale=0.5).is_guided
    with pytest.raises(ValueError, match="order"):
        CFGLayout("separate", ("cond", "cond"))
    with pytest.raises(ValueError, match="passes"):
        CFGLayout("interleaved")


def test_layout_halves_follow_the_declared_order():
    batch = torch.arange(4.0).view(4, 1)
    layout = CFGLayout("batched", ("cond", "uncond"))
    halves = layout.halves(batch)
    assert halves["cond"].flatten().tolist() == [0.0, 1.0] and halves["uncond"].flatten().tolist() == [2.0, 3.0]
    assert torch.equal(layout.join(halves), batch)


@pytest.mark.parametrize("anchor", ["uncond", "cond"])
@pytest.mark.parametrize("replace", ["uncond", "cond"])
def test_rewrite_is_exact_on_dyadic_values(anchor, replace):
    """With values that are small multiples of powers of two every operation of the rewrite and of the pipeline's
    line is exact in float64, so the line gives the target bit for bit, for `u + s(c - u)` and `c + s(c - u)`."""
    layout = CFGLayout("separate", ("cond", "uncond"), anchor, 3.0)  # a = 3 or 4, b = -2 or -3: exact divisions?
    u = torch.tensor([[0.5, -1.25, 2.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[1.5, -0.25, 2.5, 1.0]], dtype=torch.float64)
    a, b = layout.combine
    rate = torch.tensor([[1.0, 0.75, 2.0, 0.5]], dtype=torch.float64)
    target = u + a * rate * (c - u)
    new_u, new_c, exact = rewrite(layout, u, c, target, replace)
    assert exact
    kept = new_c if replace == "uncond" else new_u
    assert kept is (c if replace == "uncond" else u)
    line = layout.line(new_u, new_c)
    # dividing by b = -2 (a power of two) is exact; by -3 it is not, so there the line is within the 64-ulp contract
    if (replace == "uncond" and b == -2.0) or (replace == "cond" and a == 4.0):
        assert torch.equal(line, target)
    else:
        torch.testing.assert_close(line, target, rtol=0, atol=64 * F64.eps * target.abs().max().item())


@pytest.mark.parametrize("anchor", ["uncond", "cond"])
@pytest.mark.parametrize("replace", ["uncond", "cond"])
def test_rewrite_inverts_the_cond_anchored_line_on_random_values(anchor, replace):
    torch.manual_seed(0)
    layout = CFGLayout("separate", ("uncond", "cond"), anchor, 4.0)
    u, c = torch.randn(2, 4, 5, 6, dtype=torch.float64), torch.randn(2, 4, 5, 6, dtype=torch.float64)
    rate = 0.8 + 2.2 * torch.rand(2, 1, 5, 6, dtype=torch.float64)
    target = u + layout.effective_scale * rate * (c - u)
    new_u, new_c, exact = rewrite(layout, u, c, target, replace)
    assert exact
    # the rewritten prediction carries one rounding of |x| ≈ |t|, which the line multiplies by |a| or |b| ≤ 5, and the
    # line's own three roundings add a few ulps of |t|: well inside the 64-ulp contract of `rewrite`
    torch.testing.assert_close(
        layout.line(new_u, new_c), target, rtol=0, atol=64 * F64.eps * target.abs().max().item()
    )


def test_rewrite_falls_back_to_equal_predictions_when_the_line_cannot_carry_it():
    """g = 1e8 in float32: the line's rounding (ulp(|u'|) · g) dwarfs the guidance; both predictions become the
    target, which any line with a + b = 1 reproduces exactly."""
    layout = CFGLayout("separate", ("cond", "uncond"), "cond", 1e8)
    torch.manual_seed(0)
    u, c = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    target = (u + 15.0 * (c - u)).double()
    new_u, new_c, exact = rewrite(layout, u, c, target, "uncond")
    assert not exact and torch.equal(new_u, new_c)
    assert torch.equal(layout.line(new_u, new_c), new_u)


class Loop:
    """A hand-written sampling loop around the tiny SD UNet, running CFG as one batch or as two separate passes in a
    given order, combined with `u + s(c - u)` or `c + s(c - u)`: what the 2025-26 pipelines do, on a model the
    batched path is known to be right for."""

    def __init__(self, unet, passes, order=("uncond", "cond"), anchor="uncond"):
        self.unet = unet
        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
        self.passes, self.order, self.anchor = passes, order, anchor

    def __call__(self, cond, uncond, latents, scale, steps=3):
        self.scheduler.set_timesteps(steps)
        embeds = {"cond": cond, "uncond": uncond}
        for t in self.scheduler.timesteps:
            if self.passes == "batched":
                both = torch.cat([embeds[self.order[0]], embeds[self.order[1]]])
                out = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=both).sample
                pred = dict(zip(self.order, out.chunk(2), strict=True))
            else:
                pred = {role: self.unet(latents, t, encoder_hidden_states=embeds[role]).sample for role in self.order}
            u, c = pred["uncond"], pred["cond"]
            noise = u + scale * (c - u) if self.anchor == "uncond" else c + scale * (c - u)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def loop_inputs(unet):
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    uncond = torch.randn(2, 20, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    uncond = torch.cat([uncond, uncond[:, -1:].expand(2, 57, -1)], dim=1)  # another prompt, padded to 77
    latents = torch.randn(2, 4, 8, 12, generator=g, dtype=torch.float64)
    return cond, uncond, latents


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
@pytest.mark.parametrize("anchor", ["uncond", "cond"])
def test_separate_passes_equal_the_batched_path(tiny_sd, order, anchor):
    unet = tiny_sd.unet.to(torch.float64)
    cond, uncond, latents = loop_inputs(unet)
    scale = 6.0
    effective = scale if anchor == "uncond" else scale + 1.0  # c + s(c - u) = u + (s + 1)(c - u)
    batched = Loop(unet, "batched")
    separate = Loop(unet, "separate", order, anchor)
    batched_rec, separate_rec = scfg.Recorder(), scfg.Recorder()
    layout = CFGLayout("batched", ("uncond", "cond"), "uncond", effective)
    with scfg.enable(batched, layout=layout, on_step=batched_rec):
        expected = batched(cond, uncond, latents.clone(), effective)
    with scfg.enable(separate, layout=CFGLayout("separate", order, anchor, scale), on_step=separate_rec):
        ours = separate(cond, uncond, latents.clone(), scale)
    plain = separate(cond, uncond, latents.clone(), scale)
    assert len(separate_rec.steps) == len(batched_rec.steps) == 3
    assert [r.step for r in separate_rec.steps] == [0, 1, 2]
    for a, b in zip(separate_rec.steps, batched_rec.steps, strict=True):
        assert torch.equal(a.token_masks, b.token_masks) and torch.equal(a.foreground_mask, b.foreground_mask)
        assert a.guidance_scale == b.guidance_scale == effective
    # float64 throughout: the UNet on a batch of 4 and on batches of 2 reorders sums (~1e-16 relative per op); the
    # masks above are identical, so the two runs differ by those roundings times the rule's factors (a·rate <= 15)
    # over 3 steps, far below 1e-10 of the latents' scale
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10 * expected.abs().max().item())
    assert not torch.allclose(ours, plain, rtol=0, atol=1e-6)  # and S-CFG did something


def test_separate_pass_loop_with_unit_rate_is_plain_cfg(tiny_sd):
    unet = tiny_sd.unet.to(torch.float64)
    cond, uncond, latents = loop_inputs(unet)
    loop = Loop(unet, "separate", ("cond", "uncond"), "cond")
    plain = loop(cond, uncond, latents.clone(), 4.0)
    config = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)
    with scfg.enable(loop, config, layout=CFGLayout("separate", ("cond", "uncond"), "cond", 4.0)):
        ours = loop(cond, uncond, latents.clone(), 4.0)
    # rate exactly 1 (clamped), smoothed by weights summing to 1 within 2 ulps: the rewritten uncond reproduces the
    # model's own up to a few float64 roundings of |u|, which the line multiplies by s + 1 = 5, per step
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_an_unpaired_pass_is_left_alone(tiny_sd):
    """A step whose second pass never comes (CFG switched off for that step by the loop) guides nothing, and the
    next step pairs its own passes."""
    unet = tiny_sd.unet.to(torch.float64)
    cond, uncond, latents = loop_inputs(unet)

    class Truncated(Loop):
        def __call__(self, cond, uncond, latents, scale, steps=3):
            self.scheduler.set_timesteps(steps)
            for i, t in enumerate(self.scheduler.timesteps):
                c = self.unet(latents, t, encoder_hidden_states=cond).sample
                if i == 0:  # e.g. CFG truncation: the cond prediction alone
                    noise = c
                else:
                    u = self.unet(latents, t, encoder_hidden_states=uncond).sample
                    noise = u + scale * (c - u)
                latents = self.scheduler.step(noise, t, latents).prev_sample
            return latents

    loop = Truncated(unet, "separate")
    recorder = scfg.Recorder()
    with scfg.enable(loop, layout=CFGLayout("separate", ("cond", "uncond"), "uncond", 5.0), on_step=recorder):
        loop(cond, uncond, latents.clone(), 5.0)
    assert [r.step for r in recorder.steps] == [1, 2]


def test_temporal_smoothing_damps_one_frame_jumps_and_keeps_persistent_rates():
    from scfg.rule import semantic_guidance
    from scfg.segment import gaussian_kernel

    torch.manual_seed(0)
    u = torch.zeros(1, 2, 5, 2, 2, dtype=torch.float64)
    c = torch.ones(1, 2, 5, 2, 2, dtype=torch.float64)
    c[:, :, 2, 0, 0] = 4.0  # one cell of one frame has 4x the score norm of everything else
    masks = torch.zeros(1, 2, 5, 2, 2, dtype=torch.float64)
    masks[:, 0] = 1.0
    masks[:, 0, 2, 0, 0], masks[:, 1, 2, 0, 0] = 0.0, 1.0  # that cell is its own region for that frame only
    kwargs = dict(rate_clamp=None, max_effective_scale=None, smoothing=None)
    sharp = semantic_guidance(u, c, masks, masks[:, :1], 5.0, **kwargs).rate_map
    smooth = semantic_guidance(u, c, masks, masks[:, :1], 5.0, temporal_smoothing=0.5, **kwargs).rate_map
    weights = gaussian_kernel(0.5, dtype=torch.float64)
    jump = sharp[0, 0, 2, 0, 0] - sharp[0, 0, 1, 0, 0]
    assert jump.abs() > 0.5  # the one-frame region really has another rate
    # the centre tap keeps its weight of the jump and hands the side taps theirs, in float64 (a few ulps)
    torch.testing.assert_close(smooth[0, 0, 2, 0, 0] - sharp[0, 0, 1, 0, 0], weights[1] * jump, rtol=1e-12, atol=0)
    torch.testing.assert_close(smooth[0, 0, 1, 0, 0] - sharp[0, 0, 1, 0, 0], weights[0] * jump, rtol=1e-12, atol=0)
    # cells whose rate never changes keep it exactly up to the kernel's sum (1 within 2 ulps)
    torch.testing.assert_close(smooth[0, 0, :, 1, 1], sharp[0, 0, :, 1, 1], rtol=4e-16, atol=0)
    # an image grid ignores the setting
    img = semantic_guidance(u[:, :, 0], c[:, :, 0], masks[:, :, 0], masks[:, :1, 0], 5.0, temporal_smoothing=0.5)
    assert torch.equal(
        img.rate_map, semantic_guidance(u[:, :, 0], c[:, :, 0], masks[:, :, 0], masks[:, :1, 0], 5.0).rate_map
    )


def test_masked_text_columns_are_skipped_without_changing_the_maps():
    """Completion only for columns with attention: masked padding's columns are exactly 0 and stay so."""
    from scfg.engine import MapAccumulator
    from scfg.segment import average_layer_maps

    torch.manual_seed(0)
    cross = torch.rand(2, 12, 9, dtype=torch.float64)
    cross[:, :, 5:] = 0.0  # padding, masked: exactly zero probability
    cross = cross / cross.sum(-1, keepdim=True)
    self_probs = torch.rand(2, 12, 12, dtype=torch.float64).softmax(-1)
    accumulator = MapAccumulator((3, 4))
    accumulator.add(cross, self_probs, (3, 4))
    maps = accumulator.result()
    token, fg = average_layer_maps([(cross, self_probs, (3, 4))], (3, 4))
    # the same products over the same 12-term inner dimension, only fewer output columns: float64 GEMMs may block the
    # columns differently, a few roundings of values <= 1 at most
    torch.testing.assert_close(maps.token, token, rtol=0, atol=1e-14)
    torch.testing.assert_close(maps.foreground, fg, rtol=0, atol=1e-14)
    assert (maps.token[:, 5:] == 0).all()
