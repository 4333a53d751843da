"""S-CFG on a stock HunyuanVideo15Pipeline: CFG through its `ClassifierFreeGuidance` guider (a cond pass, then an
uncond pass, combined by the guider), 5-D latents `[B, C, F, H, W]` with patch 1, joint attention over `[image;
text]` with RoPE on the image tokens and masked text padding. Built from configs offline
(tests/tiny_hunyuan_video15.py).

The text encoders are built too (a tiny Qwen2.5-VL text model over a byte-level Qwen2 tokenizer, a tiny byT5), so
prompts go in as text. Most tests shorten the pipeline's text lengths (`shorten_text`: 8 + 16 + 32 positions
instead of 729 + 256 + 1000, the crop where the released tokenizer's lands); the first test keeps the released ones.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

try:
    from diffusers import ClassifierFreeGuidance, HunyuanVideo15Pipeline
    from diffusers.models.transformers import transformer_hunyuan_video15
except (ImportError, RuntimeError):  # diffusers < 0.36, or transformers without Qwen2.5-VL (the CI floor versions)
    pytest.skip("HunyuanVideo15Pipeline needs diffusers >= 0.36 and Qwen2.5-VL", allow_module_level=True)

from tiny_hunyuan_video15 import FRAMES, HEIGHT, LATENT, WIDTH, build_tiny_hunyuan_video15, shorten_text

import scfg
from scfg import SCFGConfig, SCFGError
from scfg.capture import AttentionCapture
from scfg.families import family_for
from scfg.families.hunyuan_video15 import FAMILY, hunyuan_video15_bias, hunyuan_video15_qk

MASKS = (3, 2, 3)  # LATENT (patch 1: the token grid) pooled 2x2 per frame (`mask_pool=2`)

KW = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3, output_type="latent")
LAYER = "transformer_blocks.1.attn"
Q = LATENT[0] * LATENT[1] * LATENT[2]  # image tokens: the 3x4x6 latent, patch 1


@pytest.fixture(scope="session")
def tiny_hv15_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hunyuan-video15")
    build_tiny_hunyuan_video15(str(folder))
    return folder


def load(path, dtype=torch.float32, short=True):
    pipe = HunyuanVideo15Pipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    if short:
        shorten_text(pipe)
    return pipe


def run(pipe, prompt, negative=None, seed=0, **kwargs):
    if isinstance(prompt, list) and isinstance(negative, str):
        negative = [negative] * len(prompt)  # the stock pipeline needs one negative prompt per prompt
    return pipe(
        prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(seed), **{**KW, **kwargs}
    ).frames


def record_text_masks(pipe):
    """The attention masks `[B, T]` the transformer gives `LAYER`, one per pass."""
    masks = []

    def keep(module, args, kwargs):
        masks.append(kwargs["attention_mask"].clone())

    return masks, pipe.transformer.get_submodule(LAYER).register_forward_pre_hook(keep, with_kwargs=True)


def test_tiny_pipeline_reloads_and_runs_with_the_released_text_layout(tiny_hv15_path):
    pipe = load(tiny_hv15_path, short=False)
    assert isinstance(pipe.guider, ClassifierFreeGuidance) and family_for(pipe) is FAMILY
    prompt = 'a red cat holding a sign "hi"'
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder) as guard:
        assert guard.config.foreground_source == "cond"  # this family's presets
        assert [pair.cross for pair in guard.pairs] == ["transformer_blocks.1.attn", "transformer_blocks.2.attn"]
        video = run(pipe, prompt, num_inference_steps=1, output_type="np")
    assert video.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and np.isfinite(video).all()
    report = recorder.steps[0]
    # 729 image + 256 byT5 + 1000 MLLM positions; the token grid is the latent's (frames, height, width)
    assert report.token_masks.shape == (1, 729 + 256 + 1000, *MASKS)
    # The prompt's own tokens sit after the byT5 glyph tokens and what the fixed crop leaves of the system message
    # (this byte-level tokenizer's system message is longer than 108 tokens); every other position is the pad token.
    pad = pipe.tokenizer.pad_token
    assert [t for t in report.tokens[0] if t != pad] == pipe.tokenizer.tokenize(prompt)


def test_hunyuan_maps_equal_a_float64_reference(tiny_hv15_path):
    """The family's cross/self maps of one layer against softmax(q kᵀ) of the image queries over `[image; text]`
    keys, masked text keys set to -inf by hand, split and renormalised by hand, all in float64."""
    transformer = load(tiny_hv15_path, torch.float64).transformer
    attn = transformer.get_submodule(LAYER)
    inputs = {}
    handle = attn.register_forward_pre_hook(lambda m, a, k: inputs.update(k) or None, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    mllm, byt5 = torch.zeros(2, 32), torch.zeros(2, 16)
    mllm[0, :5], mllm[1, :11], byt5[1, :4] = 1, 1, 1  # per-sample valid lengths differ
    kwargs = dict(
        hidden_states=torch.randn(2, 9, *LATENT, generator=g, dtype=torch.float64),
        timestep=torch.tensor([700.0, 700.0], dtype=torch.float64),
        encoder_hidden_states=torch.randn(2, 32, 16, generator=g, dtype=torch.float64),
        encoder_attention_mask=mllm.double(),
        encoder_hidden_states_2=torch.randn(2, 16, 16, generator=g, dtype=torch.float64),
        encoder_attention_mask_2=byt5.double(),
        image_embeds=torch.zeros(2, 8, 16, dtype=torch.float64),
    )
    context = FAMILY.pass_context(transformer, (), kwargs)
    assert context.grid == LATENT and context.batch == 2
    with AttentionCapture(transformer, [LAYER], FAMILY.attention, FAMILY.projections) as capture, torch.no_grad():
        capture.begin(context.grid, context=context)
        transformer(**kwargs)
        layers = capture.finish().layers
    handle.remove()
    cross, self_rows = FAMILY.layer_attention(FAMILY.layer_pairs(transformer)[0], layers, context)

    q, k = hunyuan_video15_qk(
        attn, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["image_rotary_emb"]
    )
    text_valid = inputs["attention_mask"]  # [B, T]: valid tokens first, per sample
    assert text_valid.sum(1).tolist() == [5, 15]
    keys_valid = torch.cat([torch.ones(2, Q, dtype=torch.bool), text_valid], dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~keys_valid[:, None, None, :], -torch.inf).softmax(-1).mean(1)
    text, image = probs[..., Q:], probs[..., :Q]
    # each block renormalised, its sum clamped at 1e-12 as `AttentionRows` does (a row whose block holds less than
    # that, as sharp random attention can give, keeps its tiny values instead of being blown up)
    text, image = (p / p.sum(-1, keepdim=True).clamp_min(1e-12) for p in (text, image))
    # float64 on both sides over the same q and k (the spy test pins them to the processor's own): the softmaxes differ
    # by reordered sums over 128 keys and a 2-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, text, **tol)
    torch.testing.assert_close(self_rows.dense(), image, **tol)
    assert cross.shape == (2, Q, 56) and self_rows.shape == (2, Q, Q)
    assert (cross[~text_valid[:, None, :].expand_as(cross)] == 0).all()  # masked padding: exactly zero
    reference, valid = FAMILY.token_roles(cross)
    assert torch.equal(valid, text_valid) and reference.tolist() == [4, 14]  # the last valid position


def test_hunyuan_qk_is_what_the_attention_receives(tiny_hv15_path, monkeypatch):
    """Spy on `dispatch_attention_fn` while the layer runs: the mirror's image queries and joint keys are the very
    numbers the processor passes (float32, the same ops in the same order: bit-identical), with or without the
    recorded projections, and the mask of the image rows is the processor's."""
    pipe = load(tiny_hv15_path)
    attn = pipe.transformer.get_submodule(LAYER)
    seen, inputs, projections = [], {}, {}
    dispatch = transformer_hunyuan_video15.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((query, key, attn_mask))
        return dispatch(query, key, value, attn_mask=attn_mask, **kwargs)

    def start(module, args, kwargs):
        inputs.update(kwargs)
        monkeypatch.setattr(transformer_hunyuan_video15, "dispatch_attention_fn", spy)

    def stop(module, args, output):
        monkeypatch.setattr(transformer_hunyuan_video15, "dispatch_attention_fn", dispatch)

    def keep(name):
        def store(module, args, output):
            projections[name] = output

        return store

    handles = [attn.register_forward_pre_hook(start, with_kwargs=True), attn.register_forward_hook(stop)]
    handles += [getattr(attn, n).register_forward_hook(keep(n)) for n in FAMILY.projections]
    try:
        run(pipe, ["a red cat", 'a sign "ok" on a blue sofa'], "blurry", num_inference_steps=1)
    finally:
        for handle in handles:
            handle.remove()
    query, key, mask = seen[-1]  # the uncond pass, [B, N, heads, d] as the processor lays them out
    args = (attn, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["image_rotary_emb"])
    for recorded in (None, projections):
        q, k = hunyuan_video15_qk(*args, projections=recorded)
        assert torch.equal(q, query[:, :Q].transpose(1, 2)) and torch.equal(k, key.transpose(1, 2))
    bias = hunyuan_video15_bias(inputs["attention_mask"], key.shape[1])
    assert torch.equal(mask[:, :, :Q], (bias == 0).expand(-1, -1, Q, -1))


