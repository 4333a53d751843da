"""S-CFG on stock Kolors pipelines: an SDXL-shaped UNet that projects left-padded ChatGLM3 states itself
(`text_proj`), CFG as one `[uncond, cond]` batch. The tiny pipeline is built offline (tests/tiny_kolors.py), saved
with `save_pretrained` and reloaded with `from_pretrained`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentencepiece", reason="ChatGLMTokenizer is sentencepiece-based")
kolors = pytest.importorskip("diffusers.pipelines.kolors", reason="diffusers without Kolors pipelines")
KolorsPipeline, KolorsImg2ImgPipeline = kolors.KolorsPipeline, kolors.KolorsImg2ImgPipeline

import scfg  # noqa: E402
from scfg import SCFGConfig  # noqa: E402
from scfg.capture import AttentionCapture  # noqa: E402
from scfg.families import family_for  # noqa: E402
from scfg.families.kolors import FAMILY, padding_roles  # noqa: E402

H, W = 32, 48  # a 16x24 latent, 4x6 at latent/4: non-square, so a (h, w) swap fails
KW = dict(height=H, width=W, num_inference_steps=3, output_type="latent")


@pytest.fixture(scope="session")
def tiny_kolors_path(tmp_path_factory):
    from tiny_kolors import build_tiny_kolors

    folder = tmp_path_factory.mktemp("tiny-kolors")
    build_tiny_kolors(str(folder))
    return folder


def load(path, dtype=torch.float32):
    pipe = KolorsPipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_kolors(tiny_kolors_path):
    return load(tiny_kolors_path)


def latents(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(pipe, prompt, x, **kwargs):
    kwargs.setdefault("guidance_scale", 5.0)  # KolorsPipeline's default
    return pipe(prompt, latents=x.clone(), **{**KW, **kwargs}).images


def unet_inputs(pipe, prompts, negative, max_sequence_length=256, seed=0):
    """One CFG-batch call of the UNet as KolorsPipeline makes it: `[uncond, cond]` ChatGLM states and pooled states,
    SDXL's time ids."""
    cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
        prompts, device="cpu", negative_prompt=negative, max_sequence_length=max_sequence_length
    )
    text = torch.cat([uncond, cond])
    dtype = text.dtype
    time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=dtype).repeat(text.shape[0], 1)
    return dict(
        sample=latents(text.shape[0], seed, dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=text,
        added_cond_kwargs={"text_embeds": torch.cat([pooled_uncond, pooled]), "time_ids": time_ids},
    )


def capture_pair(unet, pair, inputs):
    """The family's `AttentionRows` of `pair`'s layers in one UNet call, and each layer's inputs."""
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen[name] = {"hidden_states": args[0] if args else kwargs["hidden_states"], **kwargs}

        return hook

    names = [pair.cross, pair.self_attn]
    handles = [unet.get_submodule(n).register_forward_pre_hook(keep(n), with_kwargs=True) for n in names]
    context = FAMILY.pass_context(unet, (), inputs)
    try:
        with AttentionCapture(unet, names, FAMILY.attention, FAMILY.projections) as capture, torch.no_grad():
            capture.begin(context.grid, context=context)
            unet(**inputs)
            layers = capture.finish().layers
    finally:
        for handle in handles:
            handle.remove()
    return layers, seen, context


def test_tiny_kolors_loads_offline_and_routes(tiny_kolors):
    assert family_for(tiny_kolors).name == "kolors"
    assert tiny_kolors.tokenizer.padding_side == "left"
    assert tiny_kolors.unet.config.encoder_hid_dim_type == "text_proj"
    image = tiny_kolors("a red cat", height=H, width=W, num_inference_steps=2).images[0]
    assert image.size == (W, H)  # PIL: (width, height)


def test_kolors_uses_sdxl_layers_and_presets(tiny_kolors):
    guard = scfg.enable(tiny_kolors)
    assert guard.levels == (4,) and guard.config.layers_per_stack == 1
    assert {p.cross.split(".")[0] for p in guard.pairs} == {"down_blocks", "mid_block", "up_blocks"}
    assert all(p.self_attn == p.cross[: -len("attn2")] + "attn1" for p in guard.pairs)


def test_kolors_maps_equal_a_float64_reference(tiny_kolors):
    """Cross and self maps of one transformer block against softmax(q kᵀ / √d) averaged over heads, formed by hand
    from the layer's inputs in float64; the cross map's keys are the UNet's projection of the ChatGLM states."""
    pipe = tiny_kolors.to(torch.float64)
    unet = pipe.unet
    inputs = unet_inputs(pipe, ["a red cat", "two blue dogs on the sofa"], ["", "green"])
    pair = FAMILY.layer_pairs(unet)[-1]
    layers, seen, context = capture_pair(unet, pair, inputs)
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)
    projected = unet.encoder_hid_proj(inputs["encoder_hidden_states"])
    for name, got, keys in ((pair.cross, cross, projected), (pair.self_attn, self_rows.dense(), None)):
        attn = unet.get_submodule(name)
        x = seen[name]["hidden_states"]
        if keys is None:
            keys = x
        else:
            assert torch.equal(seen[name]["encoder_hidden_states"], keys)  # the projected ChatGLM states
        b, heads = x.shape[0], attn.heads
        q = attn.to_q(x).view(b, x.shape[1], heads, -1).transpose(1, 2)
        k = attn.to_k(keys).view(b, keys.shape[1], heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)
        # float64 on both sides over the same projections: reordered sums over at most 256 keys and a head mean,
        # ~100 roundings of eps relative
        torch.testing.assert_close(got, probs, rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    assert cross.shape == (4, 96, 256) and self_rows.shape == (4, 96, 96)  # up_blocks.1: latent/2


def test_kolors_token_roles_find_the_padding(tiny_kolors):
    """`[gMASK]` (the first token after the left padding) is the reference, and of the pads only the first may own a
    region; read from the cross-attention alone, checked here against the tokenizer's ids and attention mask."""
    pipe = tiny_kolors.to(torch.float64)
    unet = pipe.unet
    # with 8 tokens: 6 words (no padding), 3 words (3 pads), "" (6 pads), 5 words (a single pad)
    prompts = ["a red cat on the sofa", "a red cat"]
    negative = ["", "a red cat on the"]
    inputs = unet_inputs(pipe, prompts, negative, max_sequence_length=8)
    pair = FAMILY.layer_pairs(unet)[0]
    layers, _, context = capture_pair(unet, pair, inputs)
    cross, _ = FAMILY.layer_attention(pair, layers, context)
    reference, valid = FAMILY.token_roles(cross)

    tokens = pipe.tokenizer(negative + prompts, padding="max_length", max_length=8, truncation=True)
    ids, mask = torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"])
    gmask = (ids == pipe.tokenizer.get_command("[gMASK]")).to(torch.int64).argmax(dim=1)
    assert gmask.tolist() == [6, 1, 0, 3]  # [uncond "", uncond 5 words, cond 6 words, cond 3 words]
    # a single pad is read as no padding (documented): its pad plays the reference
    assert reference.tolist() == [6, 0, 0, 3]
    repeats = (mask == 0) & (torch.arange(8) > 0)
    assert torch.equal(valid, ~repeats)
    # the pads' columns are the same numbers: ChatGLM gives every pad the same state
    assert torch.equal(cross[0, :, :6], cross[0, :, :1].expand(-1, 6))


def test_padding_roles_of_uniform_attention():
    # all-zero negative embeddings: every column the same; token 0 is the reference and the only owner
    reference, valid = padding_roles(torch.full((2, 5, 7), 1 / 7))
    assert reference.tolist() == [0, 0] and valid.sum(dim=1).tolist() == [1, 1] and valid[:, 0].all()


@pytest.mark.parametrize("ip_adapter", [False, True], ids=["sdpa", "ip-adapter"])
def test_kolors_qk_are_what_the_attention_receives(tiny_kolors, ip_adapter, monkeypatch):
    """Spy on SDPA while each captured layer runs and require the family's queries and keys to be the very same
    numbers (with an IP-Adapter, the text attention is the processor's first SDPA call; the image-prompt attention
    is a second one, not part of the cross map)."""
    from test_families_routing import tiny_ip_adapter

    pipe = tiny_kolors
    unet = pipe.unet
    inputs = unet_inputs(pipe, ["a red cat"], ["blue"])
    if ip_adapter:
        pipe.load_ip_adapter(tiny_ip_adapter(unet), subfolder="", weight_name="", image_encoder_folder=None)
        assert unet.config.encoder_hid_dim_type == "ip_image_proj" and unet.text_encoder_hid_proj is not None
        inputs["added_cond_kwargs"]["image_embeds"] = [
            torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(1))
        ]
    pair = FAMILY.layer_pairs(unet)[0]
    calls: dict[str, list] = {}
    sdpa = F.scaled_dot_product_attention

    def spying(name):
        def spy(query, key, value, *args, **kwargs):
            calls[name].append((query, key))
            return sdpa(query, key, value, *args, **kwargs)

        def start(module, args, kwargs):
            calls[name] = []
            monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

        return start

    def stop(module, args, output):
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)

    handles = []
    for name in (pair.cross, pair.self_attn):
        module = unet.get_submodule(name)
        handles += [
            module.register_forward_pre_hook(spying(name), with_kwargs=True),
            module.register_forward_hook(stop),
        ]
    try:
        layers, _, _ = capture_pair(unet, pair, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls[pair.self_attn]) == 1 and len(calls[pair.cross]) == (2 if ip_adapter else 1)
    for name in (pair.cross, pair.self_attn):
        query, key = calls[name][0]
        assert torch.equal(layers[name].query, query) and torch.equal(layers[name].key, key)
    assert layers[pair.cross].shape == (2, 96, 256)  # down_blocks.1: latent/2


