"""S-CFG on stock Wan pipelines: two separate transformer passes per step (cond, then uncond), 5-D video latents
on a (frames, height, width) token grid, spatio-temporal self-attention with RoPE, UMT5 text zero-padded to the
text length with no attention mask, Wan 2.2's two experts with a scale each, and Wan 2.1 image-to-video (CLIP image
tokens in front of the text, in their own softmax). Built from configs offline (tests/tiny_wan.py)."""

from __future__ import annotations

import functools
import types

import pytest
import torch

transformer_wan = pytest.importorskip(
    "diffusers.models.transformers.transformer_wan", reason="Wan pipelines need diffusers >= 0.33"
)
if not hasattr(transformer_wan, "WanAttention"):
    pytest.skip("the Wan family mirrors `WanAttention` (diffusers >= 0.35)", allow_module_level=True)

from checks import assert_restored_after_exception  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from tiny_wan import FRAMES, HEIGHT, LATENT, TOKENS, WIDTH, build_tiny_wan, tiny_transformer  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig, SCFGError  # noqa: E402
from scfg.attention import pooled_grid  # noqa: E402
from scfg.capture import AttentionCapture  # noqa: E402
from scfg.engine import CFGLayout, MapAccumulator, step_regions  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.wan import FAMILY, wan_qk  # noqa: E402

MASKS = pooled_grid(TOKENS, 2)  # the token grid pooled 2x2 per frame (`mask_pool=2`, the family default)

TEXT = 16  # max_sequence_length of the text-to-video tests: 16 UMT5 positions, zero-padded after the prompt
KW = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3, output_type="latent")
PROMPTS = ["a red cat", "two blue dogs on the sofa"]
NEGATIVE = "blurry, static"  # another length than either prompt
UNIT_RATE = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)


@pytest.fixture(scope="session")
def tiny_wan_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-wan")
    build_tiny_wan(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_wan22_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-wan22")
    build_tiny_wan(str(folder), two_experts=True)
    return folder


@pytest.fixture(scope="session")
def tiny_wan_i2v_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-wan-i2v")
    build_tiny_wan(str(folder), image_to_video=True)
    return folder


def load(path, dtype=torch.float32):
    pipe = DiffusionPipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, negative=NEGATIVE, seed=0, **kwargs):
    return pipe(
        prompt,
        negative_prompt=negative,
        generator=torch.Generator().manual_seed(seed),
        **{"max_sequence_length": TEXT, **KW, **kwargs},
    ).frames


def real_lengths(report) -> list[int]:
    """Real tokens (words and `</s>`) of each sample of a step report: the positions before the padding."""
    return [tokens.index("</s>") + 1 for tokens in report.tokens]


def assert_padding_owns_nothing(token_masks: torch.Tensor, lengths: list[int]) -> None:
    for sample, length in enumerate(lengths):
        assert not token_masks[sample, length:].any()
        assert token_masks[sample, :length].any(dim=0).all()  # every cell belongs to a real token


def test_tiny_wan_loads_offline_and_decodes_a_clip(tiny_wan_path):
    pipe = load(tiny_wan_path)
    assert type(pipe).__name__ == "WanPipeline" and family_for(pipe).name == "wan"
    latents = run(pipe, "a red cat")
    # AutoencoderKLWan compresses time by 4, (F - 1) // 4 + 1 latent frames, and space by 8
    assert pipe.vae.config.scale_factor_temporal == 4 and tuple(latents.shape) == (1, 16, *LATENT)
    video = run(pipe, "a red cat", output_type="np", num_inference_steps=1)
    assert video.shape == (1, FRAMES, HEIGHT, WIDTH, 3)


def test_wan_masks_are_per_sample_on_the_video_token_grid(tiny_wan_path):
    pipe = load(tiny_wan_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder) as guard:
        assert guard.config.foreground_source == "cond"  # the family's preset
        ours = run(pipe, PROMPTS)
    plain = run(pipe, PROMPTS)
    assert [r.step for r in recorder.steps] == [0, 1, 2]
    report = recorder.steps[0]
    # masks [B, T, f, h, w] on the token grid (latent / patch), the rate on the latent grid the rule runs on
    assert report.token_masks.shape == (2, TEXT, *MASKS) and report.rate_map.shape == (2, 1, *LATENT)
    assert report.guidance_scale == 5.0  # WanPipeline's default
    assert_padding_owns_nothing(report.token_masks, real_lengths(report))
    assert not torch.equal(report.token_masks[0], report.token_masks[1])
    assert torch.isfinite(ours).all() and not torch.allclose(ours, plain)