def test_hunyuan_per_sample_masks_and_padding_never_owns_regions(tiny_hv15_path):
    pipe = load(tiny_hv15_path)
    # 2 prompts x 2 videos, written out: the stock pipeline fails with `num_videos_per_prompt > 1` (its zero image
    # embeddings keep the prompt batch, and the transformer's per-sample zip then drops samples)
    prompts = ["a red cat"] * 2 + ['a green dog on the sofa with a sign "ok"'] * 2  # the second has byT5 tokens
    negatives = ["blurry"] * 2 + ["a low quality video of the left square"] * 2  # other lengths than the prompts
    recorder = scfg.Recorder()
    masks, handle = record_text_masks(pipe)
    with scfg.enable(pipe, on_step=recorder):
        ours = run(pipe, prompts, negatives)
    handle.remove()
    plain = run(pipe, prompts, negatives)
    assert [r.step for r in recorder.steps] == [0, 1, 2]
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 56, *MASKS) and report.rate_map.shape == (4, 1, *LATENT)
    assert report.foreground_mask.shape == (4, 1, *MASKS) and report.guidance_scale == 6.0
    cond, uncond = masks[0], masks[1]  # the guider runs the prompt's pass first
    assert not torch.equal(cond.sum(1), uncond.sum(1))
    assert report.token_masks.any(dim=1).all()  # every cell of every frame belongs to some region
    for step in recorder.steps:  # masked padding never owns a region
        assert not step.token_masks[~cond].any()
    assert len({m.numpy().tobytes() for m in report.token_masks}) == 4  # per-sample masks (each its own noise)
    assert torch.isfinite(ours).all() and not torch.allclose(ours, plain)


