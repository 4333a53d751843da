"""S-CFG on stock LTX-Video pipelines (`LTXPipeline`, `LTXImageToVideoPipeline`): one batched `[uncond, cond]`
transformer pass per step, packed `[B, F·H·W, C]` latents on a 3-D token grid, self-attention with a 3-D rotary
embedding and a q/k RMS norm across heads, cross-attention to T5 with a padding mask. The tiny pipeline is built
from configs offline (tests/tiny_ltx.py) and loaded with `from_pretrained`."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "LTXPipeline"):  # LTX-Video arrived in diffusers 0.32
    pytest.skip(f"diffusers {diffusers.__version__} has no LTXPipeline", allow_module_level=True)

from diffusers import LTXImageToVideoPipeline, LTXPipeline  # noqa: E402
from tiny_ltx import FRAMES, GRID, HEIGHT, WIDTH, build_tiny_ltx  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig, SCFGError  # noqa: E402
from scfg.capture import AttentionCapture  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.ltx import FAMILY, ltx_bias, ltx_qk  # noqa: E402

TEXT = 16  # max_sequence_length
KW = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=3, max_sequence_length=TEXT)
LATENT = dict(KW, output_type="latent")  # packed latents [B, F·H·W, 8]
PER_FRAME = GRID[1] * GRID[2]
LAYER = 1  # a block the family uses (the middle half of the tiny model's 4)
EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(scope="session")
def tiny_ltx_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ltx")
    build_tiny_ltx(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = LTXPipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_to_video(pipe):
    i2v = LTXImageToVideoPipeline.from_pipe(pipe)
    i2v.set_progress_bar_config(disable=True)
    return i2v


def condition_image():
    from PIL import Image

    image = Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, WIDTH // 3, HEIGHT))  # not a flat image: the VAE latent has structure
    return image


def run(pipe, prompt, negative="blurry, low quality", seed=0, **kwargs):
    per_prompt = kwargs.get("num_videos_per_prompt", 1)
    generator = (
        [torch.Generator().manual_seed(seed + i) for i in range(len(prompt) * per_prompt)]
        if isinstance(prompt, list)
        else None
    )
    generator = generator or torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, negative_prompt=negative, generator=generator, **{**LATENT, **kwargs}).frames


# -- the tiny pipeline ------------------------------------------------------------------------------------------------


def test_tiny_ltx_pipeline_loads_offline_and_makes_a_video(tiny_ltx_path):
    pipe = load(tiny_ltx_path)
    assert family_for(pipe) is FAMILY
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (4, 4)
    video = pipe("a red cat", generator=torch.Generator().manual_seed(0), output_type="pt", **KW).frames
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH)
    assert run(pipe, "a red cat").shape == (1, GRID[0] * PER_FRAME, 8)


# -- the attention mirror ---------------------------------------------------------------------------------------------


def transformer_inputs(transformer, dtype=torch.float32, batch=2):
    """One denoiser call as LTXPipeline makes it, with per-sample padding masks of different lengths."""
    g = torch.Generator().manual_seed(0)
    tokens = GRID[0] * PER_FRAME
    mask = torch.zeros(batch, 7, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 4 + 2 * i] = True  # 4 and 6 real tokens, the rest padding
    return dict(
        hidden_states=torch.randn(batch, tokens, 8, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, 7, transformer.config.caption_channels, generator=g, dtype=dtype),
        timestep=torch.full((batch,), 700.0),
        encoder_attention_mask=mask,
        num_frames=GRID[0],
        height=GRID[1],
        width=GRID[2],
        rope_interpolation_scale=(4 / 25, 4, 4),
        return_dict=False,
    )


@contextlib.contextmanager
def record_layers(transformer, names):
    """Record each layer's inputs (as named arguments) and output, and what it handed SDPA, during the forward.

    LTXVideoAttnProcessor reaches SDPA through `dispatch_attention_fn` (the native backend permutes to heads first
    and calls `torch.nn.functional.scaled_dot_product_attention`); diffusers < 0.35 calls SDPA itself. Either way
    the spy sees the heads-first query, key, value and mask that the softmax uses.
    """
    records = {name: {"sdpa": []} for name in names}
    sdpa = F.scaled_dot_product_attention
    active: list[str] = []

    def spy(*args, **kwargs):
        if active:
            names_ = ("query", "key", "value", "attn_mask")
            seen = {**dict(zip(names_, args, strict=False)), **{k: kwargs[k] for k in names_ if k in kwargs}}
            records[active[-1]]["sdpa"].append(seen)
        return sdpa(*args, **kwargs)

    def pre(name):
        def hook(module, args, kwargs):
            params = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
            named = {**dict(zip(params, args, strict=False)), **kwargs}
            records[name]["inputs"] = {p: named.get(p) for p in params}
            active.append(name)

        return hook

    def post(name):
        def hook(module, args, output):
            active.remove(name)
            records[name]["output"] = output

        return hook

    handles = []
    for name in names:
        module = transformer.get_submodule(name)
        handles += [
            module.register_forward_pre_hook(pre(name), with_kwargs=True),
            module.register_forward_hook(post(name)),
        ]
    F.scaled_dot_product_attention = spy
    try:
        yield records
    finally:
        F.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_ltx_qk_is_what_the_attention_receives(tiny_ltx_path, kind):
    """The mirror's query, key and value are the very tensors the processor hands SDPA, its bias is the mask SDPA
    gets, and they rebuild the layer's output."""
    from diffusers import LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel.from_pretrained(str(tiny_ltx_path), subfolder="transformer").eval()
    name = f"transformer_blocks.{LAYER}.{kind}"
    attn = transformer.get_submodule(name)
    with record_layers(transformer, [name]) as records, torch.no_grad():
        transformer(**transformer_inputs(transformer))
    record = records[name]
    assert len(record["sdpa"]) == 1, "expected one SDPA call in the layer; has the processor's backend changed?"
    seen, inputs = record["sdpa"][0], record["inputs"]
    with torch.no_grad():
        query, key, value = ltx_qk(
            attn, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["image_rotary_emb"], with_value=True
        )
        bias = ltx_bias(attn, inputs["attention_mask"], query.shape[0], key.shape[2])
    for mine, theirs in ((query, seen["query"]), (key, seen["key"]), (value, seen["value"])):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    if kind == "attn1":
        assert bias is None and seen.get("attn_mask") is None
    else:
        assert torch.equal(bias, seen["attn_mask"]) and bias.shape == (2, 2, 1, 7)
    with torch.no_grad():
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        rebuilt = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
    # bit-identical inputs; only SDPA's kernel choice for our (contiguous) tensors against the processor's
    # (permuted) views can reorder float32 sums over 384 keys of O(1) terms, ~1e-7; a missing norm, a per-head
    # norm, a rotary swap or a wrong scale moves these sharpened layers' outputs by 1e-2 or more
    torch.testing.assert_close(rebuilt, record["output"], atol=1e-5, rtol=0)


