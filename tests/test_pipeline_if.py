"""S-CFG on DeepFloyd IF stage I and II (tiny, built from configs, T5 tokenizer without a start token)."""

from __future__ import annotations

import torch
from diffusers import IFPipeline, IFSuperResolutionPipeline
from diffusers.models.attention_processor import Attention

import scfg
from scfg import SCFGConfig
from scfg.families import LayerPair
from scfg.families.deepfloyd_if import FAMILY, joint_added_kv_probs


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
    torch.testing.assert_close(joint, expected, rtol=1e-5, atol=1e-6)

    cross, self_part = FAMILY.layer_inputs(LayerPair("a", "a", 4), {"a": joint})
    assert cross.shape == (2, 12, 5) and self_part.shape == (2, 12, 12)
    torch.testing.assert_close(cross, expected[..., :5])
    # rows of the self part no longer sum to 1; cross + self do
    torch.testing.assert_close(cross.sum(-1) + self_part.sum(-1), torch.ones(2, 12))
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
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 77, 8, 12) and report.rate_map.shape == (4, 1, 32, 48)
    assert report.tokens[0][0] == "▁a"  # T5: token 0 is the first word
    rates = torch.stack([r.rate_map for r in recorder.steps[:3]])  # the batched call
    assert rates.max() <= 15.0 / 7.0 + 1e-9 and torch.isfinite(rates).all()
    assert type(pipe) is IFPipeline and not pipe.unet._forward_hooks


def test_if_unit_rate_equals_plain_cfg(tiny_if_path):
    pipe = load(IFPipeline, tiny_if_path)
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
    torch.testing.assert_close(forced, plain, rtol=1e-5, atol=1e-5)


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
