"""`scfg ui`: a Gradio app that shows CFG and S-CFG side by side with the regions and the rate map.

Install with `pip install "semantic-cfg[ui]"`. Runs on the shipped demo model by default. Generation requests
queue with concurrency 1 per loaded model; inputs are bounded (size, steps, prompt length) with clear messages.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

from .config import SCFGConfig, SCFGError

__all__ = ["LIMITS", "build_app", "generate_pair", "main"]


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
):
    """CFG image, S-CFG image, region overlay (last step) and rate heatmap for one prompt and seed.

    `prompt` may carry per-word scales (`"a cat:1.5 on a sofa"`); they apply to the S-CFG image.
    """
    import torch
    from PIL import Image

    from .diagnostics import Recorder
    from .integration import enable
    from .tokens import parse_weighted_prompt
    from .viz import rate_heatmap, region_map

    text, scales = parse_weighted_prompt(prompt)
    kwargs = dict(
        negative_prompt=negative_prompt or None,
        guidance_scale=scale,
        num_inference_steps=steps,
        height=height,
        width=width,
    )

    accepts_callback = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters

    def report(label: str, offset: float) -> dict[str, Any]:
        def callback(pipeline, step, timestep, callback_kwargs):
            if progress is not None:
                progress((offset + (step + 1) / steps) / 2, desc=f"{label}: step {step + 1}/{steps}")
            return callback_kwargs

        # pipelines without step-end callbacks (DeepFloyd IF) run without per-step progress
        return {"callback_on_step_end": callback} if accepts_callback else {}

    cfg = pipe(text, generator=torch.Generator("cpu").manual_seed(seed), **report("CFG", 0), **kwargs).images[0]
    recorder = Recorder(max_steps=1)
    with enable(pipe, SCFGConfig.preset(preset), on_step=recorder, token_scales=scales or None):
        scfg = pipe(text, generator=torch.Generator("cpu").manual_seed(seed), **report("S-CFG", 1), **kwargs).images[0]
    last = recorder.steps[-1]
    regions, legend = region_map(last, 0, scfg.size)
    overlay = Image.blend(scfg.convert("RGB"), regions, 0.45)
    heat = rate_heatmap(last, 0, scfg.size)
    words = ", ".join(f"{label} {share:.0%}" for label, _, share in legend[:8])
    rate = last.rate_map[0]
    info = f"regions: {words} | rate min {float(rate.min()):.2f}, mean {float(rate.mean()):.2f}, max {float(rate.max()):.2f}"
    return cfg, scfg, overlay, heat, info


def build_app(default_model: str | None = None):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    from .cli import default_model as shipped

    models = _Models()
    model_default = default_model or shipped() or ""

    def run(model, prompt, negative_prompt, preset, scale, steps, seed, height, width, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        try:
            validate(prompt, int(height), int(width), int(steps), float(scale))
            if not model:
                raise SCFGError("Expected a model: a local diffusers folder or a hub id.")
            pipe, lock = models.get(model)
            with lock:  # one generation at a time per model
                return generate_pair(
                    pipe,
                    prompt,
                    negative_prompt,
                    preset,
                    float(scale),
                    int(steps),
                    int(seed),
                    int(height),
                    int(width),
                    progress,
                )
        except SCFGError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="S-CFG: semantic-aware classifier-free guidance") as app:
        gr.Markdown(
            "## S-CFG vs CFG\nSame seed, same scale. Per-word guidance: write `word:1.5` in the prompt, "
            "e.g. `a red circle:1.5 left of a blue square`."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt",
                    value="a small red circle left of a large blue square",
                    elem_id="prompt",
                    max_lines=3,
                )
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                model = gr.Textbox(label="Model (local folder or hub id)", value=model_default, elem_id="model")
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
            with gr.Column():
                with gr.Row():
                    cfg_image = gr.Image(label="CFG", elem_id="cfg-image", type="pil", height=240)
                    scfg_image = gr.Image(label="S-CFG", elem_id="scfg-image", type="pil", height=240)
                with gr.Row():
                    overlay = gr.Image(label="S-CFG regions (last step)", elem_id="regions", type="pil", height=240)
                    heat = gr.Image(label="Rate map (blue low, red high)", elem_id="rate", type="pil", height=240)
                info = gr.Textbox(label="Regions and rates", elem_id="info")
        button.click(
            run,
            [model, prompt, negative, preset, scale, steps, seed, height, width],
            [cfg_image, scfg_image, overlay, heat, info],
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
