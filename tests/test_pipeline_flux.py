"""S-CFG on a stock FluxPipeline run with true CFG: two separate transformer passes per step (cond, then uncond),
packed 2x2 latents, joint attention with RoPE, text first. Built from configs offline (tests/conftest.py)."""

from __future__ import annotations

import torch
from checks import assert_restored_after_exception
from diffusers import FluxPipeline

import scfg
from scfg import SCFGConfig
from scfg.capture import AttentionCapture
from scfg.families.flux import FAMILY
from scfg.families.flux_attention import flux_qkv, flux_scale

H, W = 32, 48  # an 8x12 token grid: non-square, so a (h, w) swap fails
KW = dict(height=H, width=W, num_inference_steps=3, output_type="latent", max_sequence_length=16)


def load(path, dtype=torch.float32):
    pipe = FluxPipeline.from_pretrained(str(path)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, negative="blurry, low quality, watermark", seed=0, **kwargs):
    if isinstance(prompt, list) and isinstance(negative, str):
        # one negative string for several prompts fails inside the stock FluxPipeline (its pooled negative
        # embeddings keep the prompt batch while the latents are repeated per image): give one per prompt
        negative = [negative] * len(prompt)
    return pipe(
        prompt,
        negative_prompt=negative,
        true_cfg_scale=kwargs.pop("true_cfg_scale", 4.0),
        generator=torch.Generator().manual_seed(seed),
        **{**KW, **kwargs},
    ).images


def test_flux_true_cfg_gets_per_sample_masks_on_the_token_grid(tiny_flux_path):
    pipe = load(tiny_flux_path)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        ours = run(pipe, ["a red cat", "two blue dogs on the grass"], num_images_per_prompt=2)
    plain = run(pipe, ["a red cat", "two blue dogs on the grass"], num_images_per_prompt=2)
    assert [r.step for r in recorder.steps] == [0, 1, 2]  # FLUX passes t / 1000: matched back to the schedule
    report = recorder.steps[0]
    assert report.token_masks.shape == (4, 16, 4, 6) and report.rate_map.shape == (4, 1, 8, 12)  # masks pooled 2x2
    assert report.guidance_scale == 4.0
    # every token cell belongs to some region; the prompts differ, so the masks of the two prompts differ
    assert report.token_masks.any(dim=1).all()
    assert not torch.equal(report.token_masks[0], report.token_masks[2])
    assert torch.isfinite(ours).all() and not torch.allclose(ours, plain)


def test_flux_unit_rate_equals_true_cfg(tiny_flux_path):
    pipe = load(tiny_flux_path, torch.float64)
    plain = run(pipe, "a red cat on a mat")
    with scfg.enable(pipe, SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None)):
        ours = run(pipe, "a red cat on a mat")
    # rate exactly 1, smoothed by weights summing to 1 within 2 ulps: the rewritten uncond reproduces the model's own
    # up to a few float64 roundings, which the line multiplies by the scale (4), over 3 steps
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12 * plain.abs().max().item())


def test_flux_without_true_cfg_is_left_alone_and_disabled_is_stock(tiny_flux_path):
    pipe = load(tiny_flux_path)
    stock_no_cfg = pipe("a red cat", generator=torch.Generator().manual_seed(0), **KW).images
    stock_cfg = run(pipe, "a red cat")
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        # no negative prompt: FluxPipeline runs one pass per step, nothing to guide
        no_cfg = pipe("a red cat", generator=torch.Generator().manual_seed(0), **KW).images
        assert recorder.steps == []
        run(pipe, "a red cat")
    assert torch.equal(no_cfg, stock_no_cfg)
    assert torch.equal(run(pipe, "a red cat"), stock_cfg)  # after the block: the stock pipeline, bit for bit


def test_flux_restored_after_exception(tiny_flux_path):
    pipe = load(tiny_flux_path)
    assert_restored_after_exception(pipe, lambda callback: run(pipe, "a red cat", callback_on_step_end=callback))


