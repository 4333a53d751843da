"""S-CFG on a stock Flux2KleinPipeline (an undistilled "base" klein): two separate transformer passes per step
(cond, then the empty prompt) on `guidance_scale`, 2x2-patchified latents packed into tokens with 4-axis RoPE ids,
Qwen3 chat-templated text with no mask, reference-image tokens after the generated ones. Drift tests pin the
mirror (`scfg.families.flux2_attention`) to both FLUX.2 processors, fused and unfused. Built from configs offline
(tests/tiny_flux2.py)."""

from __future__ import annotations

import types

import pytest
import torch

transformer_flux2 = pytest.importorskip(
    "diffusers.models.transformers.transformer_flux2", reason="FLUX.2 pipelines need diffusers >= 0.36"
)
pytest.importorskip(
    "transformers.models.qwen3", reason="FLUX.2 [klein]'s text encoder is Qwen3 (transformers >= 4.51)"
)
if not hasattr(pytest.importorskip("diffusers"), "Flux2KleinPipeline"):
    pytest.skip("FLUX.2 [klein] pipelines need diffusers >= 0.37", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from checks import assert_restored_after_exception  # noqa: E402
from diffusers import DiffusionPipeline, Flux2KleinPipeline  # noqa: E402
from tiny_flux2 import GRID, HEIGHT, QWEN_WIDTH, WIDTH, build_tiny_flux2_klein, tiny_transformer  # noqa: E402

import scfg  # noqa: E402
from scfg import SCFGConfig, SCFGError  # noqa: E402
from scfg.attention import pooled_grid  # noqa: E402
from scfg.capture import AttentionCapture, LayerCall  # noqa: E402
from scfg.engine import CFGLayout  # noqa: E402
from scfg.families import LayerPair, family_for  # noqa: E402
from scfg.families.flux2 import FAMILY  # noqa: E402
from scfg.families.flux2_attention import SUPPORTED_PROCESSORS, flux2_qkv, flux2_scale  # noqa: E402

MASKS = pooled_grid(GRID, 2)  # the token grid pooled 2x2 (`mask_pool=2`, the family default)

TEXT = 32  # max_sequence_length of the tests: the chat template (12 tokens), the prompt, then padding
KW = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, output_type="latent", max_sequence_length=TEXT)
PROMPTS = ["a red cat", "two blue dogs on the sofa"]
UNIT_RATE = SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)
TOKENS = GRID[0] * GRID[1]
DOUBLE, SINGLE = "transformer_blocks.1.attn", "single_transformer_blocks.0.attn"


@pytest.fixture(scope="session")
def tiny_klein_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux2-klein")
    build_tiny_flux2_klein(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = Flux2KleinPipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, seed=0, **kwargs):
    # Flux2KleinPipeline's first parameter is `image`: the prompt goes by keyword
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**KW, **kwargs}).images


def test_tiny_klein_loads_offline_and_decodes(tiny_klein_path):
    pipe = DiffusionPipeline.from_pretrained(str(tiny_klein_path))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "Flux2KleinPipeline" and family_for(pipe).name == "flux2_klein"
    assert not pipe.config.is_distilled
    image = run(pipe, "a red cat", output_type="pil", num_inference_steps=1)[0]
    assert image.size == (WIDTH, HEIGHT)  # PIL: (width, height)