def rms(norm, x, heads=1):
    """`norm` (an RMS norm over the last axis) by hand, over `heads` equal parts of it. `torch.nn.RMSNorm`
    (diffusers >= 0.35) works in the input's dtype; diffusers' own `RMSNorm` (before) forms the mean square and its
    rsqrt in float32, also for a float64 model."""
    dtype = x.dtype if isinstance(norm, torch.nn.RMSNorm) else torch.float32
    x, weight = x.unflatten(-1, (heads, -1)), norm.weight.unflatten(0, (heads, -1))
    return (x * torch.rsqrt(x.to(dtype).pow(2).mean(-1, keepdim=True) + norm.eps) * weight).flatten(-2)


def rotate(x, cos, sin):
    """The rotary embedding by hand: consecutive channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin),
    computed in float32 and cast back, as LTX's `apply_rotary_emb` does (`x.float()`) whatever the model's dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos.float() + rotated.float() * sin.float()).to(x.dtype)


def reference_probs(attn, inputs, per_head_norm=False):
    """Head-averaged probabilities `[B, Q, K]` of one LTX layer by hand in float64: projections, the RMS norm over
    the whole width (all heads at once; `per_head_norm=True` is the wrong convention, per head), rotary, split,
    `softmax(q kᵀ / sqrt(d) + bias)`."""
    hidden, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
    context = hidden if text is None else text
    q = hidden @ attn.to_q.weight.T + attn.to_q.bias
    k = context @ attn.to_k.weight.T + attn.to_k.bias
    heads = attn.heads
    parts = heads if per_head_norm else 1
    q, k = rms(attn.norm_q, q, parts), rms(attn.norm_k, k, parts)
    if inputs["image_rotary_emb"] is not None:
        cos, sin = inputs["image_rotary_emb"]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = inputs["attention_mask"]
    if mask is not None:  # the transformer's bias [B, 1, T]
        logits = logits + mask[:, None]
    return logits.softmax(-1).mean(1)


def capture_pair(transformer, inputs, context):
    names = [f"transformer_blocks.{LAYER}.attn2", f"transformer_blocks.{LAYER}.attn1"]
    with AttentionCapture(transformer, names, FAMILY.attention, FAMILY.projections) as capture:
        capture.begin(context.grid, context=context)
        with record_layers(transformer, names) as records:
            transformer(**inputs)
        layers = capture.finish().layers
    pair = next(p for p in FAMILY.layer_pairs(transformer) if p.cross == names[0])
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)
    return cross, self_rows, records, names


def test_ltx_maps_equal_a_float64_reference(tiny_ltx_path):
    """The family's cross and self maps of one block against softmax(q kᵀ) formed by hand (norm across heads,
    rotary, padding bias), all in float64; masked padding has exactly zero probability and is not a valid token."""
    pipe = load(tiny_ltx_path, torch.float64)
    transformer = pipe.transformer
    inputs = transformer_inputs(transformer, torch.float64)
    context = FAMILY.pass_context(transformer, (), inputs)
    assert context.grid == GRID and context.extra["conditioning_tokens"] == 0
    with torch.no_grad():
        cross, self_rows, records, (cross_name, self_name) = capture_pair(transformer, inputs, context)
        expected_cross = reference_probs(transformer.get_submodule(cross_name), records[cross_name]["inputs"])
        expected_self = reference_probs(transformer.get_submodule(self_name), records[self_name]["inputs"])
        wrong_self = reference_probs(transformer.get_submodule(self_name), records[self_name]["inputs"], True)
    # float64 on both sides from the same layer inputs: the two computations differ by reordered sums (the
    # projections over 16 channels, the norm's mean, 8-term dot products, the softmax over 384 keys and the 2-head
    # mean), ~100 roundings of eps relative; the wrong (per-head) norm moves the maps by ~1e-1
    tol = dict(rtol=256 * EPS64, atol=torch.finfo(torch.float64).tiny)
    torch.testing.assert_close(cross, expected_cross, **tol)
    torch.testing.assert_close(self_rows.dense(), expected_self, **tol)
    assert (self_rows.dense() - wrong_self).abs().max() > 1e-3
    assert cross.shape == (2, GRID[0] * PER_FRAME, 7) and self_rows.shape == (2, 384, 384)
    assert (cross[0, :, 4:] == 0).all() and (cross[1, :, 6:] == 0).all()  # -10000 underflows exp
    reference, valid = FAMILY.token_roles(cross)
    assert valid.tolist() == inputs["encoder_attention_mask"].tolist()
    assert reference.tolist() == [3, 5]  # EOS: the last unmasked token


def test_ltx_conditioning_frame_is_neither_query_nor_key(tiny_ltx_path):
    """Image-to-video: with per-token timesteps holding the first frame at 0, the grid is the generated frames and
    the maps are the full softmax's generated block (self-attention renormalised over the generated keys)."""
    pipe = load(tiny_ltx_path, torch.float64)
    transformer = pipe.transformer
    inputs = transformer_inputs(transformer, torch.float64)
    conditioning = torch.zeros(2, GRID[0] * PER_FRAME)
    conditioning[:, :PER_FRAME] = 1.0
    inputs["timestep"] = torch.full((2, 1), 700.0) * (1 - conditioning)  # as LTXImageToVideoPipeline builds it
    context = FAMILY.pass_context(transformer, (), inputs)
    assert context.grid == (GRID[0] - 1, *GRID[1:]) and context.extra["conditioning_tokens"] == PER_FRAME
    assert context.timestep.tolist() == [700.0, 700.0]  # the step's, not the conditioning tokens' 0
    with torch.no_grad():
        cross, self_rows, records, (cross_name, self_name) = capture_pair(transformer, inputs, context)
        full_cross = reference_probs(transformer.get_submodule(cross_name), records[cross_name]["inputs"])
        full_self = reference_probs(transformer.get_submodule(self_name), records[self_name]["inputs"])
    block = full_self[:, PER_FRAME:, PER_FRAME:]
    tol = dict(rtol=256 * EPS64, atol=torch.finfo(torch.float64).tiny)  # as in the test above
    torch.testing.assert_close(cross, full_cross[:, PER_FRAME:], **tol)
    torch.testing.assert_close(self_rows.dense(), block / block.sum(-1, keepdim=True), **tol)
    output = (torch.arange(2 * 384 * 8, dtype=torch.float64).reshape(2, 384, 8),)
    view = FAMILY.predictions(output, context)
    assert view.shape == (2, 8, *context.grid) and view.data_ptr() == output[0][:, PER_FRAME:].data_ptr()
    assert torch.equal(view[0, :, 0, 0, 0], output[0][0, PER_FRAME])  # (frame, row, column) order
    assert torch.equal(view[1, :, 1, 2, 3], output[0][1, 2 * PER_FRAME + 2 * GRID[2] + 3])
    rebuilt = FAMILY.with_predictions(output, view * 0 - 1, context)[0]
    assert torch.equal(rebuilt[:, :PER_FRAME], output[0][:, :PER_FRAME]) and (rebuilt[:, PER_FRAME:] == -1).all()


