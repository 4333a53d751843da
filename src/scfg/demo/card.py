"""Write a demo model's card and sample grid: `python -m scfg.demo.card FOLDER [--bench bench/]`.

The grid shows, for six captions and four seeds each, rows of CFG and S-CFG at guidance 5 (same noise). The card
records the data, the recipe, the training time and losses (from `training_state.json`), the single- and
two-object accuracies measured here with the exact scorer, and the benchmark table when `--bench` is given. The
captions, S-CFG's levels and the bar follow the model's recipe (`scfg.demo.demo_domain`): the `scenes` model's
captions name a background, and its bar also asks the object words' region IoU (from `--bench`) to reach 0.5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..config import SCFGConfig
from ..integration import enable
from . import DemoDomain, demo_domain
from .score import score_image

PROMPTS = [
    "a large red circle",
    "a small blue square",
    "a large yellow triangle",
    "a large green square",
    "a small red circle left of a large blue square",
    "a large purple triangle above a small orange circle",
]


def grid_prompts(backgrounds: tuple[str, ...] | None = None) -> list[str]:
    """The grid's six captions; with `backgrounds` (the `scenes` domain) each on one of them in turn."""
    if not backgrounds:
        return list(PROMPTS)
    return [f"{p} on {backgrounds[k % len(backgrounds)]}" for k, p in enumerate(PROMPTS)]


