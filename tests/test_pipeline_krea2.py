"""S-CFG on a stock Krea2Pipeline: two transformer passes per step (cond, then uncond) combined as
`cond + g (cond - uncond)`; a single-stream MMDiT over `[text; image]` with grouped-query attention, RoPE, a text
mask in the middle of the template and the assistant suffix at fixed tail positions. The tiny pipeline is built
offline (tests/tiny_krea2.py), saved with `save_pretrained` and reloaded with `from_pretrained`."""

from __future__ import annotations

import pytest
import torch
from conftest import transformers_major

krea2 = pytest.importorskip("diffusers.pipelines.krea2", reason="diffusers without the Krea 2 pipeline")
if transformers_major() < 5:
    pytest.skip("the offline Qwen tokenizer is built with transformers 5's Qwen2Tokenizer", allow_module_level=True)
Krea2Pipeline = krea2.Krea2Pipeline

from checks import assert_restored_after_exception  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig  # noqa: E402
from scfg.capture import AttentionCapture  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.krea2 import FAMILY, krea2_qk  # noqa: E402

H, W = 32, 40  # a 16x20 latent packed 2x2: an 8x10 token grid, non-square (a swap fails)
TEXT = 16  # max_sequence_length: 11 prompt positions, then the 5 suffix tokens
KW = dict(height=H, width=W, num_inference_steps=3, output_type="latent", max_sequence_length=TEXT)
PROMPTS = ["a red cat", "two blue dogs on the grass"]
NEGATIVES = ["blurry", "low quality watermark"]  # other lengths than the prompts


@pytest.fixture(scope="session")
def tiny_krea2_path(tmp_path_factory):
    from tiny_krea2 import build_tiny_krea2

    folder = tmp_path_factory.mktemp("tiny-krea2")
    build_tiny_krea2(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = Krea2Pipeline.from_pretrained(str(path))
    pipe = pipe if dtype == torch.float32 else pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_krea2(tiny_krea2_path):
    return load(tiny_krea2_path)


def run(pipe, prompt=PROMPTS, negative=NEGATIVES, seed=0, **kwargs):
    return pipe(
        prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(seed), **{**KW, **kwargs}
    ).images


def test_tiny_krea2_loads_offline_and_routes(tiny_krea2):
    assert family_for(tiny_krea2) is FAMILY
    pairs = FAMILY.layer_pairs(tiny_krea2.transformer)
    assert [p.cross for p in pairs] == ["transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    attn = tiny_krea2.transformer.get_submodule(pairs[0].cross)
    assert (attn.num_heads, attn.num_kv_heads) == (4, 2)  # grouped-query attention: 2 query heads per key head
    assert scfg.guidance_arguments(tiny_krea2, 7.5) == {"guidance_scale": 6.5, "negative_prompt": None}


def test_krea2_batch_gets_per_sample_masks_and_padding_owns_none(tiny_krea2):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_krea2, on_step=recorder):
        ours = run(tiny_krea2, num_images_per_prompt=2)
    plain = run(tiny_krea2, num_images_per_prompt=2)
    assert [r.step for r in recorder.steps] == [0, 1, 2]  # t / 1000 matched back to the schedule
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, TEXT, 4, 5) and report.rate_map.shape == (4, 1, 8, 10)  # masks pooled 2x2
    assert report.guidance_scale == 5.5  # the pipeline's g = 4.5 on c + g (c - u) is u + 5.5 (c - u)
    assert report.token_masks.any(dim=1).all()
    _, mask = tiny_krea2.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2, max_sequence_length=TEXT)
    for sample in range(4):
        # the masked padding between the prompt and the suffix never owns a region
        assert not report.token_masks[sample, ~mask[sample]].any()
        assert report.tokens[sample][-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert not torch.equal(report.token_masks[0], report.token_masks[2])
    assert torch.isfinite(ours).all() and not torch.allclose(ours, plain)


def test_krea2_unit_rate_equals_stock_cfg(tiny_krea2_path):
    pipe = load(tiny_krea2_path, torch.float64)
    plain = run(pipe)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        ours = run(pipe)
    # rate exactly 1, smoothed by weights summing to 1 within 2 ulps: the rewritten uncond reproduces the model's own
    # up to a few float64 roundings, which the line multiplies by g = 4.5, over 3 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_krea2_without_cfg_is_left_alone_and_disabled_is_stock(tiny_krea2):
    stock_no_cfg = run(tiny_krea2, guidance_scale=0.0)
    stock_cfg = run(tiny_krea2)
    recorder = scfg.Recorder()
    with scfg.enable(tiny_krea2, on_step=recorder):
        no_cfg = run(tiny_krea2, guidance_scale=0.0)  # one cond pass per step
        assert recorder.steps == []
        run(tiny_krea2)
    assert torch.equal(no_cfg, stock_no_cfg)
    assert torch.equal(run(tiny_krea2), stock_cfg)  # after the block: the stock pipeline, bit for bit


def test_krea2_restored_after_exception(tiny_krea2):
    assert_restored_after_exception(tiny_krea2, lambda callback: run(tiny_krea2, callback_on_step_end=callback))


def transformer_inputs(pipe, dtype=torch.float64):
    """One cond pass as Krea2Pipeline makes it, for two prompts of different lengths (so the text masks differ)."""
    text, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=TEXT)
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 80, 16, generator=g, dtype=dtype),
        encoder_hidden_states=text.to(dtype),
        timestep=torch.tensor([0.7, 0.7], dtype=dtype),
        position_ids=pipe.prepare_position_ids(TEXT, 8, 10, "cpu"),
        encoder_attention_mask=mask,
    )