def test_wan_prompt_embeds_two_prompts_two_videos_each(tiny_wan_path):
    """2 prompts x 2 videos through `prompt_embeds`: the padding is read from the embeddings' zero rows (no
    prompt to tokenise), and each of the 4 samples gets its own masks."""
    pipe = load(tiny_wan_path)
    embeds, negative = pipe.encode_prompt(
        PROMPTS, NEGATIVE, num_videos_per_prompt=2, max_sequence_length=TEXT, device="cpu"
    )
    lengths = embeds.ne(0).any(dim=-1).sum(dim=1).tolist()
    assert lengths[0] == lengths[1] < lengths[2] == lengths[3] < TEXT
    recorder = scfg.Recorder()
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0))
    with scfg.enable(pipe, on_step=recorder):
        pipe(**kwargs, **KW)
    report = recorder.steps[-1]
    assert report.token_masks.shape == (4, TEXT, *MASKS) and report.tokens is None
    assert_padding_owns_nothing(report.token_masks, lengths)
    assert not torch.equal(report.token_masks[0], report.token_masks[2])  # another prompt, other regions


def test_wan_text_prompts_two_videos_each(tiny_wan_path):
    pipe = load(tiny_wan_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        run(pipe, PROMPTS, num_videos_per_prompt=2)
    assert recorder.steps and recorder.steps[0].token_masks.shape == (4, TEXT, *MASKS)


def test_wan_unit_rate_equals_stock_cfg(tiny_wan_path):
    pipe = load(tiny_wan_path, torch.float64)
    plain = run(pipe, PROMPTS)
    with scfg.enable(pipe, UNIT_RATE):
        ours = run(pipe, PROMPTS)
    # rate exactly 1 (smoothed by weights summing to 1 within 2 ulps): the rewritten uncond pass reproduces the
    # model's own up to a few float64 roundings, which the line multiplies by the scale (5), over 3 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_wan_without_cfg_is_left_alone_and_disabled_is_stock(tiny_wan_path):
    pipe = load(tiny_wan_path)
    stock_no_cfg = run(pipe, "a red cat", guidance_scale=1.0)
    stock_cfg = run(pipe, "a red cat")
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        no_cfg = run(pipe, "a red cat", guidance_scale=1.0)  # one pass per step: nothing to guide
        assert recorder.steps == []
        run(pipe, "a red cat")
    assert torch.equal(no_cfg, stock_no_cfg)
    assert torch.equal(run(pipe, "a red cat"), stock_cfg)  # after the block: the stock pipeline, bit for bit


def test_wan_restored_after_exception(tiny_wan_path):
    pipe = load(tiny_wan_path)
    assert_restored_after_exception(pipe, lambda callback: run(pipe, "a red cat", callback_on_step_end=callback))


def test_wan22_hooks_both_experts_each_with_its_own_scale(tiny_wan22_path):
    """Wan 2.2 A14B's loop: `transformer` while t >= boundary_ratio * 1000 at `guidance_scale`, `transformer_2`
    below at `guidance_scale_2`. With the tiny schedule (t = 1000, 858, 602, 9; boundary 700) that is 2 + 2 steps."""
    pipe = load(tiny_wan22_path)
    ran: list[str] = []

    def note(name, module, args):
        ran.append(name)

    handles = [
        getattr(pipe, name).register_forward_pre_hook(functools.partial(note, name))
        for name in ("transformer", "transformer_2")
    ]
    recorder = scfg.Recorder()
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=2.0)
    try:
        with scfg.enable(pipe, on_step=recorder) as guard:
            assert set(guard.denoisers) == {"transformer", "transformer_2"}
            assert pipe.transformer._forward_pre_hooks and pipe.transformer_2._forward_pre_hooks
            run(pipe, "a red cat", **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["transformer"] * 4 + ["transformer_2"] * 4  # cond, uncond per step
    assert [(r.step, r.guidance_scale) for r in recorder.steps] == [(0, 5.0), (1, 5.0), (2, 2.0), (3, 2.0)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer_2.modules())

    recorder.clear()
    with scfg.enable(pipe, on_step=recorder):
        run(pipe, "a red cat", **{**kwargs, "guidance_scale_2": 1.0})  # the low-noise line is its cond alone
    assert [r.step for r in recorder.steps] == [0, 1]


def test_wan22_constant_rate_scales_each_experts_own_line(tiny_wan22_path):
    """A rate held at 2 everywhere is stock CFG at twice each expert's scale (10 for `transformer`, 4 for
    `transformer_2`) only if each expert's passes are rewritten for that expert's own line. (A rate of 1 cannot
    tell: its target lies on every line through the two predictions.)"""
    pipe = load(tiny_wan22_path, torch.float64)
    plain = run(pipe, PROMPTS, num_inference_steps=4, guidance_scale=10.0, guidance_scale_2=4.0)
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(2.0, 2.0), max_effective_scale=None)):
        ours = run(pipe, PROMPTS, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=2.0)
    # the rate map is 2 within 2 ulps after smoothing; the rewritten uncond carries a few float64 roundings times
    # the scale through the line, over 4 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def text_with_padding(generator, lengths, width=32, tokens=9, dtype=torch.float64):
    """UMT5-like states `[B, tokens, width]`, zero after each sample's `lengths` real tokens (the pipeline's
    padding)."""
    text = torch.randn(len(lengths), tokens, width, generator=generator, dtype=dtype)
    for sample, length in enumerate(lengths):
        text[sample, length:] = 0
    return text


