"""`scfg ui`: a Gradio app that shows CFG and S-CFG side by side with the regions and the rate map.

Install with `pip install "semantic-cfg[ui]"`. Runs on the shipped demo model by default. Generation requests
queue with concurrency 1 per loaded model; inputs are bounded (size, steps, prompt length) with clear messages.
Images are shown upscaled (nearest neighbour, so mask cells stay cells); the downloads keep the generated size.
"""

from __future__ import annotations

import argparse
import html
import inspect
import math
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from .config import SCFGConfig, SCFGError

__all__ = ["DISPLAY_PX", "LIMITS", "Pair", "build_app", "generate_pair", "main", "upscale", "write_downloads"]

DISPLAY_PX = 320  # height of the image panels; smaller images are upscaled to at least this for display


@dataclass(frozen=True)
class Limits:
    max_side: int = 1024
    min_side: int = 64
    max_steps: int = 100
    max_prompt_chars: int = 500
    max_scale: float = 50.0


LIMITS = Limits()


@dataclass
class _Models:
    """Pipelines loaded so far, one lock each: one generation at a time per model."""

    pipes: dict[str, Any] = field(default_factory=dict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def get(self, model: str) -> tuple[Any, threading.Lock]:
        from .cli import load_pipeline

        with self.guard:
            if model not in self.pipes:
                pipe = load_pipeline(model)
                pipe.set_progress_bar_config(disable=True)
                self.pipes[model] = pipe
                self.locks[model] = threading.Lock()
            return self.pipes[model], self.locks[model]


def validate(prompt: str, height: int, width: int, steps: int, scale: float) -> None:
    """Raise `SCFGError` with a message for the user when an input is out of bounds."""
    if not prompt.strip():
        raise SCFGError("Expected a prompt, but got an empty one. Type what to draw, e.g. 'a red circle'.")
    if len(prompt) > LIMITS.max_prompt_chars:
        raise SCFGError(f"Expected a prompt of at most {LIMITS.max_prompt_chars} characters, but got {len(prompt)}.")
    for name, side in (("height", height), ("width", width)):
        if not LIMITS.min_side <= side <= LIMITS.max_side or side % 8:
            raise SCFGError(
                f"Expected `{name}` between {LIMITS.min_side} and {LIMITS.max_side} and a multiple of 8, "
                f"but got {side}."
            )
    if not 1 <= steps <= LIMITS.max_steps:
        raise SCFGError(f"Expected between 1 and {LIMITS.max_steps} steps, but got {steps}.")
    if not 1.0 < scale <= LIMITS.max_scale:
        raise SCFGError(f"Expected a guidance scale in (1, {LIMITS.max_scale}], but got {scale}.")


@dataclass
class Pair:
    """What `generate_pair` returns, at the generated size.

    Attributes:
        cfg, scfg: the CFG and S-CFG images (same seed).
        regions: the S-CFG image blended with its region map (last step).
        rate: the last step's rate map as a heatmap (`scfg.viz.rate_heatmap`).
        legend: `(word, colour, area fraction)` of the regions, largest first (`scfg.viz.region_map`).
        info: one line for a person: the largest regions and the rate's range.
        steps: every step's `StepReport` (for `scfg.viz.save_step_animation`).
        config: the S-CFG config as resolved for the pipeline's family.
        settings: `prompt`, `negative_prompt`, `guidance_scale`, `num_inference_steps` and `seed` as given.
    """

    cfg: Any
    scfg: Any
    regions: Any
    rate: Any
    legend: list
    info: str
    steps: list
    config: SCFGConfig
    settings: dict[str, Any]


def generate_pair(
    pipe: Any,
    prompt: str,
    negative_prompt: str = "",
    preset: str = "official",
    scale: float = 5.0,
    steps: int = 30,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    progress: Any = None,
    levels: tuple[int, ...] | None = None,
) -> Pair:
    """CFG image, S-CFG image, region overlay (last step) and rate heatmap for one prompt and seed.

    `prompt` may carry per-word scales (`"a cat:1.5 on a sofa"`); they apply to the S-CFG image. `progress`, if
    given, is called as `progress(fraction, desc=...)` after every denoising step of both runs (Gradio's
    `gr.Progress`), with `fraction` rising from 0 to 1 over the two. `levels` overrides the preset's (a demo model's
    own, `scfg.demo.demo_domain`).
    """
    import torch
    from PIL import Image

    from .diagnostics import Recorder
    from .integration import enable, guidance, resolve_config
    from .tokens import parse_weighted_prompt
    from .viz import rate_heatmap, region_map

    text, scales = parse_weighted_prompt(prompt)
    kwargs = dict(num_inference_steps=steps, height=height, width=width)

    accepts_callback = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters

    def report(label: str, offset: float) -> dict[str, Any]:
        def callback(pipeline, step, timestep, callback_kwargs):
            if progress is not None:
                progress((offset + (step + 1) / steps) / 2, desc=f"{label}: step {step + 1}/{steps}")
            return callback_kwargs

        # pipelines without step-end callbacks (DeepFloyd IF) run without per-step progress
        return {"callback_on_step_end": callback} if accepts_callback else {}

    config = resolve_config(pipe, SCFGConfig.preset(preset, **({} if levels is None else {"levels": levels})))
    recorder = Recorder()  # every step, for the per-step GIF (at most LIMITS.max_steps small CPU tensors)
    with guidance(pipe, scale, negative_prompt or None) as arguments:
        kwargs.update(arguments)
        cfg = pipe(text, generator=torch.Generator("cpu").manual_seed(seed), **report("CFG", 0), **kwargs).images[0]
        with enable(pipe, config, on_step=recorder, token_scales=scales or None):
            scfg = pipe(
                text, generator=torch.Generator("cpu").manual_seed(seed), **report("S-CFG", 1), **kwargs
            ).images[0]
    last = recorder.steps[-1]
    regions, legend = region_map(last, 0, scfg.size)
    overlay = Image.blend(scfg.convert("RGB"), regions, 0.45)
    heat = rate_heatmap(last, 0, scfg.size)
    words = ", ".join(f"{label} {share:.0%}" for label, _, share in legend[:8])
    rate = last.rate_map[0]
    info = f"regions: {words} | rate min {float(rate.min()):.2f}, mean {float(rate.mean()):.2f}, max {float(rate.max()):.2f}"
    settings = dict(
        prompt=prompt, negative_prompt=negative_prompt, guidance_scale=scale, num_inference_steps=steps, seed=seed
    )
    return Pair(cfg, scfg, overlay, heat, legend, info, recorder.steps, config, settings)


def upscale(image: Any, target: int = DISPLAY_PX, limit: int = 2048) -> Any:
    """Enlarge `image` by the integer factor that brings its shorter side to at least `target` px, nearest
    neighbour so that pixels and mask cells stay sharp squares; no more than makes the longer side `limit`."""
    from PIL import Image

    w, h = image.size
    factor = max(1, min(math.ceil(target / min(w, h)), limit // max(w, h)))
    return image if factor == 1 else image.resize((w * factor, h * factor), Image.NEAREST)


def legend_html(legend: list) -> str:
    """The regions' words with their colour swatches and area, as HTML."""
    items = "".join(
        '<span style="display:inline-flex;align-items:center;gap:4px;margin:0 10px 2px 0;white-space:nowrap">'
        f'<span style="width:12px;height:12px;border:1px solid #0003;background:rgb{tuple(colour)}"></span>'
        f"{html.escape(label)} {share:.0%}</span>"
        for label, colour, share in legend
    )
    return f'<div class="scfg-legend" style="line-height:1.6">{items}</div>'


def colorbar_html(rate: Any, guidance_scale: float) -> str:
    """A colour bar for `rate_heatmap` (blue at the rate map's minimum, red at its maximum), as HTML."""
    from .viz import RATE_COLOURS

    lo, hi, mean = float(rate.min()), float(rate.max()), float(rate.mean())
    (r0, g0, b0), (r1, g1, b1) = RATE_COLOURS
    return (
        '<div class="scfg-colorbar">'
        f'<div style="height:14px;border:1px solid #0003;background:linear-gradient(to right, rgb({r0},{g0},{b0}), '
        f'rgb({r1},{g1},{b1}))"></div>'
        '<div style="display:flex;justify-content:space-between;font-size:0.9em">'
        f"<span>{lo:.2f}</span><span>rate (mean {mean:.2f}; effective scale = {guidance_scale:g} × rate)</span>"
        f"<span>{hi:.2f}</span></div></div>"
    )


def write_downloads(pair: Pair, folder: str, model: str | None = None, pipe: Any = None) -> list[str]:
    """Write the pair at its generated size into `folder`: the CFG and S-CFG PNGs with the CLI's PNG metadata
    (`model` and `pipe`'s scheduler recorded), the region overlay, the rate heatmap and the per-step GIF. Return
    the paths."""
    from .cli import _metadata, _png_info
    from .viz import save_step_animation

    settings = pair.settings
    args = argparse.Namespace(  # what `scfg generate` would be given for the same image
        model=model,
        negative_prompt=settings["negative_prompt"] or None,
        scale=settings["guidance_scale"],
        steps=settings["num_inference_steps"],
        seed=settings["seed"],
        scheduler=None,  # the model's own
        height=pair.scfg.height,
        width=pair.scfg.width,
    )
    seed, paths = settings["seed"], {}
    for name, image, config in (("cfg", pair.cfg, None), ("scfg", pair.scfg, pair.config)):
        guidance = "cfg" if config is None else "scfg"
        metadata = _metadata(args, settings["prompt"], guidance, config, pipe, image.size)
        paths[name] = os.path.join(folder, f"{name}-seed{seed}.png")
        image.save(paths[name], format="PNG", pnginfo=_png_info(metadata))
    paths["regions"] = os.path.join(folder, f"regions-seed{seed}.png")
    pair.regions.save(paths["regions"], format="PNG")
    paths["rate"] = os.path.join(folder, f"rate-seed{seed}.png")
    pair.rate.save(paths["rate"], format="PNG")
    paths["steps"] = os.path.join(folder, f"steps-seed{seed}.gif")
    save_step_animation(pair.steps, paths["steps"])
    return list(paths.values())


# Display images are upscaled already; `pixelated` keeps the browser's fit-to-panel scaling sharp too. Set in a
# <style> element because Gradio 5 takes `css=` in `Blocks()` and Gradio 6 in `launch()`.
CSS = "#cfg-image img, #scfg-image img, #regions img, #rate img { image-rendering: pixelated; }"


def _display_only(gr: Any) -> dict[str, Any]:
    """`gr.Image` arguments that drop its download button (downloads come from the file list, at generated size):
    Gradio 6 lists the buttons to show, Gradio 5 has one flag per button."""
    if "buttons" in inspect.signature(gr.Image.__init__).parameters:
        return {"buttons": ["fullscreen"]}
    return {"show_download_button": False}


def build_app(default_model: str | None = None):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    from .cli import default_model as shipped

    models = _Models()
    from .demo import demo_domain, resolve_model

    demo = shipped()
    downloads_root = tempfile.TemporaryDirectory(prefix="scfg-ui-")  # kept alive by `run`; removed at exit

    def run(model, prompt, negative_prompt, preset, scale, steps, seed, height, width, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        try:
            validate(prompt, int(height), int(width), int(steps), float(scale))
            model = resolve_model(model.strip()) if model.strip() else demo  # empty: the default demo model
            if not model:
                raise SCFGError(
                    "Expected a model: a local diffusers folder or a hub id (the default demo model is not installed)."
                )
            pipe, lock = models.get(model)

            def generation_progress(fraction: float, desc: str) -> None:
                progress(0.9 * fraction, desc=desc)  # the last 10%: drawing the per-step GIF

            with lock:  # one generation at a time per model
                pair = generate_pair(
                    pipe,
                    prompt,
                    negative_prompt,
                    preset,
                    float(scale),
                    int(steps),
                    int(seed),
                    int(height),
                    int(width),
                    generation_progress,
                    levels=domain.levels if (domain := demo_domain(model)) is not None else None,
                )
        except SCFGError as err:
            raise gr.Error(str(err)) from err
        progress(0.9, desc=f"drawing the regions of {len(pair.steps)} steps")
        files = write_downloads(pair, tempfile.mkdtemp(dir=downloads_root.name), model, pipe)
        return (
            upscale(pair.cfg),
            upscale(pair.scfg),
            upscale(pair.regions),
            legend_html(pair.legend),
            upscale(pair.rate),
            colorbar_html(pair.steps[-1].rate_map[0], float(scale)),
            pair.info,
            files[-1],  # the GIF
            files,
        )

    image = dict(type="pil", format="png", height=DISPLAY_PX, interactive=False, **_display_only(gr))
    with gr.Blocks(title="S-CFG: semantic-aware classifier-free guidance") as app:
        gr.HTML(f"<style>{CSS}</style>", elem_id="scfg-style")
        gr.Markdown(
            "## S-CFG vs CFG\nSame seed, same scale. Per-word guidance: write `word:1.5` in the prompt, "
            "e.g. `a red circle:1.5 left of a blue square`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt",
                    value="a small red circle left of a large blue square",
                    elem_id="prompt",
                    max_lines=3,
                )
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                model = gr.Textbox(
                    label="Model (local folder or hub id)",
                    value=default_model or "",
                    placeholder="the shipped demo model (or demo:scenes)" if demo else "",
                    elem_id="model",
                )
                with gr.Row():
                    preset = gr.Dropdown(["official", "paper"], value="official", label="Preset")
                    scale = gr.Slider(1.1, LIMITS.max_scale, value=5.0, step=0.1, label="Guidance scale")
                with gr.Row():
                    steps = gr.Slider(1, LIMITS.max_steps, value=30, step=1, label="Steps", elem_id="steps")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                with gr.Row():
                    height = gr.Number(value=64, precision=0, label="Height", elem_id="height")
                    width = gr.Number(value=64, precision=0, label="Width", elem_id="width")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                downloads = gr.File(
                    label="Downloads (generated size; PNGs carry the settings)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
            with gr.Column(scale=2):
                with gr.Row():
                    cfg_image = gr.Image(label="CFG", elem_id="cfg-image", **image)
                    scfg_image = gr.Image(label="S-CFG", elem_id="scfg-image", **image)
                with gr.Row():
                    with gr.Column():
                        overlay = gr.Image(label="S-CFG regions (last step)", elem_id="regions", **image)
                        legend = gr.HTML(elem_id="regions-legend")
                    with gr.Column():
                        heat = gr.Image(label="Rate map (last step)", elem_id="rate", **image)
                        colorbar = gr.HTML(elem_id="rate-colorbar")
                info = gr.Textbox(label="Regions and rates", elem_id="info")
                animation = gr.Image(
                    label="Regions and rate at every step",
                    elem_id="steps-gif",
                    type="filepath",
                    interactive=False,
                    **_display_only(gr),
                )
        button.click(
            run,
            [model, prompt, negative, preset, scale, steps, seed, height, width],
            [cfg_image, scfg_image, overlay, legend, heat, colorbar, info, animation, downloads],
            concurrency_limit=1,
        )
    app.queue(default_concurrency_limit=1)
    return app


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="scfg ui", description="S-CFG web UI")
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build_app(args.model).launch(server_name=args.host, server_port=args.port)