def test_ltx_refuses_calls_it_cannot_read(tiny_ltx_path):
    pipe = load(tiny_ltx_path)
    transformer = pipe.transformer
    inputs = transformer_inputs(transformer)
    with pytest.raises(SCFGError, match="num_frames"):
        FAMILY.pass_context(transformer, (), {**inputs, "num_frames": None})
    with pytest.raises(SCFGError, match="3x8x8"):
        FAMILY.pass_context(transformer, (), {**inputs, "width": 8})
    timestep = torch.full((2, 384), 700.0)
    timestep[:, 5] = 0.0  # a held-back token that is not a whole leading frame
    with pytest.raises(SCFGError, match="whole leading frames"):
        FAMILY.pass_context(transformer, (), {**inputs, "timestep": timestep})

    class Unknown:
        def __call__(self, attn, *args, **kwargs):
            raise AssertionError("not called")

    attn = transformer.transformer_blocks[0].attn1
    attn.set_processor(Unknown())
    with pytest.raises(SCFGError, match="LTXVideoAttnProcessor"):
        ltx_qk(attn, torch.randn(1, 4, 16))
    if hasattr(diffusers, "LTXConditionPipeline"):  # appended conditioning tokens, video_coords: no token grid
        condition = diffusers.LTXConditionPipeline.from_pipe(pipe)
        with pytest.raises(SCFGError, match="supported model family"):
            scfg.enable(condition)


