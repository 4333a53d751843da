"""S-CFG on a stock QwenImagePipeline run with true CFG: two separate transformer passes per step (cond, then
uncond) combined as `neg + s (cond - neg)` and rescaled to the conditional prediction's norm per token; packed 2x2
latents; joint attention `[text; image]` with per-head RMS norms, complex rotary embeddings and a text padding mask.
Built from configs offline (tests/tiny_qwen_image.py): a Qwen2.5-VL text encoder and a byte-level BPE tokenizer
written here, so the prompts go through the pipeline's own chat template."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
if not hasattr(diffusers, "QwenImagePipeline") or not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("Qwen-Image needs diffusers >= 0.35 and transformers >= 4.49 (Qwen2.5-VL)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from checks import assert_restored_after_exception  # noqa: E402
from diffusers import QwenImagePipeline  # noqa: E402
from diffusers.models.transformers import transformer_qwenimage  # noqa: E402
from tiny_qwen_image import build_tiny_qwen_image  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig, SCFGError  # noqa: E402
from scfg.capture import AttentionCapture, LayerCall  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.qwen_image import FAMILY, SUPPORTED_PROCESSORS, qwen_key_bias, qwen_qkv, qwen_scale  # noqa: E402

H, W = 64, 96  # an 8x12 token grid (VAE /4, 2x2 packing): non-square, so a (h, w) swap fails
GRID = (8, 12)
MASKS = (4, 6)  # GRID pooled 2x2 (`mask_pool=2`, the family default)
KW = dict(height=H, width=W, num_inference_steps=3, output_type="latent")
PROMPTS = ["a red cat", "two blue dogs on the grass"]  # 3 and 6 words: the first is padded (masked) in a batch
NEGATIVE = "blurry, low quality"  # another text length than either prompt
SUFFIX = ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]  # what the template leaves after the prompt
LAYER = "transformer_blocks.1.attn"


@pytest.fixture(scope="session")
def tiny_qwen_image_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen-image")
    build_tiny_qwen_image(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = QwenImagePipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, negative=NEGATIVE, seed=0, **kwargs):
    if isinstance(prompt, list) and isinstance(negative, str):
        # one negative string for several prompts fails inside the stock pipeline (its negative embeddings keep one
        # row per image of one prompt while the latents have one per image of every prompt): give one per prompt
        negative = [negative] * len(prompt)
    return pipe(
        prompt,
        negative_prompt=negative,
        true_cfg_scale=kwargs.pop("true_cfg_scale", 4.0),
        generator=torch.Generator().manual_seed(seed),
        **{**KW, **kwargs},
    ).images


# -- the tiny pipeline --------------------------------------------------------------------------------------------


def test_tiny_qwen_image_pipeline_loads_offline_and_runs(tiny_qwen_image_path):
    """The fixture reloads through `from_pretrained`, the template prefix is dropped exactly, and a decoded image has
    the requested non-square size."""
    pipe = load(tiny_qwen_image_path)
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red cat")).input_ids
    kept = pipe.tokenizer.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx :])
    assert kept == ["a", "Ġred", "Ġcat", *SUFFIX]
    image = run(pipe, "a red cat", num_inference_steps=2, output_type="pil")[0]
    assert image.size == (W, H)  # PIL: (width, height)


def test_qwen_image_tokenize_is_what_the_transformer_sees(tiny_qwen_image_path):
    pipe = load(tiny_qwen_image_path)
    embeds, mask = pipe.encode_prompt(PROMPTS)
    ((tokenizer, ids),) = FAMILY.tokenize(pipe, PROMPTS, embeds.shape[1])
    assert ids.shape == mask.shape == (2, 11)
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    assert tokens[0] == ["a", "Ġred", "Ġcat", *SUFFIX, *["<|endoftext|>"] * 3]  # padded like the embeddings
    assert tokens[1][-5:] == SUFFIX and len(tokens[1]) == 11
    assert torch.equal(ids != tokenizer.pad_token_id, mask.bool())


# -- guidance on the pipeline ----------------------------------------------------------------------------------------


def test_qwen_image_true_cfg_gets_per_sample_masks_on_the_token_grid(tiny_qwen_image_path):
    # Prompts of one token length: with several prompts of different lengths and `num_images_per_prompt > 1` the
    # stock pipeline pairs the embeddings with the wrong padding masks (`encode_prompt` repeats the 2-D mask with
    # `repeat(1, n, 1)`, which orders it [p0, p1, p0, p1] against embeddings [p0, p0, p1, p1]).
    pipe = load(tiny_qwen_image_path)
    prompts = ["a red cat", "a blue dog"]
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder) as guard:
        ours = run(pipe, prompts, num_images_per_prompt=2)
        assert guard.config.foreground_source == "cond"  # the family's preset
        assert [p.cross for p in guard.pairs] == ["transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    plain = run(pipe, prompts, num_images_per_prompt=2)
    assert [r.step for r in recorder.steps] == [0, 1, 2]  # the pipeline passes t / 1000: matched to the schedule
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 8, *MASKS) and report.rate_map.shape == (4, 1, *GRID)
    assert report.guidance_scale == 4.0
    assert report.tokens[1] == ["a", "Ġred", "Ġcat", *SUFFIX] and report.tokens[2][:3] == ["a", "Ġblue", "Ġdog"]
    assert report.token_masks.any(dim=1).all()  # every token cell belongs to some region
    assert not torch.equal(report.token_masks[0], report.token_masks[2])  # per-sample masks
    assert not torch.equal(report.token_masks[0], report.token_masks[1])  # the two images of one prompt differ too
    assert torch.isfinite(ours).all() and not torch.allclose(ours, plain)


def test_qwen_image_masked_padding_never_owns_regions(tiny_qwen_image_path):
    pipe = load(tiny_qwen_image_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        run(pipe, PROMPTS)  # 8 and 11 tokens, the negative prompt 9: three padded, masked positions in sample 0
    for report in recorder.steps:
        assert report.token_masks.shape == (2, 11, *MASKS)
        assert report.token_masks.any(dim=1).all()
        assert not report.token_masks[0, 8:].any()
        assert report.tokens[0][8:] == ["<|endoftext|>"] * 3


def test_qwen_image_unit_rate_equals_true_cfg(tiny_qwen_image_path):
    pipe = load(tiny_qwen_image_path, torch.float64)
    plain = run(pipe, PROMPTS)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        ours = run(pipe, PROMPTS)
    # rate exactly 1, smoothed by weights summing to 1 within 2 ulps: the rewritten uncond reproduces the model's
    # own up to a few float64 roundings, which the line multiplies by the scale (4) and the norm rescale keeps, over
    # 3 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_qwen_image_norm_rescale_acts_on_the_guided_prediction(tiny_qwen_image_path, monkeypatch):
    """The pipeline rescales its combined prediction to the conditional one's norm, token by token. S-CFG keeps the
    conditional prediction, so what reaches the scheduler is `t · ‖c‖ / ‖t‖` with `t = u + s · rate · (c - u)`
    from the model's own predictions: the rescale of CFG, applied to S-CFG's prediction."""
    pipe = load(tiny_qwen_image_path, torch.float64)
    own, stepped = [], []
    # registered before `scfg.enable`'s hook, so it sees the model's own predictions
    handle = pipe.transformer.register_forward_hook(lambda module, args, out: own.append(out[0].clone()))
    step = pipe.scheduler.step

    def spy(model_output, *args, **kwargs):
        stepped.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    recorder = scfg.Recorder()
    try:
        with scfg.enable(pipe, on_step=recorder):
            run(pipe, PROMPTS)
    finally:
        handle.remove()
    assert len(own) == 6 and len(stepped) == len(recorder.steps) == 3
    for i, report in enumerate(recorder.steps):
        c, u = own[2 * i], own[2 * i + 1]  # cond first, then uncond: packed [B, L, C]
        rate = report.rate_map.flatten(2).transpose(1, 2)  # [B, L, 1]
        assert not torch.allclose(rate, torch.ones_like(rate))  # really guided, not CFG
        target = u + 4.0 * rate * (c - u)
        expected = target * (c.norm(dim=-1, keepdim=True) / target.norm(dim=-1, keepdim=True))
        # float64 on both sides: the pipeline's line on the rewritten uncond returns the target up to a few
        # roundings of values of order 1 times the scale (4), and the norms agree as closely
        torch.testing.assert_close(stepped[i], expected, rtol=0, atol=1e-12 * expected.abs().max().item())


def test_qwen_image_without_true_cfg_is_left_alone_and_disabled_is_stock(tiny_qwen_image_path):
    pipe = load(tiny_qwen_image_path)
    stock_no_negative = pipe("a red cat", generator=torch.Generator().manual_seed(0), **KW).images
    stock_scale_one = run(pipe, "a red cat", true_cfg_scale=1.0)
    stock_cfg = run(pipe, "a red cat")
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        # no negative prompt, or true_cfg_scale <= 1: one pass per step, nothing to guide
        no_negative = pipe("a red cat", generator=torch.Generator().manual_seed(0), **KW).images
        scale_one = run(pipe, "a red cat", true_cfg_scale=1.0)
        assert recorder.steps == []
        run(pipe, "a red cat")
        assert len(recorder.steps) == 3
    assert torch.equal(no_negative, stock_no_negative) and torch.equal(scale_one, stock_scale_one)
    assert torch.equal(run(pipe, "a red cat"), stock_cfg)  # after the block: the stock pipeline, bit for bit


def test_qwen_image_restored_after_exception(tiny_qwen_image_path):
    pipe = load(tiny_qwen_image_path)
    assert_restored_after_exception(pipe, lambda callback: run(pipe, "a red cat", callback_on_step_end=callback))


def test_qwen_image_token_scales_reach_the_prompt_words(tiny_qwen_image_path):
    pipe = load(tiny_qwen_image_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder, token_scales={"cat": 2.0}):
        run(pipe, "a red cat", num_inference_steps=1)
    with (
        pytest.raises(SCFGError, match="`dog` to be a word of the prompt"),
        scfg.enable(pipe, token_scales={"dog": 2.0}),
    ):
        run(pipe, "a red cat", num_inference_steps=1)
    assert recorder.steps[0].tokens[0][2] == "Ġcat"


def test_qwen_image_words_are_the_prompts_own(tiny_qwen_image_path):
    """`region_tokens="words"`: the template's closing tag, newline and assistant turn are not the prompt's words."""
    pipe = load(tiny_qwen_image_path)
    segments = FAMILY.tokenize(pipe, ["a red cat"], 16)
    words = FAMILY.word_mask(segments)[0]
    tokens = pipe.tokenizer.convert_ids_to_tokens(segments[0][1][0].tolist())
    assert [t for t, w in zip(tokens, words.tolist(), strict=True) if w] == ["a", "Ġred", "Ġcat"]
    recorder = scfg.Recorder()
    with scfg.enable(pipe, SCFGConfig(region_tokens="words"), on_step=recorder):
        run(pipe, "a red cat", num_inference_steps=1)
    owned = recorder.steps[0].token_masks[0].flatten(1).any(dim=1)
    assert owned[:3].any() and not owned[3:].any()  # only the three words own regions


def test_qwen_image_variants_share_the_family_and_edit_is_refused(tiny_qwen_image_path):
    from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline
    from PIL import Image

    pipe = load(tiny_qwen_image_path)
    img2img = QwenImageImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    assert family_for(img2img).name == family_for(QwenImageInpaintPipeline(**pipe.components)).name == "qwen_image"
    recorder = scfg.Recorder()
    image = Image.new("RGB", (W, H), (200, 30, 30))
    with scfg.enable(img2img, on_step=recorder):
        out = run(img2img, "a red cat", image=image, strength=0.7, num_inference_steps=4)
    assert len(recorder.steps) == 3 and torch.isfinite(out).all()  # strength 0.7 of 4 steps: the last 3

    names = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")
    for cls in (getattr(diffusers, name, None) for name in (*names, "QwenImageLayeredPipeline")):
        if cls is None:  # not in this diffusers
            continue
        edit = cls(**pipe.components, processor=None)  # the Qwen2-VL image processor is not needed to refuse it
        for attempt in (family_for, scfg.enable):
            with pytest.raises(SCFGError, match=rf"but got {cls.__name__}\. Its reference-image"):
                attempt(edit)
    # any caller that puts reference-image tokens into the transformer's sequence is refused at the pass
    hidden = torch.zeros(1, 96 + 24, 16)
    with pytest.raises(SCFGError, match="reference-image or layer tokens"):
        FAMILY.pass_context(pipe.transformer, (), {"hidden_states": hidden, "img_shapes": [[(1, 8, 12), (1, 4, 6)]]})


# -- the attention mirror -------------------------------------------------------------------------------------------


def transformer_inputs(transformer, dtype=torch.float32) -> dict:
    """One denoiser call as the pipeline makes it, batch 2, the first sample's text padded (masked) after 4 tokens."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    return dict(
        hidden_states=torch.randn(2, 96, transformer.config.in_channels, generator=generator, dtype=dtype),
        encoder_hidden_states=torch.randn(
            2, 7, transformer.config.joint_attention_dim, generator=generator, dtype=dtype
        ),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.7, 0.7], dtype=dtype),
        img_shapes=[[(1, *GRID)]] * 2,
        return_dict=False,
    )


