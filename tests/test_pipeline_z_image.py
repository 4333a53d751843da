"""S-CFG on a stock ZImagePipeline: ONE transformer call per step on list inputs `[cond..., uncond...]` (latents,
timesteps, captions of their own lengths), combined as `pos + g (pos - neg)`; a single-stream DiT over `[image;
text]` with complex RoPE and per-sample padding. The tiny pipeline is built offline (tests/tiny_z_image.py), saved
with `save_pretrained` and reloaded with `from_pretrained`."""

from __future__ import annotations

import pytest
import torch
from conftest import transformers_major

z_image = pytest.importorskip("diffusers.pipelines.z_image", reason="diffusers without Z-Image pipelines")
if transformers_major() < 5:
    pytest.skip("the offline Qwen tokenizer is built with transformers 5's Qwen2Tokenizer", allow_module_level=True)
ZImagePipeline = z_image.ZImagePipeline

from checks import assert_restored_after_exception  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig  # noqa: E402
from scfg.capture import AttentionCapture  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.z_image import FAMILY, z_image_qk  # noqa: E402

H, W = 32, 40  # a 16x20 latent, an 8x10 patch grid: non-square (a swap fails), 80 tokens padded to 96
KW = dict(height=H, width=W, num_inference_steps=3, output_type="latent")
PROMPTS = ["a red cat", "two blue dogs on the grass"]
NEGATIVES = ["blurry", "low quality watermark"]  # other lengths than the prompts


@pytest.fixture(scope="session")
def tiny_z_image_path(tmp_path_factory):
    from tiny_z_image import build_tiny_z_image

    folder = tmp_path_factory.mktemp("tiny-z-image")
    build_tiny_z_image(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = ZImagePipeline.from_pretrained(str(path))
    pipe = pipe if dtype == torch.float32 else pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_z_image(tiny_z_image_path):
    return load(tiny_z_image_path)


def run(pipe, prompt=PROMPTS, negative=NEGATIVES, seed=0, **kwargs):
    # the pipeline writes the chat template into a prompt list it is given: pass fresh lists
    prompt = list(prompt) if isinstance(prompt, list) else prompt
    negative = list(negative) if isinstance(negative, list) else negative
    return pipe(
        prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(seed), **{**KW, **kwargs}
    ).images


def caption_lengths(pipe, prompts):
    """Tokens of each chat-templated prompt, as the pipeline passes them (its captions carry no padding)."""
    return [len(c) for c in pipe._encode_prompt(list(prompts), device="cpu")]


def test_tiny_z_image_loads_offline_and_routes(tiny_z_image):
    assert family_for(tiny_z_image) is FAMILY
    pairs = FAMILY.layer_pairs(tiny_z_image.transformer)
    # the middle half of the 4 main blocks; the refiners attend within the image or the caption only
    assert [p.cross for p in pairs] == ["layers.1.attention", "layers.2.attention"]
    assert {p.level for p in pairs} == {2}
    assert scfg.guidance_arguments(tiny_z_image, 7.5) == {"guidance_scale": 6.5, "negative_prompt": None}


def test_z_image_batch_gets_per_sample_masks_and_padding_owns_none(tiny_z_image):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_z_image, on_step=recorder):
        ours = run(tiny_z_image, num_images_per_prompt=2)
    plain = run(tiny_z_image, num_images_per_prompt=2)
    assert [r.step for r in recorder.steps] == [0, 1, 2]  # (1000 - t) / 1000 matched back to the schedule
    lengths = caption_lengths(tiny_z_image, PROMPTS + NEGATIVES)
    text = max(lengths)  # the longest caption of the call, cond or uncond
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, text, 4, 5)  # the 8x10 patch grid pooled 2x2 (`mask_pool=2`)
    assert report.guidance_scale == 6.0  # the pipeline's g = 5 on c + g (c - u) is u + 6 (c - u)
    assert report.token_masks.any(dim=1).all()  # every cell belongs to a region
    for sample, length in enumerate([lengths[0], lengths[0], lengths[1], lengths[1]]):
        # positions past the caption (the transformer's pad tokens, the batch padding) never own a region
        assert not report.token_masks[sample, length:].any()
        assert report.tokens[sample][length - 1] == "Ċ" and report.tokens[sample][0] == "<|im_start|>"
    assert not torch.equal(report.token_masks[0], report.token_masks[2])
    assert torch.isfinite(ours).all() and not torch.allclose(ours, plain)