def record_inputs(module):
    inputs = {}

    def hook(module, args, kwargs):
        inputs.update(hidden_states=args[0], **kwargs)

    return inputs, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_krea2_maps_equal_a_float64_reference(tiny_krea2_path):
    """The family's cross/self maps of one block against softmax(q kᵀ + mask) of the image queries over `[text;
    image]`, each query head h scored against key head h // 2 (picked by index, not repeated), averaged over the 4
    query heads, split and renormalised by hand, all in float64."""
    from diffusers.models.embeddings import apply_rotary_emb

    pipe = load(tiny_krea2_path, torch.float64)
    transformer = pipe.transformer
    name = "transformer_blocks.1.attn"
    attn = transformer.get_submodule(name)
    kwargs = transformer_inputs(pipe)
    context = FAMILY.pass_context(transformer, (), kwargs)
    assert context.grid == (8, 10) and context.extra["text_len"] == TEXT
    inputs, handle = record_inputs(attn)
    with AttentionCapture(transformer, [name], FAMILY.attention, FAMILY.projections) as capture, torch.no_grad():
        capture.begin(context.grid, context=context)
        transformer(**kwargs)
        layers = capture.finish().layers
    handle.remove()
    pair = FAMILY.layer_pairs(transformer)[0]
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)

    with torch.no_grad():
        hidden, rotary = inputs["hidden_states"], inputs["image_rotary_emb"]
        q, _ = krea2_qk(attn, hidden, rotary)
        key = attn.norm_k(attn.to_k(hidden).unflatten(-1, (2, 16)))
        key = apply_rotary_emb(key, rotary, sequence_dim=1).transpose(1, 2)[:, torch.arange(4) // 2]
        mask = kwargs["encoder_attention_mask"]
        bias = torch.where(torch.cat([mask, torch.ones(2, 80, dtype=torch.bool)], 1), 0.0, -torch.inf)
        probs = (q[:, :, TEXT:] @ key.transpose(-1, -2) / 16**0.5 + bias[:, None, None, :]).softmax(-1).mean(1)
    text, image = probs[..., :TEXT], probs[..., TEXT:]
    # float64 on both sides over the same q and k (the drift test pins them to the processor's own): the two softmaxes
    # differ by reordered sums over 96 keys and a 4-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(self_rows.dense(), image / image.sum(-1, keepdim=True), **tol)
    assert cross.shape == (2, 80, TEXT) and self_rows.shape == (2, 80, 80)
    reference, valid = FAMILY.token_roles(cross)
    assert torch.equal(valid, mask) and reference.tolist() == [TEXT - 1, TEXT - 1]  # the suffix's final token


def test_krea2_qk_are_what_the_attention_receives(tiny_krea2_path, monkeypatch):
    """Spy on the processor's `dispatch_attention_fn` while a block runs: the mirror's query and key (key heads
    repeated per group, from the recorded projections as the capture uses them, and recomputed) are the very same
    numbers, and its mask bias is -inf exactly where the processor's mask is False."""
    import diffusers.models.transformers.transformer_krea2 as module

    pipe = load(tiny_krea2_path)
    transformer = pipe.transformer
    name = "transformer_blocks.2.attn"
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

    kwargs = transformer_inputs(pipe, torch.float32)
    context = FAMILY.pass_context(transformer, (), kwargs)
    inputs, handle = record_inputs(attn)
    handles = [handle, attn.register_forward_pre_hook(start_spying), attn.register_forward_hook(stop_spying)]
    try:
        with AttentionCapture(transformer, [name], FAMILY.attention, FAMILY.projections) as capture, torch.no_grad():
            capture.begin(context.grid, context=context)
            transformer(**kwargs)
            rows = capture.finish().layers[name]
    finally:
        for h in handles:
            h.remove()
    ((query, key, processor_mask),) = seen
    assert key.shape[2] == attn.num_heads  # the processor repeats the key heads before its attention
    assert torch.equal(rows.query, query.transpose(1, 2)[:, :, TEXT:]) and torch.equal(rows.key, key.transpose(1, 2))
    with torch.no_grad():
        q, k = krea2_qk(attn, inputs["hidden_states"], inputs["image_rotary_emb"])  # recomputed from the inputs
    assert torch.equal(q, query.transpose(1, 2)) and torch.equal(k, key.transpose(1, 2))
    assert torch.equal(rows.bias == 0, processor_mask.expand_as(rows.bias))


def test_krea2_token_ids_are_the_text_layout(tiny_krea2):
    """`tokenize` gives the ids the text encoder saw after the prefix is dropped: prompt, padding, the suffix."""
    [(tokenizer, ids)] = FAMILY.tokenize(tiny_krea2, PROMPTS, TEXT)
    _, mask = tiny_krea2.encode_prompt(PROMPTS, device="cpu", max_sequence_length=TEXT)
    assert ids.shape == (2, TEXT)
    assert torch.equal(ids != tokenizer.pad_token_id, mask)
    assert tokenizer.convert_ids_to_tokens(ids[0, :3].tolist()) == ["a", "Ġred", "Ġcat"]


def test_krea2_region_words_and_per_word_scales(tiny_krea2):
    recorder = scfg.Recorder()
    with scfg.enable(tiny_krea2, SCFGConfig(region_tokens="words"), token_scales={"cat": 2.0}, on_step=recorder):
        run(tiny_krea2)
    report = recorder.steps[0]
    special = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    owners = {report.tokens[0][i] for i in range(TEXT) if report.token_masks[0, i].any()}
    assert owners and not owners & special


def test_cli_compare_runs_krea2(tiny_krea2_path, tmp_path):
    """`--scale 4` reaches Krea 2 as `guidance_scale=3` (its line is c + g (c - u)); both panels decode."""
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "cmp.png"
    argv = ["compare", "a red cat", "--model", str(tiny_krea2_path), "--steps", "2", "--height", "32"]
    assert main([*argv, "--width", "40", "--scale", "4", "--out", str(out), "--show-regions"]) == 0
    panel = Image.open(out)
    assert json.loads(panel.text["scfg"])["guidance"] == "compare"


def test_krea2_words_are_the_user_messages_own(tiny_krea2):
    """`region_tokens="words"`: after the pipeline drops the template's prefix, the words run from position 0 to
    the first `<|im_end|>`; the padding and the assistant suffix are the template's."""
    from scfg.families.krea2 import FAMILY

    segments = FAMILY.tokenize(tiny_krea2, ["a red cat"], 32)
    assert segments, "the tiny Krea 2 pipeline's text length should be 32 positions"
    words = FAMILY.word_mask(segments)[0]
    tokens = tiny_krea2.tokenizer.convert_ids_to_tokens(segments[0][1][0].tolist())
    assert [t for t, w in zip(tokens, words.tolist(), strict=True) if w] == ["a", "Ġred", "Ġcat"]
    assert "assistant" in tokens  # the suffix is there, and not a word
