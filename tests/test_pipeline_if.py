"""S-CFG on DeepFloyd IF stage I and II (tiny, built from configs, T5 tokenizer without a start token)."""

from __future__ import annotations

import torch
from bounds import softmax_rtol
from diffusers import IFPipeline, IFSuperResolutionPipeline
from diffusers.models.attention_processor import Attention

import scfg
from scfg import SCFGConfig
from scfg.capture import LayerCall
from scfg.families import LayerPair
from scfg.families.deepfloyd_if import FAMILY, joint_added_kv_attention, joint_added_kv_probs


def load(cls, path):
    pipe = cls.from_pretrained(str(path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_joint_probs_split_into_cross_and_self_by_hand():
    torch.manual_seed(0)
    attn = Attention(
        query_dim=8,
        heads=2,
        dim_head=4,
        added_kv_proj_dim=6,
        norm_num_groups=4,
        out_bias=True,
        upcast_softmax=True,
        only_cross_attention=False,
        cross_attention_norm="group_norm",
        cross_attention_norm_num_groups=2,
        residual_connection=True,
        bias=True,
    )
    hidden = torch.randn(2, 8, 3, 4)  # 12 image tokens
    text = torch.randn(2, 5, 6)  # 5 text tokens
    joint = joint_added_kv_probs(attn, hidden, text)
    # by hand: group norms, projections, one softmax over [text keys; image keys]
    x = attn.group_norm(hidden.view(2, 8, 12)).transpose(1, 2)
    ctx = attn.norm_cross(text.transpose(1, 2)).transpose(1, 2)
    q = attn.to_q(x).view(2, 12, 2, 4).transpose(1, 2)
    k = torch.cat([attn.add_k_proj(ctx), attn.to_k(x)], dim=1).view(2, 17, 2, 4).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) / 2.0).softmax(-1).mean(1)
    # the capture's float32 softmax against the by-hand one over the same q and k: tests/bounds.py
    torch.testing.assert_close(joint, expected, rtol=softmax_rtol(q, k, 0.5), atol=torch.finfo(torch.float32).tiny)

    rows = joint_added_kv_attention(attn, LayerCall((hidden, text, None), {}))
    cross, self_rows = FAMILY.layer_attention(LayerPair("a", "a", 4), {"a": rows}, None)
    self_part = self_rows.dense()
    assert cross.shape == (2, 12, 5) and self_part.shape == (2, 12, 12)
    # the split is a slice: the text columns first, bit for bit
    assert torch.equal(cross, joint[..., :5]) and torch.equal(self_part, joint[..., 5:])
    # rows of the self part no longer sum to 1; cross + self do: a softmax row of K = 17 terms sums to 1 within
    # (K + 1) roundings, the 2-head mean adds 2 and the two partial sums K more, so (2K + 3)·eps/2 < (K + 2)·eps
    row_sum = cross.sum(-1) + self_part.sum(-1)
    torch.testing.assert_close(row_sum, torch.ones(2, 12), rtol=0, atol=(17 + 2) * torch.finfo(torch.float32).eps)
    assert (self_part.sum(-1) < 1).all()


def test_if_stage1_official_preset_and_per_sample_masks(tiny_if_path):
    pipe = load(IFPipeline, tiny_if_path).to(torch.float64)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert guard.config.benchmark == "mean" and guard.config.rate_clamp is None
    assert guard.config.max_effective_scale == 15.0 and guard.config.layers_per_level == 3
    assert {p.level for p in guard.pairs} == {4, 8}
    # latent/8 has 4 layers here (down 3, mid, 2x up 0): the first in forward order is dropped
    assert [p.cross for p in guard.pairs if p.level == 8] == [
        "mid_block.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
    ]
    assert sum(p.level == 4 for p in guard.pairs) == 3
    prompts = ["a red cat on the sofa", "a blue dog"]

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kwargs = dict(
        num_inference_steps=3, output_type="pt", clean_caption=False, guidance_scale=7.0, height=32, width=48
    )
    with guard:
        batched = pipe(prompts, num_images_per_prompt=2, generator=gens(0, 1, 2, 3), **kwargs).images
        singles = [pipe(prompts[i // 2], generator=gens(i), **kwargs).images for i in range(4)]
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; IF stage I amplifies
    # that the most of the families (measured: ~2e-11 on images in [0, 1] after 3 DDPM steps), still 50× under
    # 1e-9, while a mask or rate taken from another sample moves the images by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 77, 8, 12) and report.rate_map.shape == (4, 1, 32, 48)
    assert report.tokens[0][0] == "▁a"  # T5: token 0 is the first word
    rates = torch.stack([r.rate_map for r in recorder.steps[:3]])  # the batched call
    # the cap min(rate, 15/7) is exact; the smoothing after it is a convex combination whose float64 weights sum
    # to 1 within a few ulps, so the cap holds to ~1e-15
    assert rates.max() <= 15.0 / 7.0 * (1 + 16 * torch.finfo(torch.float64).eps) and torch.isfinite(rates).all()
    assert type(pipe) is IFPipeline and not pipe.unet._forward_hooks


def test_if_unit_rate_equals_plain_cfg(tiny_if_path):
    pipe = load(IFPipeline, tiny_if_path).to(torch.float64)
    kwargs = dict(
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
        clean_caption=False,
        generator=torch.Generator().manual_seed(1),
    )
    plain = pipe("a cat", **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(1)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        forced = pipe("a cat", **kwargs).images
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); 2 DDPM steps through a tiny UNet amplify that far less
    # than 1e4× (measured: ~6e-15 on images in [0, 1]), so 1e-9 is loose by orders of magnitude, while a rate of
    # 1.001 everywhere already moves the images by ~5e-3
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-9 * float(plain.abs().max()))


def test_if_stage2_official_preset_uses_foreground(tiny_if2_path):
    pipe = load(IFSuperResolutionPipeline, tiny_if2_path)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert guard.config.benchmark == "foreground" and guard.config.rate_clamp is None
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    with guard:
        out = pipe(
            "a red cat",
            image=image,
            height=32,
            width=48,
            num_inference_steps=2,
            output_type="pt",
            clean_caption=False,
            noise_level=50,
        ).images
    assert torch.isfinite(out).all() and len(recorder.steps) == 2
    assert recorder.steps[0].token_masks.shape[-2:] == (8, 12)
