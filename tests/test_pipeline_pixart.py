"""S-CFG on PixArt-Sigma (tiny DiT, T5 with padding masks, learned sigma)."""

from __future__ import annotations

import torch
from bounds import softmax_rtol
from diffusers import PixArtSigmaPipeline

import scfg
from scfg import SCFGConfig
from scfg.capture import head_averaged_probs
from scfg.families.pixart import FAMILY

KW = dict(num_inference_steps=3, output_type="latent", use_resolution_binning=False, max_sequence_length=24)


def load(path, dtype=torch.float32):
    pipe = PixArtSigmaPipeline.from_pretrained(str(path), use_safetensors=True).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_masked_cross_attention_by_hand(tiny_pixart_path):
    pipe = load(tiny_pixart_path)
    attn = pipe.transformer.transformer_blocks[1].attn2
    hidden, text = torch.randn(2, 12, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    bias = ((1 - mask.float()) * -10000.0).unsqueeze(1)
    probs = head_averaged_probs(attn, hidden, text, bias)
    q = attn.to_q(hidden).view(2, 12, 2, 8).transpose(1, 2)
    k = attn.to_k(text).view(2, 6, 2, 8).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) / 8**0.5 + bias[:, None]).softmax(-1).mean(1)
    # the capture's float32 softmax against the by-hand one over the same q and k: tests/bounds.py; masked keys
    # are exactly 0 on both sides (exp underflows)
    rtol = softmax_rtol(q, k, 8**-0.5)
    torch.testing.assert_close(probs, expected, rtol=rtol, atol=torch.finfo(torch.float32).tiny)
    reference, valid = FAMILY.token_roles(probs)
    assert valid.tolist() == mask.bool().tolist()
    assert reference.tolist() == [2, 4]  # EOS: the last unmasked token


def test_pixart_masks_per_sample_padding_never_owns_regions(tiny_pixart_path):
    pipe = load(tiny_pixart_path, torch.float64)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert guard.config.foreground_source == "cond"
    assert [p.cross for p in guard.pairs] == ["transformer_blocks.1.attn2", "transformer_blocks.2.attn2"]
    prompts = ["a red cat on the sofa", "a blue dog"]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    with guard:
        batched = pipe(prompts, num_images_per_prompt=2, height=64, width=96, generator=gens, **KW).images
        singles = [
            pipe(prompts[i // 2], height=64, width=96, generator=torch.Generator().manual_seed(i), **KW).images
            for i in range(4)
        ]
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; through 3 steps of
    # the tiny DiT the latents (up to ~800 here) differ by ~1e-12 (~1e-15 relative), so 1e-9 absolute is loose by
    # orders of magnitude, while a mask or rate taken from another sample moves them by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 24, 8, 12)  # latent 32x48 / patch 2, pooled 2x2 (`mask_pool=2`)
    owners = report.token_masks.flatten(2).any(dim=2)
    # "a blue dog" is 3 words + </s>: padding positions 4.. never own a region
    assert not owners[2:, 4:].any() and owners[2:, :4].any()
    assert report.tokens[2][:4] == ["▁a", "▁blue", "▁dog", "</s>"]
    assert report.foreground_mask.any()


def test_pixart_unit_rate_equals_plain_cfg_and_restores(tiny_pixart_path):
    pipe = load(tiny_pixart_path, torch.float64)
    before = dict(pipe.transformer.attn_processors)
    plain = pipe("a red cat", height=64, width=64, generator=torch.Generator().manual_seed(0), **KW).images
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        forced = pipe("a red cat", height=64, width=64, generator=torch.Generator().manual_seed(0), **KW).images
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); 3 solver steps through a tiny DiT amplify that far less
    # than 1e4× (measured: ~2e-16 of max|latents|), so 1e-9 of max|latents| is loose by orders of magnitude, while
    # a rate of 1.001 everywhere already moves the latents by ~1e-4 of their maximum
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-9 * float(plain.abs().max()))
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())
    assert type(pipe) is PixArtSigmaPipeline and not pipe.transformer._forward_hooks
