"""`mask_interval=k`: regions recomputed every k steps, reused (with no attention captured) in between."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_sd import latents_for, run

import scfg
import scfg.capture
import scfg.engine as integ
from scfg import SCFGConfig, SCFGError


def count_captures(monkeypatch):
    """Count the denoiser passes that computed attention maps (one call per used layer per pass)."""
    calls = []
    original = scfg.capture.rows_from_projections

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("scfg.capture.rows_from_projections", counting)
    return calls


def test_reused_steps_capture_nothing_and_keep_the_masks(tiny_sd, monkeypatch):
    calls = count_captures(monkeypatch)
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, on_step=recorder):
        run(tiny_sd, "a cat on a mat", latents_for(1), num_inference_steps=7)
    per_pass = len(calls) // 7
    assert per_pass > 0 and len(calls) == 7 * per_pass
    every_step = recorder.steps

    calls.clear()
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, SCFGConfig(mask_interval=3), on_step=recorder):
        run(tiny_sd, "a cat on a mat", latents_for(1), num_inference_steps=7)
    assert len(calls) == 3 * per_pass  # steps 0, 3 and 6 capture
    steps = recorder.steps
    assert [r.step for r in steps] == list(range(7))
    for r in steps:
        source = steps[r.step - r.step % 3]
        assert torch.equal(r.token_masks, source.token_masks)
        assert torch.equal(r.foreground_mask, source.foreground_mask)
    # The first step is the same computation either way; later rates follow each step's own score.
    assert torch.equal(steps[0].rate_map, every_step[0].rate_map)
    assert not torch.equal(steps[1].region_norms, steps[0].region_norms)
    assert not torch.equal(steps[3].token_masks, steps[0].token_masks) or not torch.equal(
        steps[3].foreground_mask, steps[0].foreground_mask
    )


def test_reuse_equals_every_step_run_fed_the_kept_masks(tiny_sd, monkeypatch):
    """A k=2 run is a k=1 run whose mask functions return, on odd steps, the previous step's masks."""
    latents = latents_for(2, seed=3)
    with scfg.enable(tiny_sd, SCFGConfig(mask_interval=2)):
        reused = run(tiny_sd, ["a cat", "two dogs on grass"], latents, num_inference_steps=5)

    passes = {"assign_regions": 0, "foreground_mask": 0}
    assign, foreground = integ.assign_regions, integ.foreground_mask

    def keeping_odd_passes(name, fn):
        """`fn`, but on every second call it returns the previous call's result instead of its own."""
        kept = []

        def wrapper(*args, **kwargs):
            passes[name] += 1
            out = fn(*args, **kwargs)
            if passes[name] % 2 == 1:
                kept[:] = [out]
            return kept[0]

        return wrapper

    fake_assign = keeping_odd_passes("assign_regions", assign)
    fake_foreground = keeping_odd_passes("foreground_mask", foreground)
    monkeypatch.setattr(integ, "assign_regions", fake_assign)
    monkeypatch.setattr(integ, "foreground_mask", fake_foreground)
    with scfg.enable(tiny_sd):
        expected = run(tiny_sd, ["a cat", "two dogs on grass"], latents, num_inference_steps=5)
    assert passes == {"assign_regions": 5, "foreground_mask": 5}
    # the same float32 computation, fed the same masks: bit for bit
    torch.testing.assert_close(reused, expected, rtol=0, atol=0)

    monkeypatch.setattr(integ, "assign_regions", assign)
    monkeypatch.setattr(integ, "foreground_mask", foreground)
    with scfg.enable(tiny_sd):
        every_step = run(tiny_sd, ["a cat", "two dogs on grass"], latents, num_inference_steps=5)
    assert not torch.equal(reused, every_step)


def test_kept_masks_do_not_leak_into_the_next_call(tiny_sd):
    config = SCFGConfig(mask_interval=4)
    with scfg.enable(tiny_sd, config):
        run(tiny_sd, "a cat", latents_for(1), num_inference_steps=3)
        second = run(tiny_sd, "a red car", latents_for(1, seed=1, h=64, w=64), num_inference_steps=3)
        third = run(tiny_sd, ["a dog", "a bird"], latents_for(2, seed=2), num_inference_steps=3)
    with scfg.enable(tiny_sd, config):
        fresh_second = run(tiny_sd, "a red car", latents_for(1, seed=1, h=64, w=64), num_inference_steps=3)
    with scfg.enable(tiny_sd, config):
        fresh_third = run(tiny_sd, ["a dog", "a bird"], latents_for(2, seed=2), num_inference_steps=3)
    assert torch.equal(second, fresh_second)
    assert torch.equal(third, fresh_third)


def test_first_guided_step_computes_masks_with_step_fractions(tiny_sd, monkeypatch):
    calls = count_captures(monkeypatch)
    with scfg.enable(tiny_sd):
        run(tiny_sd, "a cat", latents_for(1), num_inference_steps=1)
    per_pass = len(calls)  # one capture per used layer in one guided pass
    calls.clear()
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, SCFGConfig(mask_interval=2, start_fraction=0.5), on_step=recorder):
        run(tiny_sd, "a cat", latents_for(1), num_inference_steps=6)
    assert [r.step for r in recorder.steps] == [3, 4, 5]
    assert torch.equal(recorder.steps[1].token_masks, recorder.steps[0].token_masks)
    assert per_pass > 0 and len(calls) == 2 * per_pass  # steps 3 and 5 captured, step 4 reused


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_invalid_mask_interval_is_rejected(value):
    with pytest.raises(SCFGError, match="mask_interval"):
        SCFGConfig(mask_interval=value)


def test_presets_recompute_every_step():
    assert SCFGConfig.preset("official").resolve().mask_interval == 1
    assert SCFGConfig.preset("paper").resolve().mask_interval == 1
