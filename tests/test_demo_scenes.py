"""The `scenes` domain and recipe (the second demo model): textured backgrounds, the scorer on them, and the
training-only pieces that read cross-attention (the recording processor, the grounding loss)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from scfg.demo.data import (
    BACKGROUND_MAX_SATURATION,
    BACKGROUNDS,
    COLORS,
    SCENE_VOCABULARY,
    sample_scene,
    write_tokenizer,
)
from scfg.demo.score import detect_background, parse_caption, score_image, split_background


def saturation(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    return (pixels.max(-1) - pixels.min(-1)) / np.maximum(pixels.max(-1), 1)


def test_textured_scenes_name_their_background_and_keep_exact_objects():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        scene = sample_scene(rng, backgrounds=BACKGROUNDS)
        seen.add(scene.background)
        assert scene.caption.endswith(f" on {scene.background}")
        requested, _ = parse_caption(scene.caption)
        assert [(o.color, o.shape, o.size) for o in requested] == [(o.color, o.shape, o.size) for o in scene.objects]
        union = np.zeros(scene.image.shape[:2], dtype=bool)
        for obj in scene.objects:
            assert np.all(scene.image[obj.mask] == COLORS[obj.color])
            union |= obj.mask
        assert saturation(scene.image[~union]).max() <= BACKGROUND_MAX_SATURATION
    assert seen == set(BACKGROUNDS)


def test_palette_is_more_saturated_than_any_texture():
    """The scorer's threshold sits between the two; the margin is what a generated image's blur can eat into."""
    palette = saturation(np.array(list(COLORS.values())))
    assert palette.min() >= BACKGROUND_MAX_SATURATION + 0.1


def test_white_scenes_draw_the_same_stream_as_before():
    """`backgrounds=None` takes no extra draw from the generator: the first demo model's data is unchanged."""
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    first, second = sample_scene(a), sample_scene(b, backgrounds=None)
    assert first.caption == second.caption and np.array_equal(first.image, second.image)
    assert first.background is None and np.all(first.image[~np.any([o.mask for o in first.objects], 0)] == 255)


def test_scorer_is_exact_on_rendered_textured_scenes():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, backgrounds=BACKGROUNDS) for _ in range(300)]
    scores = [score_image(s.image, s.caption)[0] for s in scenes]
    assert all(s.full and s.background for s in scores)


def test_scorer_reads_a_wrong_background():
    rng = np.random.default_rng(2)
    for background in BACKGROUNDS:
        scene = sample_scene(rng, num_objects=1, backgrounds=(background,))
        assert detect_background(scene.image) == background
        other = next(b for b in BACKGROUNDS if b != background)
        head, _ = split_background(scene.caption)
        score, _ = score_image(scene.image, f"{head} on {other}")
        assert score.background is False and not score.full and score.color == 1


def test_tokenizer_has_one_token_per_scene_word(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(str(tmp_path), vocabulary=SCENE_VOCABULARY)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in SCENE_VOCABULARY)


def test_unit_tokens_point_at_the_units_words(tmp_path):
    from transformers import CLIPTokenizer

    from scfg.demo.train import unit_tokens

    write_tokenizer(str(tmp_path), vocabulary=SCENE_VOCABULARY)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    caption = "a small red circle left of a large blue triangle on sand"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
    units = unit_tokens(caption)
    assert [index for _, index in units] == [0, 1, None]
    words = [[tokens[p].removesuffix("</w>") for p in positions] for positions, _ in units]
    assert words == [["small", "red", "circle"], ["large", "blue", "triangle"], ["sand"]]


def _small_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    ).eval()