def record_layer(transformer, name):
    """Record `name`'s call (its kwargs, as the block passes them) and output."""
    record = {}
    attn = transformer.get_submodule(name)
    handles = [
        attn.register_forward_pre_hook(lambda m, a, k: record.update(args=a, kwargs=k) or None, with_kwargs=True),
        attn.register_forward_hook(lambda m, a, out: record.update(output=out) or None),
    ]
    return record, handles


def test_qwen_image_maps_equal_a_float64_reference(tiny_qwen_image_path):
    """The family's cross/self maps of one layer against softmax(q kᵀ) of the image queries over `[text; image]`
    keys with the padding masked, split and renormalised by hand, all in float64."""
    pipe = load(tiny_qwen_image_path, torch.float64)
    transformer = pipe.transformer
    kwargs = transformer_inputs(transformer, torch.float64)
    context = FAMILY.pass_context(transformer, (), kwargs)
    assert context.grid == GRID and context.timestep[0] == pytest.approx(700)
    record, handles = record_layer(transformer, LAYER)
    with AttentionCapture(transformer, [LAYER], FAMILY.attention, FAMILY.projections) as capture:
        capture.begin(context.grid, context=context)
        transformer(**kwargs)
        layers = capture.finish().layers
    for handle in handles:
        handle.remove()
    pair = FAMILY.layer_pairs(transformer)[0]
    assert pair.cross == LAYER
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)
    attn, call = transformer.get_submodule(LAYER), record["kwargs"]
    q, k, _ = qwen_qkv(attn, call["hidden_states"], call["encoder_hidden_states"], call["image_rotary_emb"])
    scores = q[:, :, 7:] @ k.transpose(-1, -2) * qwen_scale(attn)
    keep = torch.cat([call["encoder_hidden_states_mask"], torch.ones(2, 96, dtype=torch.bool)], dim=1)
    probs = scores.masked_fill(~keep[:, None, None, :], -torch.inf).softmax(-1).mean(1)
    text, image = probs[..., :7], probs[..., 7:]
    # float64 on both sides over the same q and k (the drift tests pin q/k to the processor's own): the two softmaxes
    # differ by reordered sums over 103 keys and a 2-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(self_rows.dense(), image / image.sum(-1, keepdim=True), **tol)
    assert cross.shape == (2, 96, 7) and self_rows.shape == (2, 96, 96)
    assert torch.equal(cross[0, :, 4:], torch.zeros(96, 3, dtype=torch.float64))  # padding: exactly no attention
    reference, valid = FAMILY.token_roles(cross)
    assert reference.tolist() == [3, 6]  # the last real token of each sample
    assert torch.equal(valid, call["encoder_hidden_states_mask"])