def capture_pair(transformer, kwargs, block=1):
    """Run `transformer(**kwargs)` with the family's capture on block `block`'s pair; return the pair's layers,
    the pass context and the layers' inputs."""
    pair = next(p for p in FAMILY.layer_pairs(transformer) if p.cross == f"blocks.{block}.attn2")
    inputs = {}

    def keep(name, module, args, kwargs):
        inputs[name] = args  # WanTransformerBlock calls its attention layers positionally

    handles = [
        transformer.get_submodule(name).register_forward_pre_hook(functools.partial(keep, name), with_kwargs=True)
        for name in (pair.cross, pair.self_attn)
    ]
    context = FAMILY.pass_context(transformer, (), kwargs)
    try:
        with AttentionCapture(transformer, [pair.cross, pair.self_attn], FAMILY.attention, FAMILY.projections) as cap:
            cap.begin(context.grid, context=context)
            with torch.no_grad():
                transformer(**kwargs)
            layers = cap.finish().layers
    finally:
        for handle in handles:
            handle.remove()
    return pair, layers, context, inputs


def test_wan_maps_equal_a_float64_reference():
    """The family's cross and self maps of one block against softmax(q kᵀ / sqrt(d)) averaged over heads, formed by
    hand in float64 from the mirror's q/k, with the padding columns zeroed by hand."""
    transformer = tiny_transformer().to(torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [4, 7]
    kwargs = dict(
        hidden_states=torch.randn(2, 16, *LATENT, generator=g, dtype=torch.float64),
        timestep=torch.tensor([500.0, 500.0], dtype=torch.float64),
        encoder_hidden_states=text_with_padding(g, lengths),
        return_dict=False,
    )
    pair, layers, context, inputs = capture_pair(transformer, kwargs)
    assert context.grid == LATENT and context.extra["text_valid"].sum(dim=1).tolist() == lengths
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)

    def head_mean(layer):
        attn = transformer.get_submodule(layer)
        hidden_states, encoder_hidden_states, _, rotary_emb = inputs[layer]
        q, k = wan_qk(attn, hidden_states, encoder_hidden_states, rotary_emb)
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)

    real = torch.zeros(2, 1, 9, dtype=torch.float64)
    for sample, length in enumerate(lengths):
        real[sample, :, :length] = 1
    # float64 on both sides over the same q and k (the drift test pins q/k to the processor's own): reordered sums
    # over at most 60 keys and a 2-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, head_mean(pair.cross) * real, **tol)
    torch.testing.assert_close(self_rows.dense(), head_mean(pair.self_attn), **tol)
    queries = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    assert cross.shape == (2, queries, 9) and self_rows.shape == (2, queries, queries)
    reference, valid = FAMILY.token_roles(cross)
    assert reference.tolist() == [3, 6] and valid.sum(dim=1).tolist() == lengths  # `</s>`, the last real token