def test_hunyuan_prompt_embeds_are_guided_without_tokens(tiny_hv15_path):
    pipe = load(tiny_hv15_path)
    embeds = pipe.encode_prompt(["a red cat", "two blue dogs on the grass"], device="cpu", batch_size=2)
    names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    recorder = scfg.Recorder()
    masks, handle = record_text_masks(pipe)
    with scfg.enable(pipe, on_step=recorder):
        ours = run(pipe, None, **dict(zip(names, embeds, strict=True)))
    handle.remove()
    assert ours.shape == (2, 4, *LATENT) and [r.step for r in recorder.steps] == [0, 1, 2]
    report = recorder.steps[0]
    assert report.token_masks.shape == (2, 56, *MASKS) and report.tokens is None
    assert not report.token_masks[~masks[0]].any()


def test_hunyuan_unit_rate_equals_the_guiders_cfg(tiny_hv15_path):
    pipe = load(tiny_hv15_path, torch.float64)
    plain = run(pipe, "a red cat on a mat", "blurry")
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        ours = run(pipe, "a red cat on a mat", "blurry")
    # Rate exactly 1, smoothed by weights summing to 1 within 2 ulps: the rewritten uncond c + (t - c) / (1 - 6)
    # reproduces the model's own up to a few float64 roundings, which the guider's line multiplies by 6, over 3 steps.
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_hunyuan_cfg_off_is_left_alone_and_after_the_block_is_stock(tiny_hv15_path):
    pipe = load(tiny_hv15_path)
    stock = run(pipe, "a red cat", "blurry")
    guider = pipe.guider
    pipe.guider = guider.new(guidance_scale=1.0)  # the guider runs no uncond pass: nothing to guide
    stock_off = run(pipe, "a red cat", "blurry")
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        off = run(pipe, "a red cat", "blurry")
        assert recorder.steps == []
        pipe.guider = guider.new(start=0.5)  # CFG from step int(0.5 * 3) = 1 on: only those steps are guided
        run(pipe, "a red cat", "blurry")
        assert [r.step for r in recorder.steps] == [1, 2]
        pipe.guider = guider
        run(pipe, "a red cat", "blurry")
    assert torch.equal(off, stock_off)
    assert torch.equal(run(pipe, "a red cat", "blurry"), stock)  # after the block: the stock pipeline, bit for bit