# The mirror runs the processor's own ops in its order and layout, in float32, so query, key and value are
# bit-identical to what the attention function receives. The rebuilt output can differ only through SDPA picking
# another kernel or blocking for our tensors than for the processor's: sums of 103 float32 products of O(1) values
# reordered, about 1e-7. 1e-5 leaves a margin of 100 and still catches any real change: a missing norm, a wrong
# scale, the text placed last or an unmasked padding token moves the outputs of these sharpened layers by 1e-2 or more.
ATOL = 1e-5


@pytest.fixture
def transformer(tiny_qwen_image_path):
    return transformer_qwenimage.QwenImageTransformer2DModel.from_pretrained(
        str(tiny_qwen_image_path), subfolder="transformer"
    ).eval()


def test_qwen_qkv_is_what_the_attention_receives(transformer, monkeypatch):
    seen = []
    dispatch = transformer_qwenimage.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((query, key, value, attn_mask))
        return dispatch(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_qwenimage, "dispatch_attention_fn", spy)
    record, handles = record_layer(transformer, LAYER)
    with torch.no_grad():
        transformer(**transformer_inputs(transformer))
    for handle in handles:
        handle.remove()
    call = record["kwargs"]
    attn = transformer.get_submodule(LAYER)
    with torch.no_grad():
        mirrored = qwen_qkv(
            attn, call["hidden_states"], call["encoder_hidden_states"], call["image_rotary_emb"], with_value=True
        )
    query, key, value, mask = seen[1]  # one call per block; block 1 is the layer
    assert len(seen) == len(transformer.transformer_blocks)
    for mine, theirs in zip(mirrored, (query, key, value), strict=True):
        assert torch.equal(mine.transpose(1, 2), theirs)  # the processor's layout is sequence first
    bias = qwen_key_bias(call["encoder_hidden_states_mask"], None, 96, torch.float32)
    assert mask.dtype == torch.bool and torch.equal(bias, torch.zeros_like(bias).masked_fill(~mask, -torch.inf))
    assert qwen_scale(attn) == pytest.approx(query.shape[-1] ** -0.5)