def spy_attention(monkeypatch) -> list:
    """Record every (query, key, kwargs) `WanAttnProcessor` passes to `dispatch_attention_fn`."""
    seen = []
    dispatch = transformer_wan.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        seen.append((query, key, kwargs))
        return dispatch(query, key, value, **kwargs)

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", spy)
    return seen


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_wan_qk_is_what_the_attention_receives(fused, monkeypatch):
    """Drift test: the query and key the family hands to the engine (from the processor's recorded projections) are
    the very numbers the processor passes to its attention function, in self- and cross-attention, float32."""
    transformer = tiny_transformer().eval()
    if fused:
        transformer.fuse_qkv_projections()
        assert transformer.blocks[1].attn1.fused_projections
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(2, 16, *LATENT, generator=g),
        timestep=torch.tensor([700.0, 700.0]),
        encoder_hidden_states=text_with_padding(g, [4, 7], dtype=torch.float32),
        return_dict=False,
    )
    projected = []

    def count(module, args, output):
        projected.append(module)

    counter = transformer.blocks[1].attn1.to_q.register_forward_hook(count)
    seen = spy_attention(monkeypatch)
    pair, layers, _, _ = capture_pair(transformer, kwargs)
    counter.remove()
    assert len(seen) == 2 * len(transformer.blocks)  # one attention call per layer, attn1 then attn2
    for layer, (query, key, options) in ((pair.self_attn, seen[2]), (pair.cross, seen[3])):
        rows = layers[layer]
        assert torch.equal(rows.query, query.transpose(1, 2)) and torch.equal(rows.key, key.transpose(1, 2))
        assert options.get("attn_mask") is None and options.get("scale") is None  # SDPA's default scale
        assert rows.scale == query.shape[-1] ** -0.5
    assert len(projected) == (0 if fused else 1)  # the processor's own projection, not computed again


def test_wan_i2v_qk_is_the_text_attention_and_image_keys_are_left_out(tiny_wan_i2v_path, monkeypatch):
    """Wan 2.1 I2V: `attn2` runs the image keys' softmax first, then the text's (the last 512 positions); the
    family's cross map is the text one alone."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(str(tiny_wan_i2v_path), subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(1, 36, *LATENT, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=text_with_padding(g, [5], tokens=512, dtype=torch.float32),
        encoder_hidden_states_image=torch.randn(1, 17, 8, generator=g),
        return_dict=False,
    )
    seen = spy_attention(monkeypatch)
    pair, layers, context, _ = capture_pair(transformer, kwargs)
    assert len(seen) == 3 * len(transformer.blocks)  # attn1; attn2's image softmax, then its text softmax
    _, image_key, _ = seen[4]
    query, key, _ = seen[5]
    assert image_key.shape[1] == 17 and key.shape[1] == 512
    rows = layers[pair.cross]
    assert torch.equal(rows.query, query.transpose(1, 2)) and torch.equal(rows.key, key.transpose(1, 2))
    cross, _ = FAMILY.layer_attention(pair, layers, context)
    assert cross.shape[2] == 512 and cross[:, :, 5:].eq(0).all() and cross[:, :, :5].gt(0).all()


def test_wan_i2v_pipeline_is_guided_on_its_text_tokens(tiny_wan_i2v_path, monkeypatch):
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v_module
    from PIL import Image

    # diffusers' pipeline_wan_i2v calls `ftfy.fix_text` without checking that ftfy is installed (pipeline_wan does
    # check): stand in for it with the identity, which is what ftfy does to these ASCII prompts

    def fix_text(text):
        return text

    monkeypatch.setattr(i2v_module, "ftfy", types.SimpleNamespace(fix_text=fix_text), raising=False)
    pipe = load(tiny_wan_i2v_path, torch.float64)
    image = Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 30))
    kwargs = {**KW, "negative_prompt": NEGATIVE, "num_inference_steps": 2}  # 512 text positions: I2V's own

    def call():
        return pipe(image, "a red cat", generator=torch.Generator().manual_seed(0), **kwargs).frames

    plain = call()
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        ours = call()
    with scfg.enable(pipe, UNIT_RATE):
        unit = call()
    report = recorder.steps[0]
    assert [r.step for r in recorder.steps] == [0, 1]
    assert report.token_masks.shape == (1, 512, *MASKS)  # the text alone: no image token owns a region
    assert_padding_owns_nothing(report.token_masks, real_lengths(report))
    assert not torch.allclose(ours, plain)
    torch.testing.assert_close(unit, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_identical_frames_with_block_diagonal_self_attention_segment_every_frame_alike():
    """docs/algorithm.md section 8 on Wan-shaped maps (a `(3, 3, 5)` token grid, text padded with zero columns):
    with a self-attention that does not couple frames, a clip of identical frames gets the same regions in every
    frame, and those are the single frame's own."""
    g = torch.Generator().manual_seed(0)
    frames, h, w, text, real = 3, 3, 5, 8, 5
    # float64: the clip's products run over zero blocks too, so their float32 roundings could differ from the
    # frame's by an ulp and flip a near tie
    frame_cross = torch.rand(2, h * w, text, generator=g, dtype=torch.float64) ** 4
    frame_cross[:, :, real:] = 0  # padding columns, as `layer_attention` leaves them
    frame_self = (4 * torch.rand(2, h * w, h * w, generator=g, dtype=torch.float64)).softmax(-1)
    cross = frame_cross.repeat(1, frames, 1)
    self_attention = torch.block_diag(*[frame_self[0]] * frames), torch.block_diag(*[frame_self[1]] * frames)
    self_attention = torch.stack(self_attention)

    def regions(cross, self_attention, grid):
        maps = {}
        for role in ("cond", "uncond"):
            accumulator = MapAccumulator(grid, token_roles=FAMILY.token_roles)
            accumulator.add(cross, self_attention, grid)
            maps[role] = accumulator.result()
        return step_regions(maps, foreground_source="cond")

    clip = regions(cross, self_attention, (frames, h, w))
    single = regions(frame_cross, frame_self, (h, w))
    assert clip.token_masks.shape == (2, text, frames, h, w)
    for f in range(frames):
        assert torch.equal(clip.token_masks[:, :, f], single.token_masks)
        assert torch.equal(clip.foreground[:, :, f], single.foreground)
    assert not clip.token_masks[:, real:].any() and clip.token_masks.any(dim=1).all()