def test_recording_processor_mirrors_the_stock_processor():
    """Training reads the maps through `RecordingAttnProcessor`; the UNet it trains must compute what diffusers'
    stock processor computes, or the exported model would run other arithmetic than it was trained with. The maps
    it records must be the head average of softmax(q k^T / sqrt(d)), formed here by hand in float64."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from scfg.demo.train import RecordingAttnProcessor

    unet = _small_unet()
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(sample, 10, encoder_hidden_states=text).sample
    store: list[torch.Tensor] = []
    processors = {
        n: RecordingAttnProcessor(store) if ".attn2." in n else AttnProcessor2_0() for n in unet.attn_processors
    }
    unet.set_attn_processor(processors)
    inputs = {}
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: inputs.update(kwargs, x=args[0]), with_kwargs=True)
    with torch.no_grad():
        recorded = unet(sample, 10, encoder_hidden_states=text).sample
    handle.remove()
    # Same products in another order (SDPA's fused kernel vs an explicit softmax): float32 rounding of O(1) values
    # through a UNet of a few layers, far below 1e-4.
    torch.testing.assert_close(recorded, stock, rtol=0, atol=1e-4)
    assert len(store) == 4  # down_blocks.0, the mid block and up_blocks.1's two transformer blocks
    x, ctx = inputs["x"].double(), inputs["encoder_hidden_states"].double()
    q = (x @ attn.to_q.weight.double().T).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = (ctx @ attn.to_k.weight.double().T).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)
    torch.testing.assert_close(store[0].double(), expected, rtol=0, atol=1e-6)  # float32 softmax of O(1) logits


def test_grounding_loss_is_zero_for_attention_on_the_units_and_matches_its_formula():
    from scfg.demo.train import grounding_loss, unit_masks, unit_tokens

    rng = np.random.default_rng(4)
    scene = sample_scene(rng, num_objects=2, backgrounds=BACKGROUNDS)
    grid, tokens = 16, 24
    units, masks = unit_tokens(scene.caption), unit_masks(scene, grid)
    assert torch.allclose(sum(masks.values()), torch.ones(grid * grid))  # the units tile the image
    # Attention that puts each unit's pixels on its words and each word's mass on its unit: both terms vanish
    # up to the pixel term's clamp (BCE of 1 - 1e-6 against 1 is 1e-6). Object masks snapped to whole cells, so
    # that every cell belongs to one unit.
    unit_scene = type(scene)(scene.image, [copy.copy(o) for o in scene.objects], scene.caption, scene.background)
    for index, obj in enumerate(unit_scene.objects):
        cells = (masks[index] > 0.5).reshape(grid, grid).numpy()
        obj.mask = np.kron(cells, np.ones((4, 4), dtype=bool))
    hard = unit_masks(unit_scene, grid)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in hard.values())
    probs = torch.zeros(1, grid * grid, tokens)
    for positions, index in units:
        probs[0][:, positions] = hard[index][:, None] / len(positions)
    loss = grounding_loss([probs], [unit_scene], [True], torch.ones(1))
    assert loss.item() < 1e-5
    # Random attention: the formula written out again, in float64
    probs = torch.softmax(torch.randn(1, grid * grid, tokens, dtype=torch.float64), dim=-1)
    expected = []
    for positions, index in units:
        a, m = probs[0][:, positions], masks[index].double()
        token = ((1 - (a * m[:, None]).sum(0) / a.sum(0)) ** 2).mean()
        share = a.sum(1)
        pixel = -(m * share.log() + (1 - m) * (1 - share).log()).mean()
        expected.append(0.5 * (token + pixel))  # the weight alpha_bar = 0.5
    got = grounding_loss([probs], [scene], [True], torch.full((1,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=1e-10, atol=0)
    assert grounding_loss([probs], [scene], [False], torch.ones(1)).item() == 0  # dropped captions add nothing


def test_scenes_recipe_trains_resumes_and_exports(tmp_path):
    """The `scenes` recipe at batch 2: the grounding loss is logged, a `shapes` checkpoint is refused, the export
    is a StableDiffusionPipeline with cross-attention at latent/1 and latent/2 and says which levels S-CFG uses."""
    import json

    from diffusers import StableDiffusionPipeline

    from scfg.demo import train

    work = tmp_path / "work"
    common = ["--work", str(work), "--vae-steps", "1", "--vae-batch", "2", "--batch", "2", "--threads", "1"]
    common += ["--decoder-steps", "0", "--recipe", "scenes"]
    train.main([*common, "--steps", "1"])
    state = torch.load(work / "ckpt.pt", weights_only=False)["state"]
    assert state["recipe"] == "scenes" and state["step"] == 1
    with pytest.raises(SystemExit, match="scenes"):
        train.main([*common[:-1], "shapes", "--steps", "2"])
    # the compact copy kept in git resumes the same run: weights exact, Adam moments back in float32
    compact = tmp_path / "compact.pt"
    train.main([*common, "--compact", str(compact)])
    full, small = torch.load(work / "ckpt.pt", weights_only=False), torch.load(compact, weights_only=False)
    assert "vae_opt" not in small and all(torch.equal(full["unet"][k], small["unet"][k]) for k in full["unet"])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "ckpt.pt").write_bytes(compact.read_bytes())
    train.main(["--work", str(resumed), *common[2:], "--steps", "2"])
    assert torch.load(resumed / "ckpt.pt", weights_only=False)["state"]["step"] == 2
    folder = tmp_path / "model"
    train.main([*common, "--export", str(folder)])
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.vae.config.block_out_channels == [32, 64, 128] and pipe.unet.config.sample_size == 16
    exported = json.loads((folder / "training_state.json").read_text())
    assert exported["recipe"] == "scenes" and exported["scfg_levels"] == [1, 2]
    # the benchmark and the CLI take the domain from the folder: captions that name a background, `levels=(1, 2)`
    from scfg.cli import main
    from scfg.demo import demo_domain
    from scfg.demo.bench import run_benchmark

    domain = demo_domain(folder)
    assert (domain.recipe, domain.levels, domain.backgrounds) == ("scenes", (1, 2), BACKGROUNDS)
    pipe.set_progress_bar_config(disable=True)
    result = run_benchmark(
        pipe, num_prompts=2, seeds_per_prompt=1, scales=(5.0,), methods=("scfg-official",), steps=2, domain=domain
    )
    assert all(split_background(prompt)[1] in BACKGROUNDS for prompt in result["prompts"])
    assert all(row["background"] is not None and row["background_iou"] is not None for row in result["rows"])
    out = tmp_path / "cmp.png"
    assert main(["compare", "a red circle on grass", "--model", str(folder), "--steps", "2", "--out", str(out)]) == 0
    # the card follows the recipe: captions on backgrounds, S-CFG at the folder's levels, the scenes bar
    from scfg.demo import card

    card.main([str(folder), "--count", "2", "--steps", "2"])
    text = (folder / "README.md").read_text()
    assert "`scenes`" in text and "sky, grass, water, sand, brick" in text and "`levels=(1, 2)`" in text
    assert "16x16x4" in text and "masks on a 16x16 grid" in text and "Every caption word is one token." in text
    assert "85% single-object, 65% two-object" in text and "region IoU part is not measured" in text
    assert all(split_background(p)[1] in BACKGROUNDS for p in card.grid_prompts(domain.backgrounds))


def test_background_word_position_is_found_after_the_objects(tmp_path):
    from transformers import CLIPTokenizer

    from scfg.demo.bench import _object_token_positions

    write_tokenizer(str(tmp_path), vocabulary=SCENE_VOCABULARY)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    # <start> a(1) small(2) red(3) circle(4) on(5) grass(6): one token per word
    assert _object_token_positions("a small red circle on grass", tokenizer) == ([[2, 3, 4]], [6])


def test_region_iou_against_hand_counted_masks():
    """The benchmark's IoU: the union of the tokens' regions, brought to the image size by nearest neighbours."""
    from types import SimpleNamespace

    from scfg.demo.bench import _region_iou

    masks = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, 0] = True  # token 0: the top-left quarter
    masks[0, 1, 0, 1] = True  # token 1: the top-right quarter
    late = [SimpleNamespace(token_masks=masks)] * 2
    truth = np.zeros((4, 4), dtype=bool)
    truth[:2, :3] = True  # 6 pixels: all of the top-left quarter, half of the top-right one
    # tokens 0 and 1: region = the top half (8 pixels), intersection 6, union 8; token 2 owns nothing: 0 of 6
    assert _region_iou(late, 0, [0, 1], truth) == [0.75, 0.75]
    assert _region_iou(late, 0, [2], truth) == [0.0, 0.0]
    assert _region_iou(late, 0, [7], truth) == []  # beyond the text length: no region to compare
