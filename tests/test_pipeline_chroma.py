"""S-CFG on a stock ChromaPipeline: two separate transformer passes per step (cond, then uncond) on
`guidance_scale`, FLUX.1's packed 2x2 latents and joint RoPE attention, T5 padding masked in the transformer except
one pad. Built from configs offline (tests/tiny_chroma.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformer_chroma = pytest.importorskip(
    "diffusers.models.transformers.transformer_chroma", reason="Chroma pipelines need diffusers >= 0.35"
)

from checks import assert_restored_after_exception  # noqa: E402
from diffusers import ChromaPipeline, DiffusionPipeline  # noqa: E402
from diffusers.models.transformers import transformer_flux  # noqa: E402
from tiny_chroma import GRID, HEIGHT, TEXT_WIDTH, WIDTH, build_tiny_chroma, tiny_transformer  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig  # noqa: E402
from scfg.attention import pooled_grid  # noqa: E402
from scfg.capture import AttentionCapture  # noqa: E402
from scfg.engine import CFGLayout  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.chroma import FAMILY  # noqa: E402
from scfg.families.flux_attention import flux_qkv, flux_scale  # noqa: E402

MASKS = pooled_grid(GRID, 2)  # the token grid pooled 2x2 (`mask_pool=2`, the family default)

TEXT = 16  # max_sequence_length of the tests: 16 T5 positions
KW = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, output_type="latent", max_sequence_length=TEXT)
PROMPTS = ["a red cat", "two blue dogs on the sofa"]
NEGATIVE = "blurry, low quality"  # another length than either prompt
UNIT_RATE = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)
LAYER = "transformer_blocks.1.attn"


@pytest.fixture(scope="session")
def tiny_chroma_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chroma")
    build_tiny_chroma(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = ChromaPipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, negative=NEGATIVE, seed=0, **kwargs):
    return pipe(
        prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(seed), **{**KW, **kwargs}
    ).images


def kept_lengths(report) -> list[int]:
    """Positions Chroma keeps in each sample of a step report: the words, `</s>` and one `<pad>`."""
    return [min(tokens.index("</s>") + 2, len(tokens)) for tokens in report.tokens]


def test_tiny_chroma_loads_offline_and_decodes(tiny_chroma_path):
    pipe = DiffusionPipeline.from_pretrained(str(tiny_chroma_path))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "ChromaPipeline" and family_for(pipe).name == "chroma"
    image = run(pipe, "a red cat", output_type="pil", num_inference_steps=1)[0]
    assert image.size == (WIDTH, HEIGHT)  # PIL: (width, height)


def test_chroma_masks_per_sample_and_masked_padding_owns_nothing(tiny_chroma_path):
    """2 prompts x 2 images with a negative prompt of another length: each sample gets its own masks on the 8x12
    token grid, the kept pad may own a region, the masked padding after it never does; and the batch gives what
    each sample gives alone (float64), so no mask or rate leaks between samples."""
    pipe = load(tiny_chroma_path, torch.float64)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert guard.config.foreground_source == "cond"  # the family's preset
    assert [p.cross for p in guard.pairs] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    with guard:
        batched = pipe(PROMPTS, negative_prompt=NEGATIVE, num_images_per_prompt=2, generator=gens, **KW).images
        steps = list(recorder.steps)
        singles = [run(pipe, PROMPTS[i // 2], seed=i) for i in range(4)]
    plain = run(pipe, PROMPTS[0])
    assert [r.step for r in steps] == [0, 1, 2]  # the pipeline passes t / 1000: matched back to the schedule
    report = steps[0]
    assert report.token_masks.shape == (4, TEXT, *MASKS) and report.rate_map.shape == (4, 1, *GRID)
    assert report.guidance_scale == 5.0  # ChromaPipeline's default
    lengths = kept_lengths(report)
    assert lengths[0] == lengths[1] < lengths[2] == lengths[3] < TEXT
    for sample, length in enumerate(lengths):
        assert report.tokens[sample][length - 1] == "<pad>"  # the one pad Chroma keeps
        assert not report.token_masks[sample, length:].any()
        assert report.token_masks[sample, :length].any(dim=0).all()  # every cell belongs to a kept token
    assert not torch.equal(report.token_masks[0], report.token_masks[2])
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; through 3 steps of
    # the tiny transformer the packed latents (order 1) differ by ~1e-14, so 1e-9 is loose by orders of magnitude,
    # while a mask or rate taken from another sample moves them by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(singles[0], plain)


def test_chroma_unit_rate_equals_stock_cfg(tiny_chroma_path):
    pipe = load(tiny_chroma_path, torch.float64)
    plain = run(pipe, PROMPTS)
    with scfg.enable(pipe, UNIT_RATE):
        ours = run(pipe, PROMPTS)
    # rate exactly 1 (smoothed by weights summing to 1 within 2 ulps): the rewritten uncond pass reproduces the
    # model's own up to a few float64 roundings, which the line multiplies by the scale (5), over 3 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_chroma_without_cfg_is_left_alone_and_disabled_is_stock(tiny_chroma_path):
    pipe = load(tiny_chroma_path)
    stock_no_cfg = run(pipe, "a red cat", guidance_scale=1.0)
    stock_cfg = run(pipe, "a red cat")
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        no_cfg = run(pipe, "a red cat", guidance_scale=1.0)  # one pass per step: nothing to guide
        assert recorder.steps == []
        run(pipe, "a red cat")
        assert [r.step for r in recorder.steps] == [0, 1, 2]
    assert torch.equal(no_cfg, stock_no_cfg)
    assert torch.equal(run(pipe, "a red cat"), stock_cfg)  # after the block: the stock pipeline, bit for bit


def test_chroma_restored_after_exception(tiny_chroma_path):
    pipe = load(tiny_chroma_path)
    assert_restored_after_exception(pipe, lambda callback: run(pipe, "a red cat", callback_on_step_end=callback))


def test_chroma_cfg_layout_and_guidance_arguments(tiny_chroma_path):
    """CFG is `guidance_scale` with a negative prompt (FLUX.1's family uses `true_cfg_scale` instead)."""
    import types

    pipe = types.SimpleNamespace(do_classifier_free_guidance=True, guidance_scale=4.0)
    assert FAMILY.cfg_layout(pipe, {}, "transformer") == CFGLayout("separate", ("cond", "uncond"), "uncond", 4.0)
    pipe.do_classifier_free_guidance = False
    assert FAMILY.cfg_layout(pipe, {}, "transformer") is None
    assert scfg.guidance_arguments(load(tiny_chroma_path), 4.0, "ugly") == {
        "guidance_scale": 4.0,
        "negative_prompt": "ugly",
    }


def chroma_mask(lengths, image_tokens, dtype=torch.float64):
    """The transformer's `attention_mask` as ChromaPipeline builds it: positions 0..n of a prompt of n tokens kept
    (the words, `</s>` and one pad), then every image token, in the prompt embeddings' dtype (diffusers 0.42)."""
    mask = torch.zeros(len(lengths), TEXT + image_tokens, dtype=dtype)
    for sample, length in enumerate(lengths):
        mask[sample, : length + 1] = 1
    mask[:, TEXT:] = 1
    return mask


def transformer_inputs(transformer, lengths, dtype=torch.float64, mask_dtype=None):
    g = torch.Generator().manual_seed(0)
    h, w = GRID
    img_ids = torch.zeros(h, w, 3, dtype=dtype)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(len(lengths), h * w, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(len(lengths), TEXT, TEXT_WIDTH, generator=g, dtype=dtype),
        timestep=torch.full((len(lengths),), 0.6, dtype=dtype),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(TEXT, 3, dtype=dtype),
        attention_mask=chroma_mask(lengths, h * w, mask_dtype or dtype),
        return_dict=False,
    )


def capture(transformer, kwargs, layer=LAYER):
    """Run `transformer(**kwargs)` with the family's capture on `layer`; return its `AttentionRows`, the pass
    context and the layer's inputs (by name)."""
    inputs = {}

    def keep(module, args, kw):
        inputs.update(kw)  # ChromaTransformerBlock calls its attention by keyword

    handle = transformer.get_submodule(layer).register_forward_pre_hook(keep, with_kwargs=True)
    context = FAMILY.pass_context(transformer, (), kwargs)
    try:
        with AttentionCapture(transformer, [layer], FAMILY.attention, FAMILY.projections) as cap:
            cap.begin(context.grid, context=context)
            with torch.no_grad():
                transformer(**kwargs)
            layers = cap.finish().layers
    finally:
        handle.remove()
    return layers, context, inputs


def test_chroma_maps_equal_a_float64_reference():
    """The family's cross and self maps of one double-stream layer against softmax(q kᵀ / sqrt(d)) of the image
    queries over `[text; image]` keys, masked keys left out, split and renormalised by hand in float64."""
    transformer = tiny_transformer().to(torch.float64).eval()
    lengths = [3, 7]
    layers, context, inputs = capture(transformer, transformer_inputs(transformer, lengths))
    assert context.grid == GRID and context.extra["text_len"] == TEXT
    pair = next(p for p in FAMILY.layer_pairs(transformer) if p.cross == LAYER)
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)
    attn = transformer.get_submodule(LAYER)
    q, k, _ = flux_qkv(attn, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["image_rotary_emb"])
    keep = torch.ones(2, TEXT + GRID[0] * GRID[1], dtype=torch.bool)
    for sample, length in enumerate(lengths):
        keep[sample, length + 1 : TEXT] = False
    scores = q[:, :, TEXT:] @ k.transpose(-1, -2) * flux_scale(attn)
    probs = scores.masked_fill(~keep[:, None, None], -torch.inf).softmax(-1).mean(1)
    text, image = probs[..., :TEXT], probs[..., TEXT:]
    # float64 on both sides over the same q and k (the drift test pins q/k to the processor's own): the softmaxes
    # differ by reordered sums over 112 keys and a 2-head mean, ~100 roundings of eps relative; masked keys are 0
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(self_rows.dense(), image / image.sum(-1, keepdim=True), **tol)
    assert cross.shape == (2, 96, TEXT) and self_rows.shape == (2, 96, 96)
    reference, valid = FAMILY.token_roles(cross)
    assert reference.tolist() == [3, 7]  # the kept pad: the last kept token
    assert valid.sum(dim=1).tolist() == [4, 8]