def sample_grid(
    pipe, scale: float = 5.0, seeds: int = 4, steps: int = 30, domain: DemoDomain | None = None
) -> tuple[Image.Image, dict]:
    captions = grid_prompts(None if domain is None else domain.backgrounds)
    prompts = [p for p in captions for _ in range(seeds)]
    config = SCFGConfig.preset("official", **({} if domain is None else {"levels": domain.levels}))
    rows, accuracy = [], {}
    for label in ("CFG", "S-CFG"):
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        kwargs = dict(guidance_scale=scale, num_inference_steps=steps, generator=generators, output_type="np")
        if label == "CFG":
            images = pipe(prompts, **kwargs).images
        else:
            with enable(pipe, config):
                images = pipe(prompts, **kwargs).images
        images = (images * 255).round().astype(np.uint8)
        rows.append(images)
        accuracy[label] = float(np.mean([score_image(im, p)[0].full for im, p in zip(images, prompts, strict=True)]))
    tile = 64
    canvas = Image.new("RGB", (60 + len(prompts) * (tile + 2), 2 * (tile + 2) + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(zip(("CFG", "S-CFG"), rows, strict=True)):
        draw.text((4, 14 + r * (tile + 2) + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (60 + c * (tile + 2), 14 + r * (tile + 2)))
    for k in range(len(PROMPTS)):
        draw.text((60 + k * seeds * (tile + 2) + 2, 1), f"{k + 1}", fill="black")
    return canvas, accuracy


def accuracy_by_objects(
    pipe,
    count: int,
    objects: int,
    scale: float = 5.0,
    steps: int = 30,
    seed: int = 7,
    backgrounds: tuple[str, ...] | None = None,
) -> tuple[float, float]:
    """Plain CFG on `count` fresh captions with `objects` objects (one image each; with `backgrounds`, each on one):
    the share of images where every requested object is present with its colour and shape (the quality bar), and
    the full-prompt accuracy (also size, relation, no extra objects, the background)."""
    from .data import sample_scene

    rng = np.random.default_rng(seed)
    prompts = [sample_scene(rng, num_objects=objects, backgrounds=backgrounds).caption for _ in range(count)]
    present, full = [], []
    for start in range(0, count, 16):
        chunk = prompts[start : start + 16]
        images = pipe(
            chunk,
            guidance_scale=scale,
            num_inference_steps=steps,
            output_type="np",
            generator=[torch.Generator().manual_seed(start + i) for i in range(len(chunk))],
        ).images
        images = (images * 255).round().astype(np.uint8)
        scores = [score_image(im, p)[0] for im, p in zip(images, chunk, strict=True)]
        present += [s.shape == 1.0 for s in scores]
        full += [s.full for s in scores]
    return float(np.mean(present)), float(np.mean(full))


# the share of right images that calls a model finished, per recipe; `scenes` also asks the object words' region
# IoU (the benchmark's `region_iou`, CFG at guidance 5, last 20% of steps) to reach IOU_BAR
BARS = {"shapes": {"single-object": 0.8, "two-object": 0.5}, "scenes": {"single-object": 0.85, "two-object": 0.65}}
BAR = BARS["shapes"]
IOU_BAR = 0.5


def verdict(
    single: float, double: float, bar: dict[str, float] = BAR, iou: float | None = None, needs_iou: bool = False
) -> str:
    """Which parts of `bar` (single-object, two-object accuracy) and, with `needs_iou` or a measured `iou`, of
    `IOU_BAR` are met; a part that is asked for but not measured (`iou` None) is never met."""
    met: dict[str, bool | None] = {
        f"{name} part": value >= bar[name] for name, value in zip(bar, (single, double), strict=True)
    }
    levels = [f"{value:.0%}" for value in bar.values()]
    wanted = f"{levels[0]} single-object, {levels[1]} two-object"
    if iou is not None or needs_iou:
        met["region IoU part"] = None if iou is None else iou >= IOU_BAR
        wanted += f", region IoU {IOU_BAR:g}" + ("" if iou is None else f" (measured {iou:.2f})")
    if all(ok is True for ok in met.values()):
        return f"This meets the quality bar set for shipping ({wanted})."
    status = {True: "met", False: "not met yet", None: "not measured (the benchmark's CFG row at g=5 gives it)"}
    parts = [f"the {name} is {status[ok]}" for name, ok in met.items()]
    return (
        f"The bar set for calling the model finished is {wanted}: {', '.join(parts)}; a model short of it does not "
        "replace the shipped default (it can ship beside it)."
    )


def describe_schedule(runs: list[dict]) -> str:
    """The lr settings of each (resumed) run, from the `lr_schedule` the trainer records."""
    if not runs:
        return "AdamW, lr 4e-4 with 200 warm-up steps"
    parts = []
    for run in runs:
        text = f"from step {run['from_step']:,}: lr {run['lr']:g}"
        if run["decay_from"] is not None:
            text += f", linear decay from step {run['decay_from']:,} to 10% at step {run['decay_to']:,}"
        parts.append(text)
    return "AdamW with 200 warm-up steps; " + "; ".join(parts)


def describe_decoder(state: dict) -> str:
    """The decoder fine-tuning phase of `scfg.demo.train` (`--decoder-steps`), when the model had one."""
    if not state.get("decoder_step"):
        return ""
    settings = state.get("decoder", {})
    recipe = ", ".join(f"{k} {v}" for k, v in settings.items())
    return (
        f"\n  Later, the decoder alone was fine-tuned {state['decoder_step']} steps ({recipe}; encoder frozen, "
        "so the UNet's latent space is unchanged; latents plus Gaussian noise up to that level)."
    )


def describe_tokens(tokenizer, vocabulary: tuple[str, ...] | None = None) -> str:
    """Whether every caption word (of `vocabulary`; default the `shapes` domain's) is one token; names the words this
    tokenizer splits."""
    from .data import VOCABULARY

    split = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in vocabulary or VOCABULARY}
    split = {w: n for w, n in split.items() if n > 1}
    if not split:
        return "Every caption word is one token."
    words = ", ".join(f'"{w}" ({n} tokens)' for w, n in split.items())
    return (
        f"Every caption word is one token except {words}: this tokenizer was written before `write_tokenizer` "
        "made every word one token, and the model was trained with it (a fresh `scfg.demo.train` run writes one "
        "token per word). Captions longer than 24 tokens (some three-object ones) are cut there."
    )


def bench_region_iou(bench: str | Path | None, scale: float = 5.0) -> float | None:
    """CFG's object-word region IoU at `scale` in a `bench-compositional` folder's results, or None."""
    if bench is None or not (Path(bench) / "results.json").is_file():
        return None
    table = json.loads((Path(bench) / "results.json").read_text())["table"]
    rows = [r for r in table if r["method"] == "cfg" and r["scale"] == scale and r.get("region_iou") is not None]
    value = float(rows[0]["region_iou"]) if rows else float("nan")
    return value if np.isfinite(value) else None


def describe_model(pipe, levels: tuple[int, ...]) -> str:
    """The architecture as the folder's configs give it (the `scenes` card)."""
    vae, unet, text = pipe.vae.config, pipe.unet.config, pipe.text_encoder.config
    image = vae.sample_size
    latent = unet.sample_size
    grids = ", ".join(f"latent/{n} ({latent // n}x{latent // n})" for n in levels)
    parameters = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    return (
        f"- `vae`: `AutoencoderKL`, {len(vae.block_out_channels)} blocks {tuple(vae.block_out_channels)}, "
        f"{image}x{image}x3 <-> {latent}x{latent}x{vae.latent_channels}, no attention.\n"
        f"- `unet`: `UNet2DConditionModel`, blocks {tuple(unet.block_out_channels)} "
        f"({', '.join(unet.down_block_types)}), {parameters:.1f}M parameters, stored in float16 (loads as float32); "
        f"S-CFG reads its cross-attention at {grids}: `levels={tuple(levels)}`, masks on a "
        f"{latent // min(levels)}x{latent // min(levels)} grid.\n"
        f"- `text_encoder`: {text.num_hidden_layers}-layer `CLIPTextModel` (hidden {text.hidden_size}), trained "
        f"jointly; `tokenizer`: a `CLIPTokenizer` over the caption vocabulary, {text.max_position_embeddings} "
        "positions."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--bench", default=None, help="a bench-compositional output folder (table.md, results.json)")
    parser.add_argument("--count", type=int, default=128, help="captions per accuracy measurement")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps per image")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    from .data import SCENE_VOCABULARY

    folder = Path(args.folder)
    domain = demo_domain(folder)
    scenes = domain is not None and domain.recipe == "scenes"
    backgrounds = domain.backgrounds if scenes else None
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    grid, grid_accuracy = sample_grid(pipe, steps=args.steps, domain=domain)
    grid.save(folder / "samples.png")
    single, single_full = accuracy_by_objects(pipe, args.count, 1, steps=args.steps, backgrounds=backgrounds)
    double, double_full = accuracy_by_objects(pipe, args.count, 2, steps=args.steps, backgrounds=backgrounds)
    state = json.loads((folder / "training_state.json").read_text())
    losses = ", ".join(
        f"{loss:.4f} at step {step}" for step, loss in state["losses"][:: max(1, len(state["losses"]) // 8)]
    )
    schedule = describe_schedule(state.get("lr_schedule", []))
    bench = (Path(args.bench) / "table.md").read_text() if args.bench else "(not run)"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    if scenes:
        text = verdict(single, double, BARS["scenes"], bench_region_iou(args.bench), needs_iou=True)
    else:
        text = verdict(single, double)
    fields = dict(
        steps=state["step"],
        vae_steps=state["vae_step"],
        hours=state["seconds"] / 3600,
        losses=losses,
        schedule=schedule,
        steps_sampling=args.steps,
        single=single,
        single_full=single_full,
        double=double,
        double_full=double_full,
        hardware=state.get("hardware", "a 2-core CPU machine"),
        verdict=text,
        count=args.count,
        grid_cfg=grid_accuracy["CFG"],
        grid_scfg=grid_accuracy["S-CFG"],
        bench=bench,
        size=size,
        scaling=state["scaling_factor"],
        decoder=describe_decoder(state),
        tokens=describe_tokens(pipe.tokenizer, SCENE_VOCABULARY if scenes else None),
    )
    if scenes:
        grounding = [r["grounding"] for r in state.get("lr_schedule", []) if "grounding" in r]
        fields.update(
            model=describe_model(pipe, domain.levels),
            backgrounds=", ".join(domain.backgrounds),
            grounding=", then ".join(f"{g:g}" for g in dict.fromkeys(grounding)) or "0",
        )
    (folder / "README.md").write_text((CARD_SCENES if scenes else CARD).format(**fields))
    print((folder / "README.md").read_text())


CARD = """# scfg demo model: flat shapes, trained from scratch on CPU

A small text-to-image latent diffusion model in the standard `StableDiffusionPipeline` format, shipped inside the
`semantic-cfg` package so that every command works offline. It exists to show S-CFG on a real trained model and to
measure it exactly: the domain is procedural, so every generated image can be scored against its caption.

## Data
Drawn on the fly by `scfg.demo.data`: 64x64 RGB, white background, 1-3 non-overlapping flat objects (weights
0.4/0.4/0.2); shapes circle, square, triangle; colours red, green, blue, yellow, purple, orange; sizes small
(12-16 px) and large (22-28 px). Captions: "a small red circle", two objects with a relation ("a small red circle
left of a large blue square": left of / right of / above / below), three objects joined by "and". 10% of
captions are dropped (empty) for classifier-free guidance.

## Model
- `vae`: `AutoencoderKL`, 2 blocks (32, 64 channels), 64x64x3 <-> 32x32x4, no attention; trained first
  ({vae_steps} steps, batch 16, MSE + 1e-6 KL); scaling factor {scaling:.4f}.{decoder}
- `unet`: `UNet2DConditionModel`, blocks (32, 64, 96, 128), cross-attention only at latent/4 (8x8) and latent/8
  (4x4) — the grids S-CFG's SD recipe uses — 5.4M parameters, stored in float16 (loads as float32).
- `text_encoder`: 2-layer `CLIPTextModel` (hidden 64), trained jointly; `tokenizer`: a `CLIPTokenizer` over the
  caption vocabulary, 24 positions. {tokens}
- `scheduler`: DDIM, cosine (`squaredcos_cap_v2`) schedule, epsilon prediction, "leading" spacing.
Total size {size:.1f} MB.

## Training
`python -m scfg.demo.train --work DIR` (fixed seed, resumable checkpoints every 5 minutes), then
`python -m scfg.demo.train --work DIR --export FOLDER` (EMA weights, decay 0.999) and
`python -m scfg.demo.card FOLDER`. Batch 32, gradient clip 1.0. {schedule}.
Trained {steps} steps in {hours:.2f} hours on {hardware} (torch 2.13, diffusers 0.42).
Loss (EMA of the MSE): {losses}.

## Quality (CFG, guidance 5, {steps_sampling} DDIM steps, the exact scorer of `scfg.demo.score`)
- single-object captions, the object with the right colour and shape: {single:.0%} of {count} images (also the
  right size and nothing else drawn: {single_full:.0%});
- two-object captions, both objects with the right colour and shape: {double:.0%} of {count} images (also sizes,
  relation and nothing else: {double_full:.0%});
- the sample grid (`samples.png`: six captions x four seeds, CFG row and S-CFG row, same noise): full-prompt
  accuracy {grid_cfg:.0%} (CFG) and {grid_scfg:.0%} (S-CFG).
{verdict}

## Benchmark (`scfg bench-compositional`)
{bench}

## Licence
Apache-2.0, as the `semantic-cfg` package: weights, tokenizer and data generator were made by the project, from
scratch, with no third-party data or weights.
"""


CARD_SCENES = """# scfg demo model `scenes`: shapes on named textured backgrounds, trained from scratch on CPU

A small text-to-image latent diffusion model in the standard `StableDiffusionPipeline` format, shipped inside the
`semantic-cfg` package beside the default `shapes` model (`--model demo:scenes`). It is the testbed where S-CFG's
training-free segmentation can see the objects: its cross-attention lives on a 16x16 grid and was trained to ground
each caption word in its unit (below), and every scene has a foreground and a background that both carry content, as
in the paper's motivating example. The domain is procedural, so every generated image is scored exactly.

## Data
Drawn on the fly by `scfg.demo.data`: 64x64 RGB, 1-3 non-overlapping flat objects (weights 0.4/0.4/0.2) on a
textured background named at the caption's end ({backgrounds}); shapes circle, square, triangle; colours red,
green, blue, yellow, purple, orange; sizes small (12-16 px) and large (22-28 px). Captions: "a small red circle on
grass", two objects with a relation ("a small red circle left of a large blue square on sand": left of / right of /
above / below), three joined by "and". 10% of captions are dropped (empty) for classifier-free guidance.

## Model
{model}
- `scheduler`: DDIM, cosine (`squaredcos_cap_v2`) schedule, epsilon prediction, "leading" spacing.
{tokens} Total size {size:.1f} MB.
- autoencoder trained first ({vae_steps} steps, batch 16, MSE + 1e-6 KL); scaling factor {scaling:.4f}.{decoder}

## Training
`python -m scfg.demo.train --work DIR --recipe scenes` (fixed seed, resumable), then `--export FOLDER` (EMA weights,
decay 0.999) and `python -m scfg.demo.card FOLDER --bench BENCH`. Batch 32, gradient clip 1.0. {schedule}.
Besides the epsilon loss, a grounding loss on the cross-attention (TokenCompose's token and pixel terms; weight
{grounding}; `scfg.demo.train`'s docstring gives the formula): each unit's words attend inside the unit and the unit's
pixels attend to its words. The exported pipeline uses diffusers' stock attention processors.
Trained {steps} steps in {hours:.2f} hours on {hardware} (torch 2.13, diffusers 0.42).
Loss (EMA of the epsilon MSE): {losses}.

## Quality (CFG, guidance 5, {steps_sampling} DDIM steps, the exact scorer of `scfg.demo.score`)
- single-object captions, the object with the right colour and shape: {single:.0%} of {count} images (also the
  right size, the background and nothing else drawn: {single_full:.0%});
- two-object captions, both objects with the right colour and shape: {double:.0%} of {count} images (also sizes,
  relation, background and nothing else: {double_full:.0%});
- the sample grid (`samples.png`: six captions x four seeds, CFG row and S-CFG row at `levels` (1, 2), same noise):
  full-prompt accuracy {grid_cfg:.0%} (CFG) and {grid_scfg:.0%} (S-CFG).
{verdict}

## Benchmark (`scfg bench-compositional --model demo:scenes`)
{bench}

## Licence
Apache-2.0, as the `semantic-cfg` package: weights, tokenizer and data generator were made by the project, from
scratch, with no third-party data or weights.
"""


if __name__ == "__main__":
    main()
