"""Per-word guidance control: prompt syntax, word -> token mapping, and its effect on the rate map."""

from __future__ import annotations

import pytest
import torch

import scfg
from scfg import SCFGConfig, SCFGError, WordScale, parse_weighted_prompt
from scfg.rule import apply_token_scales


def test_parse_weighted_prompt_keeps_occurrences_and_punctuation():
    prompt, scales = parse_weighted_prompt("a red cat:2 on the sofa:0.5, a cat")
    assert prompt == "a red cat on the sofa, a cat"
    assert scales == [WordScale("cat", 2.0, 0), WordScale("sofa", 0.5, 0)]
    assert parse_weighted_prompt("no weights here") == ("no weights here", [])


def test_apply_token_scales_modes_and_shared_pixels():
    masks = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]]])  # middle pixel shared
    rate = torch.full((1, 1, 1, 3), 2.0)
    scales = torch.tensor([[3.0, 1.0]])
    assert apply_token_scales(rate, masks, scales)[0, 0, 0].tolist() == [6.0, 4.0, 2.0]
    assert apply_token_scales(rate, masks, scales, "replace")[0, 0, 0].tolist() == [3.0, 2.0, 1.0]


def run(pipe, prompt, recorder, mode="multiply", **enable_kwargs):
    x = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0))
    config = SCFGConfig(rate_map_smoothing=None, token_scale_mode=mode)
    with scfg.enable(pipe, config, on_step=recorder, **enable_kwargs):
        return pipe(prompt, height=64, width=96, num_inference_steps=2, latents=x, output_type="latent").images


def test_token_scales_multiply_and_replace_the_word_region(tiny_sd):
    base, multiplied, replaced = scfg.Recorder(), scfg.Recorder(), scfg.Recorder()
    run(tiny_sd, "a red cat on the sofa", base)
    run(tiny_sd, "a red cat on the sofa", multiplied, token_scales={"cat": 1.5})
    run(tiny_sd, "a red cat on the sofa", replaced, mode="replace", token_scales=[WordScale("cat", 2.5)])
    step0 = base.steps[0]
    cat = step0.token_masks[0, 3].repeat_interleave(4, 0).repeat_interleave(4, 1)  # token 3 is "cat"
    assert step0.tokens[0][3] == "cat</w>" and cat.any()
    r0, r1 = step0.rate_map[0, 0], multiplied.steps[0].rate_map[0, 0]
    # exact: step 0 of all three runs sees the same predictions, the rate map is not smoothed, and "cat" is the only
    # scaled token (its mean scale is 1.5/1 or 2.5/1): the same float32 product as here, or the scale itself
    assert torch.equal(r1[cat], r0[cat] * 1.5)
    assert torch.equal(r1[~cat], r0[~cat])
    assert torch.equal(replaced.steps[0].rate_map[0, 0][cat], torch.full_like(r0[cat], 2.5))


def test_multi_token_word_scales_all_its_tokens(tiny_sd):
    base, scaled = scfg.Recorder(), scfg.Recorder()
    # "zqx" is not in the tiny vocabulary: the tokenizer splits it into characters
    run(tiny_sd, "a zqx cat", base)
    run(tiny_sd, "a zqx cat", scaled, token_scales={"zqx": 2.0})
    step0 = base.steps[0]
    assert step0.tokens[0][2:5] == ["z", "q", "x</w>"]
    masks = step0.token_masks.float().repeat_interleave(4, 2).repeat_interleave(4, 3)  # mask grid -> latent
    every, first_only = torch.full((1, masks.shape[1]), float("nan")), torch.full((1, masks.shape[1]), float("nan"))
    every[0, 2:5] = 2.0
    first_only[0, 2] = 2.0
    expected = apply_token_scales(step0.rate_map, masks, every)
    # The check discriminates: "q" or "x" owns pixels that "z" does not, so scaling "z" alone would differ.
    assert not torch.allclose(apply_token_scales(step0.rate_map, masks, first_only), expected)
    # exact: the same function on the same float32 inputs (nearest upsampling by 4 is `repeat_interleave(4)`)
    assert torch.equal(scaled.steps[0].rate_map, expected)


def test_unknown_word_lists_the_prompt_words(tiny_sd):
    with pytest.raises(SCFGError, match=r"dog.*words are: a, cat, red"):
        run(tiny_sd, "a red cat", scfg.Recorder(), token_scales={"dog": 2.0})


def test_token_scales_need_a_text_prompt(tiny_sd):
    cond, uncond = tiny_sd.encode_prompt("a cat", "cpu", 1, True)
    with pytest.raises(SCFGError, match="prompt_embeds"), scfg.enable(tiny_sd, token_scales={"cat": 2.0}):
        tiny_sd(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_inference_steps=1)


def test_cli_weighted_prompt(tiny_sd_path, tmp_path):
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "w.png"
    assert (
        main(
            [
                "generate",
                "a red cat:2 on the sofa:0.5",
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
            ]
        )
        == 0
    )
    assert json.loads(Image.open(out).text["scfg"])["prompt"] == "a red cat:2 on the sofa:0.5"
