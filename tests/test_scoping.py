"""Guidance applies exactly to the calls of the enabled pipeline inside the block, and bad input is stopped at the door.

Each case here failed before the change that added it (issue: a new user's first hour).
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import scfg
from scfg import SCFGConfig, SCFGError


def latents(n=1, seed=0):
    return torch.randn(n, 4, 32, 48, generator=torch.Generator().manual_seed(seed))


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(
        "a red cat", height=64, width=96, latents=latents(), output_type="latent", guidance_scale=7.5, **kwargs
    ).images


def unet_output(pipe):
    """One direct `unet(...)` call on a fixed CFG-shaped batch."""
    x = latents(2, seed=1)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    return pipe.unet(x, torch.tensor(500), encoder_hidden_states=text).sample


# -- 4. guidance only where it was asked for ---------------------------------------------------------------------


def test_other_pipeline_on_the_same_unet_is_not_guided(tiny_sd):
    """An img2img pipeline built from `pipe.components` shares the UNet but was never enabled."""
    other = StableDiffusionImg2ImgPipeline(**tiny_sd.components)
    other.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    kwargs = dict(image=image, strength=0.8, num_inference_steps=3, output_type="latent", guidance_scale=7.5)
    plain = other("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    recorder = scfg.Recorder()
    with scfg.enable(tiny_sd, on_step=recorder):
        run(tiny_sd)  # the enabled pipeline's own call leaves state that must not leak
        steps_of_enabled = len(recorder.steps)
        inside = other("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert steps_of_enabled == 2 and len(recorder.steps) == 2  # no step of `other` was guided
    assert torch.equal(inside, plain)


def test_direct_denoiser_calls_are_left_alone_before_and_after_a_call(tiny_sd):
    plain = unet_output(tiny_sd)
    with scfg.enable(tiny_sd):
        before = unet_output(tiny_sd)
        run(tiny_sd)
        after = unet_output(tiny_sd)
    assert torch.equal(before, plain) and torch.equal(after, plain)


def test_copy_and_pickle_inside_the_block_raise_clearly(tiny_sd):
    with scfg.enable(tiny_sd):
        with pytest.raises(SCFGError, match=r"outside `scfg\.enable"):
            copy.deepcopy(tiny_sd)
        with pytest.raises(SCFGError, match=r"outside `scfg\.enable"):
            pickle.dumps(tiny_sd)
    clone = copy.deepcopy(tiny_sd)  # after the block: a plain pipeline again
    assert type(clone) is StableDiffusionPipeline
    assert not clone.unet._forward_hooks and not clone.unet._forward_pre_hooks


def test_enable_without_with_warns(tiny_sd):
    with pytest.warns(RuntimeWarning, match="never entered"):
        scfg.enable(tiny_sd)
        gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with scfg.enable(tiny_sd):
            pass
        gc.collect()


def test_call_state_is_dropped_when_the_call_raises(tiny_sd):
    def boom(pipeline, step, timestep, callback_kwargs):
        raise RuntimeError("stop")

    guard = scfg.enable(tiny_sd)
    with guard:
        with pytest.raises(RuntimeError, match="stop"):
            run(tiny_sd, callback_on_step_end=boom)
        plain = unet_output(tiny_sd)
    assert torch.equal(plain, unet_output(tiny_sd))


# -- 6. input validation at the door -----------------------------------------------------------------------------

BAD_CONFIGS = {
    "string-for-float": ({"rate_map_smoothing": "0.5"}, "rate_map_smoothing"),
    "string-for-cap": ({"max_effective_scale": "15"}, "max_effective_scale"),
    "bare-int-levels": ({"levels": 4}, "levels"),
    "bool-levels": ({"levels": (True,)}, "levels"),
    "bool-layers": ({"layers_per_stack": True}, "layers_per_stack"),
    "float-layers": ({"layers_per_level": 2.0}, "layers_per_level"),
    "string-clamp": ({"rate_clamp": "0.8,3"}, "rate_clamp"),
    "clamp-with-none": ({"rate_clamp": (0.8, None)}, "rate_clamp"),
    "bool-clamp": ({"rate_clamp": (True, 3.0)}, "rate_clamp"),
    "bool-fraction": ({"stop_fraction": True}, "stop_fraction"),
    "string-fraction": ({"start_fraction": "0"}, "start_fraction"),
    "fraction-above-one": ({"stop_fraction": 1.5}, "stop_fraction"),
    "list-choice": ({"completion": ["official"]}, "completion"),
    "unknown-preset": ({"preset_name": "fast"}, "preset_name"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_field_of_the_wrong_type_is_rejected(case):
    overrides, field = BAD_CONFIGS[case]
    with pytest.raises(SCFGError, match=f"Expected `{field}`"):
        SCFGConfig(**overrides)


@pytest.mark.parametrize(
    "scales",
    ["cat", [("cat", 1.5)], {"cat": "big"}, {"cat": True}, {"cat": float("nan")}, {"cat": 1e30}, {"cat": -1.0}],
    ids=["string", "pairs", "non-numeric", "bool", "nan", "overflow", "negative"],
)
def test_bad_token_scales_are_rejected_at_enable(tiny_sd, scales):
    with pytest.raises(SCFGError, match=r"token_scales|scale"):
        scfg.enable(tiny_sd, token_scales=scales)


def test_on_step_and_recorder_are_checked(tiny_sd):
    with pytest.raises(SCFGError, match="`on_step`"):
        scfg.enable(tiny_sd, on_step="print")
    for bad in ("10", 2.5, True, 0):
        with pytest.raises(SCFGError, match="`max_steps`"):
            scfg.Recorder(max_steps=bad)


def test_infinite_guidance_scale_is_refused_before_sampling(tiny_sd):
    with scfg.enable(tiny_sd), pytest.raises(SCFGError, match=r"finite `guidance_scale`"):
        tiny_sd("a cat", height=64, width=64, num_inference_steps=2, guidance_scale=float("inf"))


# -- 5. what the text encoder saw is what the regions use -------------------------------------------------------


def test_textual_inversion_tokens_follow_the_expanded_prompt(tiny_sd):
    dim = tiny_sd.text_encoder.config.hidden_size
    embeds = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
    tiny_sd.load_textual_inversion({"<toy>": embeds}, token="<toy>")  # 3 vectors: <toy> <toy>_1 <toy>_2
    expanded = tiny_sd.maybe_convert_prompt("a <toy> on the sofa", tiny_sd.tokenizer)
    assert expanded.split() == ["a", "<toy>", "<toy>_1", "<toy>_2", "on", "the", "sofa"]
    seen = tiny_sd.tokenizer(expanded, padding="max_length", max_length=77).input_ids
    recorder = scfg.Recorder()
    config = SCFGConfig(region_tokens="words", rate_map_smoothing=None)
    with scfg.enable(tiny_sd, config, on_step=recorder, token_scales={"<toy>": 2.0}):
        tiny_sd(
            "a <toy> on the sofa", height=64, width=96, latents=latents(), num_inference_steps=1, output_type="latent"
        )
    report = recorder.steps[0]
    assert report.tokens[0] == tiny_sd.tokenizer.convert_ids_to_tokens(seen)  # the ids the text encoder got
    toy = [i for i, t in enumerate(report.tokens[0]) if t.startswith("<toy>")]
    assert len(toy) == 3 and toy == list(range(toy[0], toy[0] + 3))
    # the per-word scale covers all three vectors: each region they own runs at twice its clamped rate
    size = report.rate_map.shape[-2:]
    owners = [t for t in toy if report.token_masks[0, t].any()]
    assert owners, "the three <toy> vectors own no region in this seed: pick another"
    masks = torch.nn.functional.interpolate(report.token_masks[:1].float(), size=size)[0]  # nearest, as S-CFG
    for t in owners:
        region = (masks[t] > 0) & (masks.sum(0) == 1)  # pixels owned by this token alone
        expected = 2 * min(max(float(report.token_rates[0, t]), 0.8), 3.0, 15 / 7.5)
        # float32: the clamp to float32(0.8) is half an ulp from the Python 0.8 here, the cap 2.0 and the product
        # by the scale 2 (a mean of one scale) are exact, so one ulp bounds the difference
        inside = report.rate_map[0, 0][region]
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(inside, torch.full_like(inside, expected), rtol=eps, atol=0)