@pytest.mark.parametrize("options", [{}, {"cfg_normalization": 1.05}], ids=["plain", "cfg_normalization"])
def test_z_image_unit_rate_equals_stock_cfg(tiny_z_image_path, options):
    pipe = load(tiny_z_image_path, torch.float64)
    plain = run(pipe, **options)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        ours = run(pipe, **options)
    # rate exactly 1, smoothed by weights summing to 1 within 2 ulps: the rewritten uncond reproduces the model's own
    # up to a few float64 roundings, which the line multiplies by g = 5, over 3 steps; `cfg_normalization` reads
    # the model's own cond, so it caps the same norm
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_z_image_cfg_truncation_steps_are_left_alone(tiny_z_image_path):
    """With `cfg_truncation=0.3` the last of the 3 steps (normalised time 0.4) is a cond-only call. With prompt
    embeddings and 2 samples that call has an even batch and no prompts to count against: only the family's reading
    of the schedule tells it from a CFG call."""
    pipe = load(tiny_z_image_path, torch.float64)
    cond = pipe._encode_prompt(list(PROMPTS), device="cpu")
    uncond = pipe._encode_prompt(list(NEGATIVES), device="cpu")
    embeds = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, cfg_truncation=0.3)
    plain = pipe(generator=torch.Generator().manual_seed(0), **embeds, **KW).images
    recorder = scfg.Recorder()
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None), on_step=recorder):
        ours = pipe(generator=torch.Generator().manual_seed(0), **embeds, **KW).images
    assert [r.step for r in recorder.steps] == [0, 1]
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):  # and with text prompts
        run(pipe, cfg_truncation=0.3)
    assert [r.step for r in recorder.steps] == [0, 1]


def test_z_image_without_cfg_is_left_alone_and_disabled_is_stock(tiny_z_image):
    stock_no_cfg = run(tiny_z_image, guidance_scale=0.0)
    stock_cfg = run(tiny_z_image)
    recorder = scfg.Recorder()
    with scfg.enable(tiny_z_image, on_step=recorder):
        no_cfg = run(tiny_z_image, guidance_scale=0.0)  # CFG off: one cond-only call per step
        assert recorder.steps == []
        run(tiny_z_image)
    assert torch.equal(no_cfg, stock_no_cfg)
    assert torch.equal(run(tiny_z_image), stock_cfg)  # after the block: the stock pipeline, bit for bit


def test_z_image_restored_after_exception(tiny_z_image):
    assert_restored_after_exception(tiny_z_image, lambda callback: run(tiny_z_image, callback_on_step_end=callback))


def transformer_inputs(dtype=torch.float64, lengths=(11, 40)):
    """One CFG call as ZImagePipeline makes it: lists of latents [C, 1, H, W] (the same latent twice), timesteps
    and captions of different lengths (padded by the transformer to 32 and 64 tokens: pad tokens and a masked
    batch tail)."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(4, 1, H // 2, W // 2, generator=g, dtype=dtype)
    captions = [torch.randn(n, 16, generator=g, dtype=dtype) for n in lengths]
    return [latent, latent.clone()], torch.tensor([0.3, 0.3], dtype=dtype), captions


def record_inputs(module):
    inputs = {}

    def hook(module, args, kwargs):
        inputs.update(hidden_states=args[0], **kwargs)

    return inputs, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_z_image_maps_equal_a_float64_reference(tiny_z_image_path):
    """The family's cross/self maps of one main block against softmax(q kᵀ + mask) of the image queries over each
    sample's `[image; image padding; caption; caption padding; batch padding]`, split and renormalised by hand over
    the real caption tokens and the real image tokens, all in float64."""
    transformer = load(tiny_z_image_path, torch.float64).transformer
    name = "layers.1.attention"
    attn = transformer.get_submodule(name)
    x, t, captions = transformer_inputs()
    context = FAMILY.pass_context(transformer, (x, t, captions), {})
    assert context.grid == (16, 20) and context.batch == 2
    assert context.extra == {"image_tokens": 80, "image_len": 96, "text_lens": [11, 40]}
    inputs, handle = record_inputs(attn)
    with AttentionCapture(transformer, [name], FAMILY.attention, FAMILY.projections) as capture, torch.no_grad():
        capture.begin(context.grid, context=context)
        transformer(x, t, captions)
        layers = capture.finish().layers
    handle.remove()
    pair = FAMILY.layer_pairs(transformer)[0]
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)

    q, k = z_image_qk(attn, inputs["hidden_states"], inputs["freqs_cis"])
    mask = inputs["attention_mask"]  # [2, 96 + 64], the first sample's caption tail masked
    assert mask is not None and not mask[0].all() and mask[1].all()
    scores = q[:, :, :80] @ k.transpose(-1, -2) / 16**0.5 + torch.where(mask, 0.0, -torch.inf)[:, None, None, :]
    probs = scores.softmax(-1).mean(1)
    expected_cross = torch.zeros(2, 80, 40, dtype=torch.float64)
    for i, length in enumerate([11, 40]):
        block = probs[i, :, 96 : 96 + length]
        expected_cross[i, :, :length] = block / block.sum(-1, keepdim=True)
    image = probs[..., :80]
    # float64 on both sides over the same q and k (the drift test pins them to the processor's own): the two softmaxes
    # differ by reordered sums over 160 keys and a 2-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=1e-300)
    torch.testing.assert_close(cross, expected_cross, **tol)
    torch.testing.assert_close(self_rows.dense(), image / image.sum(-1, keepdim=True), **tol)
    assert cross.shape == (2, 80, 40) and self_rows.shape == (2, 80, 80)
    reference, valid = FAMILY.token_roles(cross)
    assert reference is None  # token 0, `<|im_start|>`
    assert valid.sum(1).tolist() == [11, 40]


def test_z_image_qk_is_what_the_attention_receives(tiny_z_image_path, monkeypatch):
    """Spy on the processor's `dispatch_attention_fn` while a main block runs: the mirror's query and key (from the
    recorded projections, as the capture uses them, and recomputed) are the very same numbers, and its mask bias
    is -inf exactly where the processor's mask is False."""
    import diffusers.models.transformers.transformer_z_image as module

    transformer = load(tiny_z_image_path).transformer
    name = "layers.2.attention"
    attn = transformer.get_submodule(name)
    seen = []
    dispatch = module.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        seen.append((query, key, kwargs.get("attn_mask")))
        return dispatch(query, key, value, **kwargs)

    def start_spying(module_, args):
        monkeypatch.setattr(module, "dispatch_attention_fn", spy)

    def stop_spying(module_, args, output):
        monkeypatch.setattr(module, "dispatch_attention_fn", dispatch)

    handles = [attn.register_forward_pre_hook(start_spying), attn.register_forward_hook(stop_spying)]
    x, t, captions = transformer_inputs(torch.float32)
    context = FAMILY.pass_context(transformer, (x, t, captions), {})
    inputs, handle = record_inputs(attn)
    handles.append(handle)
    try:
        with AttentionCapture(transformer, [name], FAMILY.attention, FAMILY.projections) as capture, torch.no_grad():
            capture.begin(context.grid, context=context)
            transformer(x, t, captions)
            rows = capture.finish().layers[name]
    finally:
        for h in handles:
            h.remove()
    ((query, key, processor_mask),) = seen
    assert torch.equal(rows.query, query.transpose(1, 2)[:, :, :80]) and torch.equal(rows.key, key.transpose(1, 2))
    q, k = z_image_qk(attn, inputs["hidden_states"], inputs["freqs_cis"])  # recomputed from the layer's inputs
    assert torch.equal(q, query.transpose(1, 2)) and torch.equal(k, key.transpose(1, 2))
    assert torch.equal(rows.bias == 0, processor_mask.expand_as(rows.bias))
    assert rows.scale == pytest.approx(attn.scale)