def test_qwen_qkv_rebuilds_layer_output_and_reuses_projections(transformer):
    attn = transformer.get_submodule(LAYER)
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    projections, calls = {}, []
    record, handles = record_layer(transformer, LAYER)
    handles += [
        getattr(attn, n).register_forward_hook(lambda m, a, out, n=n: projections.setdefault(n, out)) for n in names
    ]
    with torch.no_grad():
        transformer(**transformer_inputs(transformer))
    for handle in handles:
        handle.remove()
    call = record["kwargs"]
    inputs = (attn, call["hidden_states"], call["encoder_hidden_states"], call["image_rotary_emb"])
    counters = [getattr(attn, n).register_forward_hook(lambda m, a, out: calls.append(m)) for n in names]
    with torch.no_grad():
        q, k, v = qwen_qkv(*inputs, projections=projections, with_value=True)
    for handle in counters:
        handle.remove()
    assert not calls  # nothing projected again
    with torch.no_grad():
        for mine, theirs in zip((q, k, v), qwen_qkv(*inputs, with_value=True), strict=True):
            assert torch.equal(mine, theirs)  # the same Linear outputs, so the same bits
        bias = qwen_key_bias(call["encoder_hidden_states_mask"], None, 96, torch.float32)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2, 3)
        text, image = out[:, :7], out[:, 7:]
        rebuilt = (attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text))
    for mine, theirs in zip(rebuilt, record["output"], strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    # the family's own capture path: the recorded projections of `FAMILY.projections`, the same rows
    layer_call = LayerCall(record["args"], call, {n: projections[n] for n in FAMILY.projections})
    rows = FAMILY.attention(attn, layer_call, None, None)
    assert rows.shape == (2, 96, 103)


class RecordingProcessor:
    """A processor S-CFG does not know (say, another library's wrapper): the mirror cannot vouch for its maths."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, *args, **kwargs):
        return self.inner(attn, *args, **kwargs)


def test_qwen_qkv_refuses_unknown_processor(transformer):
    attn = transformer.get_submodule(LAYER)
    attn.set_processor(RecordingProcessor(attn.processor))
    hidden = torch.randn(1, 4, 32)
    with pytest.raises(SCFGError, match="RecordingProcessor") as error:
        qwen_qkv(attn, hidden, hidden)
    assert SUPPORTED_PROCESSORS[0] in str(error.value)
    with pytest.raises(SCFGError, match="RecordingProcessor"):
        qwen_scale(attn)


def test_cli_compare_runs_qwen_image_true_cfg(tiny_qwen_image_path, tmp_path):
    """`--scale` reaches Qwen-Image as `true_cfg_scale` with a `" "` negative prompt, so the CFG panel runs true CFG
    and the S-CFG panel is guided, with its region files."""
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "cmp.png"
    argv = ["compare", "a red cat", "--model", str(tiny_qwen_image_path), "--steps", "2", "--height", str(H)]
    assert main([*argv, "--width", str(W), "--scale", "4", "--out", str(out), "--show-regions"]) == 0
    panel = Image.open(out)
    assert json.loads(panel.text["scfg"])["guidance"] == "compare"
    assert any(p.name.endswith("-steps.png") for p in tmp_path.iterdir())