class Wrapper:
    """A processor S-CFG does not know (another library's wrapper): the mirror cannot vouch for its maths."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, *args, **kwargs):
        return self.inner(attn, *args, **kwargs)


def test_wan_refuses_an_unknown_processor(tiny_wan_path):
    pipe = load(tiny_wan_path)
    attn = pipe.transformer.blocks[1].attn1
    attn.set_processor(Wrapper(attn.processor))
    with pytest.raises(SCFGError, match=r"WanAttnProcessor.*Wrapper"):
        scfg.enable(pipe)


def test_wan_cfg_layout_reads_each_experts_scale():
    """`cfg_layout` as data: the call's `guidance_scale_2` (defaulting to `guidance_scale`, as the pipeline does)
    is the second expert's scale; `guidance_scale` the first's."""
    pipe = types.SimpleNamespace(do_classifier_free_guidance=True, guidance_scale=5.0)
    high = FAMILY.cfg_layout(pipe, {"guidance_scale_2": 3.0}, "transformer")
    low = FAMILY.cfg_layout(pipe, {"guidance_scale_2": 3.0}, "transformer_2")
    assert high == CFGLayout("separate", ("cond", "uncond"), "uncond", 5.0)
    assert low == CFGLayout("separate", ("cond", "uncond"), "uncond", 3.0)
    assert FAMILY.cfg_layout(pipe, {"guidance_scale_2": None}, "transformer_2").scale == 5.0  # the default
    assert FAMILY.cfg_layout(pipe, {"guidance_scale_2": 1.0}, "transformer_2") is None
    pipe.do_classifier_free_guidance = False  # guidance_scale <= 1: no negative pass at all
    assert FAMILY.cfg_layout(pipe, {}, "transformer") is None


def test_cli_writes_videos_with_their_parameters(tiny_wan_path, tmp_path):
    """`scfg generate --frames` writes an MP4 whose tags carry the parameters; `compare --frames --show-regions`
    writes the side-by-side clip and the per-frame region/rate clip beside it."""
    import json

    pytest.importorskip("av")
    from scfg.cli import main
    from scfg.video import read_video_metadata

    common = ["a red cat", "--model", str(tiny_wan_path), "--steps", "2", "--frames", str(FRAMES)]
    common += ["--height", str(HEIGHT), "--width", str(WIDTH), "--scale", "5"]
    clip = tmp_path / "clip.mp4"
    assert main(["generate", *common, "--out", str(clip)]) == 0
    meta = read_video_metadata(clip)
    assert json.loads(meta["scfg"])["guidance"] == "scfg" and meta["parameters"].startswith("a red cat")
    assert main(["generate", *common, "--out", str(clip)]) == 2  # never overwritten without --overwrite
    panel = tmp_path / "cmp.mp4"
    assert main(["compare", *common, "--out", str(panel), "--show-regions"]) == 0
    import av

    def decoded(path):
        with av.open(str(path)) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]

    frames = decoded(panel)
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, 3 * WIDTH, 3)  # CFG | S-CFG | regions
    regions = decoded(tmp_path / "cmp-regions.mp4")
    assert len(regions) == FRAMES and regions[0].shape == (HEIGHT, 2 * WIDTH, 3)  # region map | rate map
    assert main(["generate", "a red cat", "--model", str(tiny_wan_path), "--out", str(tmp_path / "x.mp4")]) == 2