def test_chroma_maps_are_the_same_under_a_float_or_a_boolean_mask():
    """diffusers 0.42 passes Chroma's mask as float 1/0, which SDPA adds to the logits (+1 on kept keys); a
    boolean mask drops the masked keys. The family reads both as the keep-mask they mean. The first block's inputs
    are the same under either mask (the mask acts only inside attention), and its maps agree to rounding."""
    transformer = tiny_transformer().to(torch.float64).eval()
    lengths = [3, 7]
    pair = next(p for p in FAMILY.layer_pairs(transformer) if p.cross == "transformer_blocks.0.attn")
    maps = []
    for mask_dtype in (torch.float64, torch.bool):
        kwargs = transformer_inputs(transformer, lengths, mask_dtype=mask_dtype)
        layers, context, _ = capture(transformer, kwargs, pair.cross)
        cross, self_rows = FAMILY.layer_attention(pair, layers, context)
        maps.append((cross, self_rows.dense()))
    (cross_f, self_f), (cross_b, self_b) = maps
    # the same q and k; the float mask's +1 on every kept key cancels in each renormalised block: one exp and one
    # division more or less per entry, a few eps relative
    tol = dict(rtol=64 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross_f, cross_b, **tol)
    torch.testing.assert_close(self_f, self_b, **tol)
    assert cross_f[0, :, 4:].eq(0).all() and cross_f[1, :, 8:].eq(0).all()