# -- the pipelines ----------------------------------------------------------------------------------------------------


def test_ltx_masks_per_sample_on_the_token_grid(tiny_ltx_path):
    """2 prompts x 2 videos (as a list of 4 with one generator each) and a negative prompt of another length: masks
    `[B, T, f, h, w]` per sample, padding never owns a region, and the batch equals its samples run one by one."""
    pipe = load(tiny_ltx_path, torch.float64)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert [p.cross for p in guard.pairs] == ["transformer_blocks.1.attn2", "transformer_blocks.2.attn2"]
    assert [p.self_attn for p in guard.pairs] == ["transformer_blocks.1.attn1", "transformer_blocks.2.attn1"]
    assert guard.config.foreground_source == "cond" and guard.levels == (1,)
    prompts = ["a red cat on the sofa", "a red cat on the sofa", "a blue dog", "a blue dog"]
    with guard:
        batched = run(pipe, prompts, negative="blurry")
        singles = [run(pipe, p, negative="blurry", seed=i) for i, p in enumerate(prompts)]
    plain = run(pipe, prompts, negative="blurry")
    assert [r.step for r in recorder.steps] == [0, 1, 2, *[i for _ in prompts for i in range(3)]]
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, TEXT, *GRID) and report.rate_map.shape == (4, 1, *GRID)
    assert report.guidance_scale == 3.0  # LTXPipeline's default
    # float64 model, float32 CFG line (the pipeline casts the prediction with `.float()`): a batched and a single
    # float64 forward differ by ~1e-16 relative, which the cast to float32 almost always erases; where it does
    # not, one float32 ulp (6e-8 relative) times the scale 3, over 3 steps: 1e-5 of the latents' maximum is loose
    # by two orders (measured: 0), while the samples' noise swapped within each prompt moves them by ~1
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-5 * float(batched.abs().max()))
    owners = report.token_masks.flatten(2).any(dim=2)
    assert report.token_masks.any(dim=1).all()  # every cell of every frame has a region
    assert report.tokens[2][:4] == ["▁a", "▁blue", "▁dog", "</s>"]
    assert not owners[2:, 4:].any() and owners[2:, :4].any()  # padding after "</s>" never owns a region
    assert not owners[:2, 7:].any()  # "a red cat on the sofa </s>": 7 real tokens
    assert not torch.equal(report.token_masks[0], report.token_masks[1])  # same prompt, other noise
    assert not torch.equal(report.token_masks[0], report.token_masks[2])
    assert report.foreground_mask.any()
    assert not torch.allclose(batched, plain)