def test_kolors_batch_gets_per_sample_masks_with_another_negative_length(tiny_kolors):
    pipe = tiny_kolors.to(torch.float64)  # batched and single matmuls round differently in float32: near-ties flip
    prompts = ["a red cat on the sofa", "a blue dog"]
    negative = ["green", "the left square of the circle"]  # each of another length than its prompt
    recorder = scfg.Recorder()
    x = latents(4, seed=1, dtype=torch.float64)
    with scfg.enable(pipe, on_step=recorder):
        batched = run(pipe, prompts, x, negative_prompt=negative, num_images_per_prompt=2)
        singles = [run(pipe, prompts[i // 2], x[i : i + 1], negative_prompt=negative[i // 2]) for i in range(4)]
    # float64: batched and single matmuls differ by ~1e-16 relative per operation, a few 1e-15 after 3 Euler steps;
    # a mask or a rate taken from another sample moves the latents by far more than 1e-9
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    assert [r.step for r in recorder.steps[:3]] == [0, 1, 2]
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 256, 4, 6) and report.rate_map.shape == (4, 1, 16, 24)
    assert report.guidance_scale == 5.0
    assert report.tokens[2][-5:] == ["[gMASK]", "sop", "▁a", "▁blue", "▁dog"]
    assert report.tokens[0][:2] == ["<pad>", "<pad>"]
    owners = report.token_masks.flatten(2).any(dim=2)  # [B, T]: tokens that own some cell
    for sample, words in enumerate([6, 6, 3, 3]):
        first = 256 - words - 2
        # regions go to the first pad, [gMASK], sop and the words only: never to a repeated pad
        assert not owners[sample, 1:first].any()
    assert report.token_masks.any(dim=1).all()  # every cell belongs to some region
    assert not torch.equal(report.token_masks[0], report.token_masks[2])


def test_kolors_unit_rate_equals_plain_cfg_and_restores(tiny_kolors):
    pipe = tiny_kolors.to(torch.float64)
    before = dict(pipe.unet.attn_processors)
    x = latents(1, seed=2, dtype=torch.float64)
    plain = run(pipe, "a red cat", x, negative_prompt="blue")
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        forced = run(pipe, "a red cat", x, negative_prompt="blue")
    # float64: the rewrite u' = c - k·η is accepted within 64 ulps (~1.4e-14) of max|guided| per step, and rate 1
    # is exact up to the smoothing's rounding (a few ulps); 3 Euler steps through the tiny UNet amplify that far
    # less than 1e4x (measured: ~1e-16 of max|latents|), so 1e-9 of max|latents| is loose by orders of magnitude,
    # while a rate of 1.001 everywhere already moves the latents by ~4e-4 of their maximum
    torch.testing.assert_close(forced, plain, rtol=0, atol=1e-9 * float(plain.abs().max()))
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
    assert type(pipe) is KolorsPipeline
    assert torch.equal(run(pipe, "a red cat", x, negative_prompt="blue"), plain)  # the stock pipeline, bit for bit


def test_kolors_without_cfg_is_left_alone(tiny_kolors):
    x = latents(1, seed=3)
    stock = run(tiny_kolors, "a red cat", x, guidance_scale=1.0)
    guided_stock = run(tiny_kolors, "a red cat", x)
    recorder = scfg.Recorder()
    with scfg.enable(tiny_kolors, on_step=recorder):
        no_cfg = run(tiny_kolors, "a red cat", x, guidance_scale=1.0)  # do_classifier_free_guidance is False
        assert recorder.steps == []
        guided = run(tiny_kolors, "a red cat", x)
    assert torch.equal(no_cfg, stock)
    assert [r.step for r in recorder.steps] == [0, 1, 2]
    # float32 rounding alone (a float32 unit-rate run) moves such latents by ~4e-6; S-CFG moves them by ~0.6
    assert not torch.allclose(guided, guided_stock, rtol=0, atol=1e-4)


def test_kolors_restored_after_exception(tiny_kolors):
    cls = type(tiny_kolors)

    def explode(pipe, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("boom")
        return kwargs

    guard = scfg.enable(tiny_kolors)
    with pytest.raises(RuntimeError, match="boom"), guard:
        run(tiny_kolors, "a red cat", latents(1), callback_on_step_end=explode)
    assert type(tiny_kolors) is cls and not guard.recording
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_kolors.unet.modules())


def test_kolors_zeroed_negative_prompt_gives_a_whole_image_foreground(tiny_kolors):
    # All-zero negative embeddings (what `force_zeros_for_empty_prompt=True` means; that path itself fails in the stock
    # KolorsPipeline, which leaves the pooled negative embeddings None): the uncond half attends uniformly.
    hidden = tiny_kolors.text_encoder.config.hidden_size
    zeros = dict(
        negative_prompt_embeds=torch.zeros(1, 256, hidden), negative_pooled_prompt_embeds=torch.zeros(1, hidden)
    )
    recorder = scfg.Recorder()
    with scfg.enable(tiny_kolors, on_step=recorder):
        out = run(tiny_kolors, "a red cat", latents(1, seed=4), **zeros)
    assert torch.isfinite(out).all() and len(recorder.steps) == 3
    assert all(bool(r.foreground_mask.all()) for r in recorder.steps)


def test_kolors_word_regions_and_per_word_scales(tiny_kolors):
    recorder = scfg.Recorder()
    x = latents(1, seed=5)
    with scfg.enable(tiny_kolors, SCFGConfig(region_tokens="words"), on_step=recorder):
        run(tiny_kolors, "a red cat", x)
    owners = recorder.steps[0].token_masks.flatten(2).any(dim=2)[0].nonzero().flatten().tolist()
    assert owners and set(owners) <= {253, 254, 255}  # "▁a", "▁red", "▁cat": not the pads, [gMASK] or sop
    with scfg.enable(tiny_kolors):
        plain = run(tiny_kolors, "a red cat", x)
    with scfg.enable(tiny_kolors, token_scales={"cat": 2.0}, on_step=recorder):
        scaled = run(tiny_kolors, "a red cat", x)
    assert not torch.equal(scaled, plain)


def test_kolors_img2img_guides_the_steps_it_runs(tiny_kolors):
    pipe = KolorsImg2ImgPipeline(**tiny_kolors.components)
    pipe.set_progress_bar_config(disable=True)
    assert family_for(pipe).name == "kolors"
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(6))
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        out = pipe(
            "a red cat",
            image=image,
            strength=0.5,
            num_inference_steps=4,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
    assert torch.isfinite(out).all() and out.shape == (1, 4, H // 2, W // 2)
    assert [r.step for r in recorder.steps] == [2, 3]  # indices in the full schedule (README: step fractions)


def test_kolors_per_word_scale_on_a_repeated_word(tiny_kolors):
    from scfg.tokens import WordScale, token_scale_tensor

    prompts = ["a red cat on a blue sofa"]
    segments = FAMILY.tokenize(tiny_kolors, prompts, 16)  # 7 pads, [gMASK], sop, then the words from position 9
    scales = token_scale_tensor(segments, prompts, [WordScale("a", 2.0, occurrence=1)])
    assert scales[0].nan_to_num().nonzero().flatten().tolist() == [13]


def test_kolors_pag_batch_is_left_alone(tiny_kolors):
    """With `pag_scale > 0` KolorsPAGPipeline runs [uncond, cond, perturbed]: not a CFG batch, so nothing is guided,
    even on prompt embeddings, where the batch size cannot tell (2 prompts: 6 samples, halves of 3)."""
    import diffusers

    pag = getattr(diffusers, "KolorsPAGPipeline", None)
    if pag is None:
        pytest.skip("diffusers without KolorsPAGPipeline")
    pipe = pag(**tiny_kolors.components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    cond, uncond, pooled, pooled_uncond = tiny_kolors.encode_prompt(["a red cat", "a blue dog"], device="cpu")
    embeds = dict(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=pooled_uncond,
    )
    for pag_scale, guided_steps in ((3.0, []), (0.0, [0, 1, 2])):
        recorder = scfg.Recorder()
        with scfg.enable(pipe, on_step=recorder):
            run(pipe, None, latents(2), pag_scale=pag_scale, **embeds)
        assert [r.step for r in recorder.steps] == guided_steps