def test_flux_maps_equal_a_float64_reference(tiny_flux_path):
    """The family's cross/self maps of one double-stream layer against softmax(q kᵀ) of the image queries over
    `[text; image]` keys, split and renormalised by hand, all in float64."""
    pipe = load(tiny_flux_path, torch.float64)
    transformer = pipe.transformer
    name = "transformer_blocks.1.attn"
    attn = transformer.get_submodule(name)
    inputs = {}
    handle = attn.register_forward_pre_hook(lambda m, a, k: inputs.update(k) or None, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).double()
    kwargs = dict(
        hidden_states=torch.randn(2, 96, 16, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g, dtype=torch.float64),
        pooled_projections=torch.randn(2, 16, generator=g, dtype=torch.float64),
        timestep=torch.tensor([0.5, 0.5], dtype=torch.float64),
        img_ids=img_ids,
        txt_ids=torch.zeros(7, 3, dtype=torch.float64),
    )
    context = FAMILY.pass_context(transformer, (), kwargs)
    assert context.grid == (8, 12) and context.extra["text_len"] == 7
    layers = {}
    with AttentionCapture(transformer, [name], FAMILY.attention, FAMILY.projections) as capture:
        capture.begin(context.grid, context=context)
        transformer(**kwargs)
        layers = capture.finish().layers
    handle.remove()
    pair = FAMILY.layer_pairs(transformer)[1]
    cross, self_rows = FAMILY.layer_attention(pair, layers, context)
    q, k, _ = flux_qkv(attn, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["image_rotary_emb"])
    probs = (q[:, :, 7:] @ k.transpose(-1, -2) * flux_scale(attn)).softmax(-1).mean(1)
    text, image = probs[..., :7], probs[..., 7:]
    # float64 on both sides over the same q and k (the drift tests pin q/k to the processor's own): the two softmaxes
    # differ by reordered sums over 103 keys and a 2-head mean, ~100 roundings of eps relative
    tol = dict(rtol=256 * torch.finfo(torch.float64).eps, atol=0)
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(self_rows.dense(), image / image.sum(-1, keepdim=True), **tol)
    assert cross.shape == (2, 96, 7) and self_rows.shape == (2, 96, 96)
    # The family's default `mask_pool=2`: the 8x12 token grid's 2x2 cells' mean queries attend over all keys; the
    # image block, renormalised, is summed over each cell's 4 keys: a square 4x6-cell self map.
    cross, self_rows, grid = FAMILY.mask_attention(pair, layers, context, context.grid, 2)
    q_bar = q[:, :, 7:].unflatten(2, (4, 2, 6, 2)).mean((3, 5)).flatten(2, 3)
    probs = (q_bar @ k.transpose(-1, -2) * flux_scale(attn)).softmax(-1).mean(1)
    text, image = probs[..., :7], probs[..., 7:]
    image = (image / image.sum(-1, keepdim=True)).unflatten(-1, (4, 2, 6, 2)).sum((-3, -1)).flatten(-2)
    assert grid == (4, 6) and cross.shape == (2, 24, 7) and self_rows.shape == (2, 24, 24)
    torch.testing.assert_close(cross, text / text.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(self_rows.dense(), image, **tol)


def test_cli_compare_runs_flux_true_cfg(tiny_flux_path, tmp_path):
    """`--scale` reaches FLUX as `true_cfg_scale` with an (empty) negative prompt, so the CFG panel runs true CFG
    and the S-CFG panel is guided, with its region files."""
    import json

    from PIL import Image

    from scfg.cli import main

    out = tmp_path / "cmp.png"
    argv = ["compare", "a red cat", "--model", str(tiny_flux_path), "--steps", "2", "--height", "32", "--width", "48"]
    assert main([*argv, "--scale", "4", "--out", str(out), "--show-regions"]) == 0
    panel = Image.open(out)
    assert json.loads(panel.text["scfg"])["guidance"] == "compare"
    assert any(p.name.endswith("-steps.png") for p in tmp_path.iterdir())