def test_klein_masks_are_per_sample_with_a_negative_of_another_length(tiny_klein_path):
    """2 prompts x 2 images, the negative prompt's embeddings another text length (16 positions, the prompts'
    32): each sample gets its own masks on the 8x12 token grid, and the batch gives what each sample gives alone
    (float64), so no mask or rate leaks between samples."""
    pipe = load(tiny_klein_path, torch.float64)
    negative, _ = pipe.encode_prompt("blurry", max_sequence_length=16)
    recorder = scfg.Recorder()
    guard = scfg.enable(pipe, on_step=recorder)
    assert guard.config.foreground_source == "uncond"  # no preset difference
    assert [p.cross for p in guard.pairs] == [f"transformer_blocks.{i}.attn" for i in (1, 2, 3)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    with guard:
        batched = pipe(
            prompt=PROMPTS,
            negative_prompt_embeds=negative.repeat(2, 1, 1),
            num_images_per_prompt=2,
            generator=gens,
            **KW,
        ).images
        steps = list(recorder.steps)
        singles = [run(pipe, PROMPTS[i // 2], seed=i, negative_prompt_embeds=negative) for i in range(4)]
    plain = run(pipe, PROMPTS[0], negative_prompt_embeds=negative)
    assert [r.step for r in steps] == [0, 1, 2]  # the pipeline passes t / 1000: matched back to the schedule
    report = steps[0]
    assert report.token_masks.shape == (4, TEXT, *MASKS) and report.rate_map.shape == (4, 1, *GRID)
    assert report.guidance_scale == 4.0  # Flux2KleinPipeline's default
    assert report.tokens[0][:3] == ["<|im_start|>", "user", "Ċ"] and report.tokens[0][-1] == "<|endoftext|>"
    assert report.token_masks.any(dim=1).all()  # every cell belongs to some region
    assert not torch.equal(report.token_masks[0], report.token_masks[2])
    # float64: batched and single matmuls round differently by ~1e-16 relative per operation; through 3 steps of
    # the tiny transformer the latents (order 1) differ by ~1e-14, so 1e-9 is loose by orders of magnitude, while
    # a mask or rate taken from another sample moves them by far more than 1e-3
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(singles[0], plain)


def test_klein_unit_rate_equals_stock_cfg(tiny_klein_path):
    pipe = load(tiny_klein_path, torch.float64)
    plain = run(pipe, PROMPTS)
    with scfg.enable(pipe, UNIT_RATE):
        ours = run(pipe, PROMPTS)
    # rate exactly 1 (smoothed by weights summing to 1 within 2 ulps): the rewritten uncond pass reproduces the
    # model's own up to a few float64 roundings, which the line multiplies by the scale (4), over 3 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_klein_with_a_reference_image_guides_the_generated_tokens_only(tiny_klein_path):
    """`image=`: the reference image's tokens (t = 10) follow the generated ones in the transformer's input and
    output; they are keys only, own no region, and pass through. With the rate at 1 the result is stock CFG."""
    from PIL import Image

    pipe = load(tiny_klein_path, torch.float64)
    reference = Image.new("RGB", (64, 64), (200, 30, 30))  # the pipeline needs 64 px a side: 256 tokens
    plain = run(pipe, "a red cat", image=reference)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        ours = run(pipe, "a red cat", image=reference)
    with scfg.enable(pipe, UNIT_RATE):
        unit = run(pipe, "a red cat", image=reference)
    assert recorder.steps[0].token_masks.shape == (1, TEXT, *MASKS)
    assert not torch.allclose(ours, plain)
    torch.testing.assert_close(unit, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_klein_without_cfg_is_left_alone_and_disabled_is_stock(tiny_klein_path):
    pipe = load(tiny_klein_path)
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
    pipe.register_to_config(is_distilled=True)  # a step-wise distilled klein ignores `guidance_scale`
    recorder.clear()
    with scfg.enable(pipe, on_step=recorder):
        run(pipe, "a red cat")
    assert recorder.steps == []


def test_klein_restored_after_exception(tiny_klein_path):
    pipe = load(tiny_klein_path)
    assert_restored_after_exception(pipe, lambda callback: run(pipe, "a red cat", callback_on_step_end=callback))


def test_klein_cfg_layout_guidance_arguments_and_pipelines_without_cfg(tiny_klein_path):
    """CFG is `guidance_scale` against the empty prompt; FLUX.2 [dev]'s pipeline, which runs none, is refused."""
    from diffusers import Flux2Pipeline

    holder = types.SimpleNamespace(do_classifier_free_guidance=True, guidance_scale=3.0, transformer=None)
    assert FAMILY.cfg_layout(holder, {}, "transformer") == CFGLayout("separate", ("cond", "uncond"), "uncond", 3.0)
    holder.do_classifier_free_guidance = False
    assert FAMILY.cfg_layout(holder, {}, "transformer") is None
    pipe = load(tiny_klein_path)
    assert scfg.guidance_arguments(pipe, 4.0) == {"guidance_scale": 4.0}
    with pytest.raises(SCFGError, match="negative_prompt_embeds"):
        scfg.guidance_arguments(pipe, 4.0, "ugly")
    dev = Flux2Pipeline.__new__(Flux2Pipeline)  # the class is what matters: no Mistral text encoder to build
    dev.__dict__["transformer"] = pipe.transformer
    with pytest.raises(SCFGError, match=r"supported model family.*but got Flux2Pipeline"):
        family_for(dev)


def transformer_inputs(transformer, batch=2, reference_tokens=0, dtype=torch.float64):
    """Inputs of one denoiser call as Flux2KleinPipeline makes them: packed latents (and a reference image's tokens
    after them, t = 10), Qwen3 states, positions `(t, h, w, l)`."""
    g = torch.Generator().manual_seed(0)
    h, w = GRID
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    if reference_tokens:
        rh, rw = 4, reference_tokens // 4
        ref = torch.cartesian_prod(torch.tensor([10]), torch.arange(rh), torch.arange(rw), torch.arange(1))
        ids = torch.cat([ids, ref])
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT))
    return dict(
        hidden_states=torch.randn(batch, TOKENS + reference_tokens, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, TEXT, 3 * QWEN_WIDTH, generator=g, dtype=dtype),
        timestep=torch.full((batch,), 0.6, dtype=dtype),
        img_ids=ids[None].expand(batch, -1, -1),
        txt_ids=text_ids[None].expand(batch, -1, -1),
        guidance=None,
        return_dict=False,
    )


def capture(transformer, kwargs, layer):
    """Run `transformer(**kwargs)` with the family's capture on `layer`; return its `AttentionRows`, the pass
    context, the layer's inputs (by name) and its output."""
    record = {}

    def before(module, args, kw):
        record["inputs"] = kw  # the FLUX.2 blocks call their attention by keyword

    def after(module, args, output):
        record["output"] = output

    attn = transformer.get_submodule(layer)
    handles = [attn.register_forward_pre_hook(before, with_kwargs=True), attn.register_forward_hook(after)]
    context = FAMILY.pass_context(transformer, (), kwargs)
    try:
        with AttentionCapture(transformer, [layer], FAMILY.attention, FAMILY.projections) as cap:
            cap.begin(context.grid, context=context)
            with torch.no_grad():
                transformer(**kwargs)
            layers = cap.finish().layers
    finally:
        for handle in handles:
            handle.remove()
    return layers, context, record


@pytest.mark.parametrize("layer", [DOUBLE, SINGLE])
def test_klein_maps_equal_a_float64_reference(layer):
    """The family's maps of one layer against softmax(q kᵀ / sqrt(d)) of the generated tokens' queries over
    `[text; generated; reference]` keys, formed by hand in float64 from the mirror's q/k: the text block and the
    generated block, each renormalised; the reference image's keys are in neither."""
    transformer = tiny_transformer().to(torch.float64).eval()
    layers, context, record = capture(transformer, transformer_inputs(transformer, reference_tokens=24), layer)
    assert context.grid == GRID and context.extra == {"text_len": TEXT, "image_tokens": TOKENS}
    cross, self_rows = FAMILY.layer_attention(LayerPair(layer, layer, 1), layers, context)
    inputs = record["inputs"]
    attn = transformer.get_submodule(layer)
    q, k, _ = flux2_qkv(attn, inputs["hidden_states"], inputs.get("encoder_hidden_states"), inputs["image_rotary_emb"])
    assert k.shape[2] == TEXT + TOKENS + 24
    probs = (q[:, :, TEXT : TEXT + TOKENS] @ k.transpose(-1, -2) * flux2_scale(attn)).softmax(-1).mean(1)
    text, image = probs[..., :TEXT], probs[..., TEXT : TEXT + TOKENS]
    # float64 on both sides over the same q and k (the drift tests pin q/k to the processor's own): the softmaxes
    # differ by reordered sums over 152 keys and a 2-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(self_rows.dense(), image / image.sum(-1, keepdim=True), **tol)
    assert cross.shape == (2, TOKENS, TEXT) and self_rows.shape == (2, TOKENS, TOKENS)
    assert FAMILY.token_roles(cross) == (None, None)  # token 0 (`<|im_start|>`) is the reference; nothing masked


def projection_names(attn) -> tuple[str, ...]:
    """The Linear modules the processor calls on this layer (what the capture's hooks must watch)."""
    if getattr(attn, "to_qkv_mlp_proj", None) is not None:
        return ("to_qkv_mlp_proj",)
    if attn.fused_projections:
        return ("to_qkv", "to_added_qkv")
    return ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def rebuild_output(attn, query, key, value, inputs):
    """Finish the processor's call from the mirror's `[B, heads, N, d]` q/k/v: attention, heads flattened, then
    the double-stream block's two output projections, or the single-stream block's MLP half and fused output."""
    out = F.scaled_dot_product_attention(query, key, value, scale=flux2_scale(attn)).transpose(1, 2).flatten(2)
    encoder_hidden_states = inputs.get("encoder_hidden_states")
    if encoder_hidden_states is None:
        projected = attn.to_qkv_mlp_proj(inputs["hidden_states"])
        mlp = attn.mlp_act_fn(projected[..., 3 * attn.inner_dim :])
        return attn.to_out(torch.cat([out, mlp], dim=-1))
    text_len = encoder_hidden_states.shape[1]
    text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], 1)
    return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("layer", [DOUBLE, SINGLE])
def test_flux2_qkv_is_what_the_attention_receives(layer, fused, monkeypatch):
    """Drift test, float32: the mirror's query, key and value are the very numbers the processor passes to
    `dispatch_attention_fn` (the family's rows from the processor's recorded projections, not recomputed); the
    layer's output, rebuilt from them, is the layer's own."""
    transformer = tiny_transformer().eval()
    if fused:
        transformer.fuse_qkv_projections()
    attn = transformer.get_submodule(layer)
    names = projection_names(attn)
    assert (names[0] == "to_qkv") == (fused and layer == DOUBLE)  # the fused path is the one the processor takes
    calls = []

    def count(module, args, output):
        calls.append(module)

    counters = [getattr(attn, name).register_forward_hook(count) for name in names]
    seen = []
    dispatch = transformer_flux2.dispatch_attention_fn

    def spy(query, key, value, **options):
        seen.append((query, key, value, options))
        return dispatch(query, key, value, **options)

    monkeypatch.setattr(transformer_flux2, "dispatch_attention_fn", spy)
    try:
        layers, _, record = capture(transformer, transformer_inputs(transformer, dtype=torch.float32), layer)
    finally:
        for handle in counters:
            handle.remove()
    assert len(calls) == len(names)  # each projection once: the processor's own, reused by the family
    assert len(seen) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    index = 1 if layer == DOUBLE else len(transformer.transformer_blocks)
    query, key, value, options = seen[index]
    assert options.get("attn_mask") is None and options.get("scale") is None  # no mask, SDPA's default scale
    inputs = record["inputs"]
    mirrored = flux2_qkv(
        attn, inputs["hidden_states"], inputs.get("encoder_hidden_states"), inputs["image_rotary_emb"], with_value=True
    )
    for mine, theirs in zip(mirrored, (query, key, value), strict=True):
        assert torch.equal(mine, theirs.transpose(1, 2))
    rows = layers[layer]
    assert torch.equal(rows.query, mirrored[0][:, :, TEXT:]) and torch.equal(rows.key, mirrored[1])
    assert rows.scale == flux2_scale(attn) == attn.head_dim**-0.5
    rebuilt = rebuild_output(attn, *mirrored, inputs)
    output = record["output"]
    # bit-identical q, k, v (above); SDPA on our contiguous tensors may block its sums differently from the
    # processor's permuted views: reordered float32 sums of 128 O(1) products, ~1e-7 (0 on torch 2.13 CPU); a
    # missing norm, a wrong split, scale or text order moves these sharpened layers' outputs by 1e-2 or more
    rebuilt, output = (x if isinstance(x, tuple) else (x,) for x in (rebuilt, output))
    for mine, theirs in zip(rebuilt, output, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_flux2_qkv_refuses_unknown_processors_and_mismatched_inputs():
    transformer = tiny_transformer().eval()
    double, single = transformer.get_submodule(DOUBLE), transformer.get_submodule(SINGLE)
    hidden, text = torch.randn(1, 6, 32), torch.randn(1, 3, 32)
    with pytest.raises(SCFGError, match="`encoder_hidden_states` for a double-stream"):
        flux2_qkv(double, hidden)
    with pytest.raises(SCFGError, match="no `encoder_hidden_states` for a single-stream"):
        flux2_qkv(single, hidden, text)
    with pytest.raises(SCFGError, match=r"projections\['to_q'\]"):  # recorded on another call: wrong length
        flux2_qkv(double, hidden, text, projections={"to_q": torch.zeros(1, 5, 32)})
    with pytest.raises(SCFGError, match="to_q"):  # a single-stream layer has only its fused projection
        flux2_qkv(single, hidden, projections={"to_q": torch.zeros(1, 6, 32)})

    class Wrapper:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, *args, **kwargs):
            return self.inner(attn, *args, **kwargs)

    double.set_processor(Wrapper(double.processor))
    with pytest.raises(SCFGError, match=r"Flux2AttnProcessor.*Wrapper"):
        flux2_qkv(double, hidden, text)
    assert "Flux2ParallelSelfAttnProcessor" in SUPPORTED_PROCESSORS


def test_klein_refuses_tokens_it_cannot_place():
    """Reference tokens first (the KV-cache pipeline's layout) or a KV-cache call: refused, not misread."""
    transformer = tiny_transformer().eval()
    kwargs = transformer_inputs(transformer, reference_tokens=24)
    kwargs["img_ids"] = torch.cat([kwargs["img_ids"][:, TOKENS:], kwargs["img_ids"][:, :TOKENS]], dim=1)
    with pytest.raises(SCFGError, match="generated tokens"):
        FAMILY.pass_context(transformer, (), kwargs)
    call = LayerCall((), {"hidden_states": torch.zeros(1, 4, 32), "kv_cache_mode": "cached"})
    with pytest.raises(SCFGError, match="KV cache"):
        FAMILY.attention(transformer.get_submodule(DOUBLE), call, None, None)


def test_cli_compare_runs_klein(tiny_klein_path, tmp_path):
    """`--scale` reaches klein as `guidance_scale` (its negative is always the empty prompt), so the CFG panel runs
    CFG and the S-CFG panel is guided, with its region files."""
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "cmp.png"
    argv = ["compare", "a red cat", "--model", str(tiny_klein_path), "--steps", "2", "--height", "32"]
    argv += ["--width", "48", "--scale", "4", "--out", str(out), "--show-regions"]
    assert main(argv) == 0
    assert json.loads(Image.open(out).text["scfg"])["guidance"] == "compare"
    assert any(p.name.endswith("-steps.png") for p in tmp_path.iterdir())


def test_klein_words_are_the_user_messages_own(tiny_klein_path):
    """`region_tokens="words"`: the chat template's role name, newlines and assistant turn (`<think>` block
    included) are not the prompt's words; nor is right padding."""
    pipe = load(tiny_klein_path)
    segments = FAMILY.tokenize(pipe, ["a red cat", "a blue dog"], 24)
    words = FAMILY.word_mask(segments)
    for row, expected in enumerate([["a", "Ġred", "Ġcat"], ["a", "Ġblue", "Ġdog"]]):
        tokens = pipe.tokenizer.convert_ids_to_tokens(segments[0][1][row].tolist())
        assert tokens[:3] == ["<|im_start|>", "user", "Ċ"]  # the template this test is about
        assert [t for t, w in zip(tokens, words[row].tolist(), strict=True) if w] == expected