def test_hunyuan_restored_after_an_exception(tiny_hv15_path, monkeypatch):
    # HunyuanVideo15Pipeline has no `callback_on_step_end`: the exception comes from the scheduler's second step
    pipe = load(tiny_hv15_path)
    cls, step, calls = type(pipe), pipe.scheduler.step, []

    def explode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", explode)
    guard = scfg.enable(pipe)
    with pytest.raises(RuntimeError, match="boom"), guard:
        run(pipe, "a red cat", "blurry")
    assert type(pipe) is cls and not guard.recording
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())


@pytest.mark.parametrize("kind", ["original_formulation", "other_guider", "semantic_guider"])
def test_hunyuan_refuses_guiders_whose_line_it_cannot_rewrite(tiny_hv15_path, kind):
    from diffusers import AdaptiveProjectedGuidance

    from scfg.integration.guider import SemanticGuider

    pipe = load(tiny_hv15_path)
    guider, message = {
        "original_formulation": (pipe.guider.new(use_original_formulation=True), "use_original_formulation=False"),
        "other_guider": (AdaptiveProjectedGuidance(guidance_scale=6.0), "got AdaptiveProjectedGuidance"),
        # refused by its own engine before the family sees it: two S-CFG contexts on one transformer
        "semantic_guider": (SemanticGuider(guidance_scale=6.0), "another `scfg.enable` context"),
    }[kind]
    pipe.guider = guider
    with pytest.raises(SCFGError, match=re.escape(message)), scfg.enable(pipe):
        run(pipe, "a red cat", "blurry", num_inference_steps=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())


def test_hunyuan_word_regions_and_token_scales_follow_the_prompt_tokens(tiny_hv15_path):
    pipe = load(tiny_hv15_path)
    prompts = ["a red cat", 'a sign "hi" on a blue sofa']
    recorder = scfg.Recorder()
    with scfg.enable(pipe, SCFGConfig(region_tokens="words"), on_step=recorder):
        plain_words = run(pipe, prompts, "blurry")
    with scfg.enable(pipe, SCFGConfig(region_tokens="words"), token_scales={"cat": 2.0}):
        scaled = run(pipe, prompts, "blurry")
    report = recorder.steps[0]
    pad = pipe.tokenizer.pad_token
    for row, prompt in enumerate(prompts):
        words = [i for i, t in enumerate(report.tokens[row]) if t != pad]
        assert [report.tokens[row][i] for i in words] == pipe.tokenizer.tokenize(prompt)
        owners = report.token_masks[row].flatten(1).any(1).nonzero().flatten().tolist()
        assert owners and set(owners) <= set(words)  # only the prompt's own tokens own regions
    # byT5 glyph tokens come first in the second sample: its prompt tokens start after them (12 for 'Text "hi". ')
    assert min(i for i, t in enumerate(report.tokens[1]) if t != pad) == 12
    assert not torch.equal(scaled, plain_words)


