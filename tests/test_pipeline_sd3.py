"""S-CFG on Stable Diffusion 3 (tiny MMDiT, CLIP + T5 text, flow matching)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from bounds import softmax_rtol
from diffusers import StableDiffusion3Pipeline
from packaging.version import Version

import scfg
from scfg import SCFGConfig
from scfg.capture import LayerCall
from scfg.families import LayerPair
from scfg.families.sd3_mmdit import FAMILY, joint_image_query_attention, joint_image_query_probs

KW = dict(num_inference_steps=3, output_type="latent", max_sequence_length=16)


def load(path, dtype=torch.float32):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), use_safetensors=True).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_joint_attention_split_by_hand(tiny_sd3_path):
    pipe = load(tiny_sd3_path)
    attn = pipe.transformer.transformer_blocks[1].attn
    image, text = torch.randn(2, 12, 16), torch.randn(2, 5, 16)
    joint = joint_image_query_probs(attn, image, text)
    assert attn.norm_q is None  # this tiny config has no qk-norm (SD3.5 has; the capture applies it when present)
    q = attn.to_q(image).view(2, 12, 2, 8).transpose(1, 2)
    k = torch.cat(
        [attn.to_k(image).view(2, 12, 2, 8).transpose(1, 2), attn.add_k_proj(text).view(2, 5, 2, 8).transpose(1, 2)],
        dim=2,
    )
    expected = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean(1)
    # the capture's float32 softmax against the by-hand one over the same q and k: tests/bounds.py
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    rtol = softmax_rtol(q, k, 8**-0.5)
    torch.testing.assert_close(joint, expected, rtol=rtol, atol=tiny)
    rows = joint_image_query_attention(attn, LayerCall((image, text, None), {}))
    cross, self_rows = FAMILY.layer_attention(LayerPair("x", "x", 2), {"x": rows}, None)
    self_part = self_rows.dense()
    # renormalising the 5 text columns on both sides: numerator and denominator each off by rtol, the 5-term sum
    # and the division add 5 roundings per side
    text = expected[..., 12:]
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), rtol=2 * rtol + 5 * eps, atol=tiny)
    # renormalised rows: 12 quotients by one 12-term sum, then summed again: (11 + 1 + 11) roundings of eps / 2
    torch.testing.assert_close(self_part.sum(-1), torch.ones(2, 12), rtol=0, atol=12 * eps)


@pytest.mark.skipif(
    Version(diffusers.__version__) < Version("0.36"),
    reason="diffusers<0.36 orders SD3's pooled embeddings wrongly for several prompts x num_images_per_prompt>1",
)
def test_sd3_per_sample_masks_and_clip_plus_t5_tokens(tiny_sd3_path):
    pipe = load(tiny_sd3_path, torch.float64)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert [p.cross for p in guard.pairs] == ["transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    prompts = ["a red cat on the sofa", "a blue dog"]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    with guard:
        batched = pipe(prompts, num_images_per_prompt=2, height=64, width=96, generator=gens, **KW).images
        singles = [
            pipe(prompts[i // 2], height=64, width=96, generator=torch.Generator().manual_seed(i), **KW).images
            for i in range(4)
        ]
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; through 3 flow steps
    # of the tiny MMDiT the latents differ by ~1e-15, so 1e-9 is loose by orders of magnitude, while a mask or rate
    # taken from another sample moves them by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 77 + 16, 8, 12)  # tokens 16x24, pooled 2x2 (`mask_pool=2`)
    tokens = report.tokens[2]
    assert tokens[:4] == ["<|startoftext|>", "a</w>", "blue</w>", "dog</w>"]
    assert tokens[77:81] == ["▁a", "▁blue", "▁dog", "</s>"]


def test_sd3_token_scales_cover_both_text_parts(tiny_sd3_path):
    pipe = load(tiny_sd3_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, token_scales={"cat": 2.0}, on_step=recorder):
        pipe("a red cat", height=64, width=64, **KW)
    # "cat" is CLIP position 3 (after the start token) and T5 position 2 (no start token)
    tokens = recorder.steps[0].tokens[0]
    assert tokens[3] == "cat</w>" and tokens[77 + 2] == "▁cat"
    from scfg.tokens import token_scale_tensor

    segments = scfg.families.family_for(pipe).tokenize(pipe, ["a red cat"], len(tokens))
    scales = token_scale_tensor(segments, ["a red cat"], {"cat": 2.0})
    assert (~torch.isnan(scales[0])).nonzero().flatten().tolist() == [3, 77 + 2]


def test_sd3_unit_rate_equals_plain_cfg_and_skip_layer_pass_is_left_alone(tiny_sd3_path):
    pipe = load(tiny_sd3_path, torch.float64)
    kwargs = dict(height=64, width=64, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, **KW)
    plain = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    recorder = scfg.Recorder()
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None), on_step=recorder):
        forced = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); 3 flow steps (and the skip-layer line, which sees the
    # model's own cond) amplify that far less than 1e4× (measured: ~1e-16 of max|latents|), so 1e-9 of max|latents|
    # is loose by orders of magnitude, while a rate of 1.001 everywhere already moves them by ~2e-4 of their maximum
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-9 * float(plain.abs().max()))
    assert len(recorder.steps) == 3  # only the CFG passes
    assert type(pipe) is StableDiffusion3Pipeline and not pipe.transformer._forward_hooks