def test_z_image_token_ids_are_the_captions(tiny_z_image):
    """`tokenize` gives the templated prompt's ids from position 0, padded to the call's text length: what the
    text encoder saw, without the padding the pipeline drops."""
    [(tokenizer, ids)] = FAMILY.tokenize(tiny_z_image, PROMPTS, 20)
    lengths = caption_lengths(tiny_z_image, PROMPTS)
    assert ids.shape == (2, 20)
    for row, length in enumerate(lengths):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[row]}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        assert ids[row, :length].tolist() == tokenizer(text).input_ids
        assert (ids[row, length:] == tokenizer.pad_token_id).all()


def test_z_image_region_words_and_per_word_scales(tiny_z_image):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_z_image, SCFGConfig(region_tokens="words"), token_scales={"cat": 2.0}, on_step=recorder):
        run(tiny_z_image)
    report = recorder.steps[0]
    special = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    owners = {report.tokens[0][i] for i in range(report.token_masks.shape[1]) if report.token_masks[0, i].any()}
    assert owners and not owners & special


def test_cli_compare_runs_z_image(tiny_z_image_path, tmp_path):
    """`--scale 4` reaches Z-Image as `guidance_scale=3` (its line is c + g (c - u)); both panels decode."""
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "cmp.png"
    argv = ["compare", "a red cat", "--model", str(tiny_z_image_path), "--steps", "2", "--height", "32"]
    assert main([*argv, "--width", "40", "--scale", "4", "--out", str(out), "--show-regions"]) == 0
    panel = Image.open(out)
    assert json.loads(panel.text["scfg"])["guidance"] == "compare"


def test_z_image_words_are_the_user_messages_own(tiny_z_image):
    """`region_tokens="words"`: the chat template's role name, newlines and assistant turn are not the prompt's
    words; nor is the padding after a shorter caption."""
    segments = FAMILY.tokenize(tiny_z_image, ["a red cat", "two blue dogs on the grass"], 24)
    words = FAMILY.word_mask(segments)
    expected = [["a", "Ġred", "Ġcat"], ["two", "Ġblue", "Ġdogs", "Ġon", "Ġthe", "Ġgrass"]]
    for row, own in enumerate(expected):
        tokens = tiny_z_image.tokenizer.convert_ids_to_tokens(segments[0][1][row].tolist())
        assert tokens[:3] == ["<|im_start|>", "user", "Ċ"]
        assert [t for t, w in zip(tokens, words[row].tolist(), strict=True) if w] == own