def test_hunyuan_routing_and_guidance_arguments():
    transformer = type("HunyuanVideo15Transformer3DModel", (), {})()  # the family matches by class name
    assert FAMILY.matches(SimpleNamespace(transformer=transformer))  # a bare holder (benchmarks, the guider)
    image_to_video = type("HunyuanVideo15ImageToVideoPipeline", (), {})()
    image_to_video.transformer = transformer
    with pytest.raises(SCFGError, match="Expected a pipeline of a supported model family"):
        family_for(image_to_video)
    with pytest.raises(SCFGError, match=r"pipe\.guider = pipe\.guider\.new\(guidance_scale=4\)"):
        FAMILY.guidance_arguments(4.0, "blurry")
    # image-to-video through a bare holder (a guider on a modular pipeline): refused at its first pass
    call = dict(hidden_states=torch.zeros(1, 9, *LATENT), timestep=torch.tensor([500.0]))
    assert FAMILY.pass_context(transformer, (), {**call, "image_embeds": torch.zeros(1, 8, 16)}).grid == LATENT
    with pytest.raises(SCFGError, match="image-to-video"):
        FAMILY.pass_context(transformer, (), {**call, "image_embeds": torch.ones(1, 8, 16)})


def test_semantic_guider_on_the_stock_pipeline_reaches_this_family(tiny_hv15_path):
    """`SemanticGuider` as the pipeline's guider (no `scfg.enable`) goes through this family's hooks too; with the
    rate forced to 1 it is the pipeline's CFG."""
    from scfg.integration.guider import SemanticGuider

    pipe = load(tiny_hv15_path, torch.float64)
    plain = run(pipe, "a red cat on a mat", "blurry")
    config = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None).to_dict()
    pipe.guider = SemanticGuider(guidance_scale=6.0, scfg_config=config)
    pipe.guider.on_step = recorder = scfg.Recorder()
    ours = run(pipe, "a red cat on a mat", "blurry")
    assert [r.step for r in recorder.steps] == [0, 1, 2] and recorder.steps[0].token_masks.shape[1:] == (56, *MASKS)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())  # as the unit-rate test


def test_guidance_sets_the_guiders_scale_for_the_block_only(tiny_hv15_path):
    """`scfg.guidance`: the scale is the guider's, so the block runs with a copy at that scale and the pipeline's
    own guider is back afterwards, also after an exception; a call inside equals the stock pipeline given that
    guider by hand."""
    pipe = load(tiny_hv15_path, torch.float64)
    original = pipe.guider
    with scfg.guidance(pipe, 3.0, "blurry") as arguments:
        assert arguments == {"negative_prompt": "blurry"}
        assert pipe.guider is not original and pipe.guider.guidance_scale == 3.0
        ours = run(pipe, "a red cat on a mat", arguments["negative_prompt"])
    assert pipe.guider is original and original.guidance_scale != 3.0
    with pytest.raises(RuntimeError, match="boom"), scfg.guidance(pipe, 3.0):
        raise RuntimeError("boom")
    assert pipe.guider is original
    pipe.guider = ClassifierFreeGuidance(guidance_scale=3.0)
    assert torch.equal(ours, run(pipe, "a red cat on a mat", "blurry"))


def test_cli_generate_takes_the_scale_for_hunyuan(tiny_hv15_path, tmp_path, monkeypatch):
    """`scfg generate --frames --scale 3` on a HunyuanVideo 1.5 folder: every step's guider combines at scale 3
    (a spy on the guider class's `forward`), and the video is written."""
    pytest.importorskip("av")
    from scfg.cli import main

    seen = []
    forward = ClassifierFreeGuidance.forward

    def spy(self, *args, **kwargs):
        seen.append(self.guidance_scale)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ClassifierFreeGuidance, "forward", spy)
    clip = tmp_path / "clip.mp4"
    argv = ["generate", "a red cat", "--model", str(tiny_hv15_path), "--steps", "2", "--frames", str(FRAMES)]
    argv += ["--height", str(HEIGHT), "--width", str(WIDTH), "--scale", "3", "--out", str(clip)]
    assert main(argv) == 0
    assert clip.stat().st_size > 0 and seen == [3.0, 3.0]