def test_chroma_qk_is_what_the_attention_receives(monkeypatch):
    """Drift test, float32: the query and key the family hands to the engine are the very numbers FluxAttnProcessor
    passes to `dispatch_attention_fn`, and the key mask it reads is the one passed there; the layer's output,
    rebuilt from the mirror's q/k/v and the processor's own mask, is the layer's own."""
    transformer = tiny_transformer().eval()
    lengths = [3, 7]
    kwargs = transformer_inputs(transformer, lengths, dtype=torch.float32)
    seen = []
    dispatch = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, **options):
        seen.append((query, key, value, options))
        return dispatch(query, key, value, **options)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    outputs = {}

    def keep_output(module, args, output):
        outputs["out"] = output

    attn = transformer.get_submodule(LAYER)
    handle = attn.register_forward_hook(keep_output)
    try:
        layers, _, inputs = capture(transformer, kwargs)
    finally:
        handle.remove()
    assert len(seen) == 4  # one attention call per block: 2 double-stream, 2 single-stream
    query, key, _, options = seen[1]
    rows = layers[LAYER]
    assert torch.equal(rows.query, query.transpose(1, 2)[:, :, TEXT:]) and torch.equal(rows.key, key.transpose(1, 2))
    mask = options["attn_mask"]
    assert mask.dtype == torch.float32 and mask.shape == (2, 1, TEXT + 96, TEXT + 96)  # the outer product, float
    assert torch.equal(rows.bias[:, 0, 0] == 0, mask[:, 0, TEXT] != 0)  # kept keys: what the mask keeps
    assert options.get("scale") is None and rows.scale == flux_scale(attn)  # SDPA's default scale
    q, k, v = flux_qkv(
        attn, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["image_rotary_emb"], with_value=True
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    text_out, image_out = out.split_with_sizes([TEXT, 96], dim=1)
    image_out, text_new = attn.to_out[0](image_out), attn.to_add_out(text_out)
    # bit-identical q, k, v (above); SDPA on our contiguous tensors may block its sums differently from the
    # processor's permuted views: reordered float32 sums of 112 O(1) products, ~1e-7; a wrong mask, norm or text
    # order moves these sharpened layers' outputs by 1e-2 or more
    torch.testing.assert_close(image_out, outputs["out"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(text_new, outputs["out"][1], atol=1e-5, rtol=0)


def test_cli_compare_runs_chroma(tiny_chroma_path, tmp_path):
    """`--scale` reaches Chroma as `guidance_scale` (with the CLI's negative prompt), so the CFG panel runs CFG
    and the S-CFG panel is guided, with its region files."""
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "cmp.png"
    argv = ["compare", "a red cat", "--model", str(tiny_chroma_path), "--steps", "2", "--height", "32"]
    argv += ["--width", "48", "--scale", "4", "--negative-prompt", "blurry", "--out", str(out), "--show-regions"]
    assert main(argv) == 0
    assert json.loads(Image.open(out).text["scfg"])["guidance"] == "compare"
    assert any(p.name.endswith("-steps.png") for p in tmp_path.iterdir())