def test_ltx_num_videos_per_prompt_is_guided(tiny_ltx_path):
    pipe = load(tiny_ltx_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        run(pipe, ["a red cat", "a blue dog"], num_videos_per_prompt=2)
    assert [r.step for r in recorder.steps] == [0, 1, 2]
    assert recorder.steps[0].token_masks.shape[0] == 4  # 2 prompts x 2 videos, per-sample masks


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_ltx_unit_rate_equals_plain_cfg(tiny_ltx_path, guidance_rescale):
    """With the rate forced to 1 the pipeline's own line (and its `guidance_rescale`, against the model's kept
    conditional prediction) gives plain CFG."""
    if "guidance_rescale" not in inspect.signature(LTXPipeline.__call__).parameters:
        if guidance_rescale:
            pytest.skip(f"LTXPipeline of diffusers {diffusers.__version__} has no `guidance_rescale`")
        kwargs = dict(guidance_scale=4.0)
    else:
        kwargs = dict(guidance_scale=4.0, guidance_rescale=guidance_rescale)
    pipe = load(tiny_ltx_path, torch.float64)
    plain = run(pipe, "a red cat on the sofa", **kwargs)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        forced = run(pipe, "a red cat on the sofa", **kwargs)
    # the rewritten u' = c + (t - c)/b is within a few float64 ulps of u (rate 1 exactly, smoothed by weights that
    # sum to 1 within 2 ulps); the pipeline casts both predictions to float32 before its line, which erases that
    # almost everywhere and elsewhere leaves one float32 ulp (6e-8) times the scale 4: 1e-5 of the latents' maximum
    # over 3 steps is loose by two orders (measured: 0 here, 1.4e-7 for image-to-video), while a rate of 1.001
    # everywhere moves them by 1.4e-4 to 2e-4 of their maximum
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))


def test_ltx_without_cfg_is_left_alone_and_disabled_is_stock(tiny_ltx_path):
    pipe = load(tiny_ltx_path)
    stock_no_cfg = run(pipe, "a red cat", guidance_scale=1.0)
    stock_cfg = run(pipe, "a red cat")
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        no_cfg = run(pipe, "a red cat", guidance_scale=1.0)  # one pass on the prompt alone: nothing to guide
        assert recorder.steps == []
        guided = run(pipe, "a red cat")
    assert len(recorder.steps) == 3 and not torch.equal(guided, stock_cfg)
    assert torch.equal(no_cfg, stock_no_cfg)
    assert torch.equal(run(pipe, "a red cat"), stock_cfg)  # after the block: the stock pipeline, bit for bit


def processors(transformer) -> dict:
    # `attn_processors` is missing on diffusers 0.32's LTX transformer (no AttentionMixin yet)
    return {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}


def test_ltx_restored_after_exception(tiny_ltx_path):
    pipe = load(tiny_ltx_path)
    cls = type(pipe)
    before = processors(pipe.transformer)

    def explode(pipe, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("boom")
        return kwargs

    guard = scfg.enable(pipe)
    with pytest.raises(RuntimeError, match="boom"), guard:
        run(pipe, "a red cat", callback_on_step_end=explode)
    assert type(pipe) is cls and not guard.recording
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())
    after = processors(pipe.transformer)
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())


def test_ltx_image_to_video_guides_the_generated_frames_only(tiny_ltx_path):
    """LTXImageToVideoPipeline shares the transformer call: the conditioning frame (timestep 0, its prediction
    dropped by the pipeline) owns no region; the generated frames are guided, and rate 1 is the stock pipeline."""
    pipe = image_to_video(load(tiny_ltx_path, torch.float64))
    image = condition_image()
    plain = run(pipe, "a red cat", image=image)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        guided = run(pipe, "a red cat", image=image)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        forced = run(pipe, "a red cat", image=image)
    assert [r.step for r in recorder.steps] == [0, 1, 2]
    report = recorder.steps[0]
    assert report.token_masks.shape == (1, TEXT, GRID[0] - 1, *GRID[1:])
    assert report.token_masks.any(dim=1).all()
    # the conditioning frame's latents stay the encoded image; the generated frames change
    assert torch.equal(guided[:, :PER_FRAME], plain[:, :PER_FRAME])
    assert not torch.allclose(guided[:, PER_FRAME:], plain[:, PER_FRAME:])
    # the bound of test_ltx_unit_rate_equals_plain_cfg, for the same reasons
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))
