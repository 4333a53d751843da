"""The `scfg` command line: `scfg generate` and `scfg compare`. No algorithm here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

from .config import SCFGConfig, SCFGError

__all__ = ["main"]

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-karras": "DPMSolverMultistepScheduler",
    "dpm-single": "DPMSolverSinglestepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
}


def default_model() -> str | None:
    """The model used when `--model` is not given: the demo model shipped in the package, if present."""
    from .demo import shipped_model_path

    return shipped_model_path()


# -- argument parsing ---------------------------------------------------------------------------------------------


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SCFGConfig field, generated from the dataclass so that help text has one source."""
    group = parser.add_argument_group("S-CFG knobs (override the preset; see the README for each)")
    hints = typing.get_type_hints(SCFGConfig)
    for f in dataclasses.fields(SCFGConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        kwargs: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": argparse.SUPPRESS}
        if origin is typing.Literal:
            kwargs["choices"] = list(args)
        elif f.name in ("levels",):
            kwargs.update(type=int, nargs="+")
        elif f.name == "rate_clamp":
            kwargs.update(type=_optional_float, nargs=2, metavar=("LOW", "HIGH"))
        elif int in args or hint is int:
            kwargs["type"] = int
        else:
            kwargs["type"] = _optional_float
        group.add_argument(flag, help=f"default from the preset ({getattr(SCFGConfig(), f.name)!r})", **kwargs)
    group.add_argument("--no-rate-clamp", action="store_true", help="disable the rate clamp")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompt_arg",
        nargs="?",
        metavar="PROMPT",
        help='the prompt (or use --prompt); "a cat:1.5 on a sofa:0.7" scales the guidance of those words',
    )
    parser.add_argument("--prompt", help="the prompt")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--model", default=None, help="hub id or local diffusers folder (default: the shipped demo model)"
    )
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale g (default 7.5)")
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps (default 30)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--preset", choices=["official", "paper"], default="official")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: float16 on cuda, float32 on cpu",
    )
    parser.add_argument("--out", default="out", help="output folder, or a .png path")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    _add_config_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scfg", description="Semantic-aware classifier-free guidance (S-CFG).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images with S-CFG (or plain CFG)")
    _common(gen)
    gen.add_argument("--guidance", choices=["scfg", "cfg"], default="scfg")
    cmp_ = sub.add_parser("compare", help="CFG and S-CFG side by side (same seed) plus the final region map")
    _common(cmp_)
    cmp_.add_argument(
        "--show-regions",
        action="store_true",
        help="also write per-step region maps and rate heatmaps (-steps.png, -steps.gif) and rate curves (-rates.png)",
    )
    bench = sub.add_parser("bench-compositional", help="CFG vs S-CFG on the demo domain, scored exactly")
    bench.add_argument("--model", default=None, help="default: the shipped demo model")
    bench.add_argument("--prompts", type=int, default=60, help="held-out prompts (1-3 objects)")
    bench.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    bench.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    bench.add_argument(
        "--methods",
        nargs="+",
        default=["cfg", "scfg-official", "scfg-paper"],
        choices=["cfg", "scfg-official", "scfg-paper"],
    )
    bench.add_argument("--steps", type=int, default=25)
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--device", default=None)
    bench.add_argument("--out", default="bench", help="folder for results.json, table.md, samples.png")
    ui = sub.add_parser("ui", help="web UI (Gradio): CFG and S-CFG side by side with regions")
    ui.add_argument("--model", default=None, help="default: the shipped demo model")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ev = sub.add_parser("eval", help="generate over prompts x methods x scales, then FID/CLIP reports")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    gen_ev = ev_sub.add_parser("generate", help="generate the run's images (resumable; works under accelerate)")
    gen_ev.add_argument("--model", default=None, help="default: the shipped demo model")
    gen_ev.add_argument("--prompts", required=True, help=".txt/.csv/.jsonl captions, or builtin:compositional")
    gen_ev.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    gen_ev.add_argument(
        "--methods",
        nargs="+",
        default=["cfg", "scfg-official"],
        choices=["cfg", "scfg-official", "scfg-paper", "scfg-mean"],
    )
    gen_ev.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    gen_ev.add_argument("--images-per-prompt", type=int, default=1)
    gen_ev.add_argument("--steps", type=int, default=30)
    gen_ev.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None)
    gen_ev.add_argument("--batch-size", type=int, default=8)
    gen_ev.add_argument("--seed", type=int, default=0, help="base seed; image seeds depend on (prompt, index)")
    gen_ev.add_argument("--height", type=int, default=None)
    gen_ev.add_argument("--width", type=int, default=None)
    gen_ev.add_argument("--device", default=None, help="default: this process's accelerate device")
    gen_ev.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    gen_ev.add_argument("--out", dest="run", required=True, help="run folder (images, manifests)")
    rep = ev_sub.add_parser("report", help="metrics and plots for a run")
    rep.add_argument("--out", dest="run", required=True, help="the run folder of `scfg eval generate`")
    rep.add_argument("--reference", default=None, help="folder of reference images or .npz (mu, sigma) for FID")
    rep.add_argument("--fid-weights", default=None, help="local Inception weights (torch-fidelity .pth) for FID")
    rep.add_argument("--fid-size", type=int, default=299)
    rep.add_argument("--clip-model", default=None, help="local CLIP folder (or hub id) for the CLIP score")
    return parser


def cmd_eval(args: argparse.Namespace) -> None:
    if args.eval_command == "generate":
        import torch
        from accelerate import PartialState

        from .eval.prompts import load_prompts
        from .eval.runner import run_generation

        state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo processes (torchrun/accelerate)
        device = args.device or str(state.device)
        pipe = load_pipeline(args.model, device, args.dtype)
        pipe.set_progress_bar_config(disable=True)
        set_scheduler(pipe, args.scheduler)
        rows = run_generation(
            pipe,
            load_prompts(args.prompts, args.limit),
            args.run,
            args.methods,
            args.scales,
            args.images_per_prompt,
            args.steps,
            args.batch_size,
            args.seed,
            {"height": args.height, "width": args.width},
        )
        if state.is_main_process:
            print(f"{len(rows)} images in {args.run}/manifest.jsonl")
        return
    from .eval.report import build_report

    fid_fn = clip_fn = None
    if args.reference is not None:
        from .eval.metrics import fid

        def fid_fn(paths):
            return fid(paths, args.reference, weights=args.fid_weights, size=args.fid_size)

    if args.clip_model is not None:
        from .eval.metrics import clip_scores

        def clip_fn(paths, prompts):
            return clip_scores(paths, prompts, args.clip_model)

    table = build_report(args.run, fid_fn, clip_fn)
    for entry in table:
        print(json.dumps(entry))
    print(f"written: {args.run}/report.json, report.csv, plots.png, grid.png")


def cmd_bench(args: argparse.Namespace) -> None:
    from .demo.bench import format_table, run_benchmark

    pipe = load_pipeline(args.model, args.device, "float32")
    pipe.set_progress_bar_config(disable=True)
    result = run_benchmark(
        pipe, args.prompts, args.seeds, tuple(args.scales), tuple(args.methods), args.steps, args.batch_size, args.out
    )
    print(format_table(result["table"]))
    print(f"{len(result['rows'])} images in {result['seconds']} s; written to {args.out}/")


def config_from_args(args: argparse.Namespace) -> SCFGConfig:
    # Flags default to SUPPRESS, so only the ones given appear (and "none" can mean None).
    overrides = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(SCFGConfig)
        if hasattr(args, f"cfg_{f.name}")
    }
    if "levels" in overrides:
        overrides["levels"] = tuple(overrides["levels"])
    if "rate_clamp" in overrides:
        overrides["rate_clamp"] = tuple(overrides["rate_clamp"])
    if args.no_rate_clamp:
        overrides["rate_clamp"] = None
    return SCFGConfig.preset(args.preset, **overrides)


# -- running ---------------------------------------------------------------------------------------------------


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None) -> Any:
    """Load a diffusers pipeline from a hub id or a local folder, safetensors only, no remote code."""
    import torch
    from diffusers import DiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(model), "model_index.json")):
        raise SCFGError(
            f"Expected `--model` to be a diffusers folder with a model_index.json, but got {model!r}. "
            "Pass a folder written by `save_pretrained` or a hub id."
        )
    import diffusers
    from packaging.version import Version

    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works there, with a warning)
    dtype_kw = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(
            os.path.expanduser(model) if looks_local else model,
            use_safetensors=True,
            **{dtype_kw: getattr(torch, dtype)},
        )
    except OSError as err:
        raise SCFGError(f"Could not load model {model!r}: {err}. Offline? Pass a local folder instead.") from err
    pipe.to(device)
    pipe.set_progress_bar_config(disable=False, leave=False)
    return pipe


def set_scheduler(pipe: Any, name: str | None) -> None:
    if name is None:
        return
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"use_karras_sigmas": True} if name.endswith("karras") else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _prompt(args: argparse.Namespace) -> str:
    prompt = args.prompt if args.prompt is not None else args.prompt_arg
    if prompt is None:
        raise SCFGError('Expected a prompt, but got none. Pass it as `scfg generate "a red circle"` or --prompt.')
    return prompt


def _output_paths(out: str, stem: str, count: int, overwrite: bool) -> list[Path]:
    target = Path(out)
    if target.suffix.lower() == ".png":
        target.parent.mkdir(parents=True, exist_ok=True)
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i}.png") for i in range(count)]
    else:
        if target.exists() and not target.is_dir():
            raise SCFGError(f"Expected `--out` to be a folder or a .png path, but {out!r} is a file.")
        target.mkdir(parents=True, exist_ok=True)
        paths = [target / f"{stem}-{i}.png" for i in range(count)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise SCFGError(f"Expected new output files, but {existing} exist. Pass --overwrite or another --out.")
    return paths


def _png_info(metadata: dict[str, Any]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    return info


def _generate(pipe: Any, args: argparse.Namespace, prompt: str, config: SCFGConfig | None, on_step=None):
    import torch

    from .integration import enable
    from .tokens import parse_weighted_prompt

    prompt, scales = parse_weighted_prompt(prompt)  # "a cat:1.5 on a sofa": per-word guidance (S-CFG only)

    kwargs = dict(
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.scale,
        num_inference_steps=args.steps,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    )
    kwargs["prompt"] = prompt
    if config is None:
        return pipe(**kwargs).images
    with enable(pipe, config, on_step=on_step, token_scales=scales or None):
        return pipe(**kwargs).images


def _metadata(args: argparse.Namespace, prompt: str, guidance: str, config: SCFGConfig | None) -> dict[str, Any]:
    from . import __version__

    return {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "guidance": guidance,
        "guidance_scale": args.scale,
        "num_inference_steps": args.steps,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "scfg_config": config.to_dict() if config is not None else None,
        "scfg_version": __version__,
    }


def cmd_generate(args: argparse.Namespace) -> list[Path]:
    prompt = _prompt(args)
    config = config_from_args(args) if args.guidance == "scfg" else None
    paths = _output_paths(args.out, f"{args.guidance}-seed{args.seed}", args.num_images, args.overwrite)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    set_scheduler(pipe, args.scheduler)
    images = _generate(pipe, args, prompt, config)
    info = _png_info(_metadata(args, prompt, args.guidance, config))
    for image, path in zip(images, paths, strict=True):
        image.save(path, pnginfo=info)
        print(path)
    return paths


def cmd_compare(args: argparse.Namespace) -> list[Path]:
    from .diagnostics import Recorder
    from .viz import compare_panel

    prompt = _prompt(args)
    config = config_from_args(args)
    paths = _output_paths(args.out, f"compare-seed{args.seed}", args.num_images, args.overwrite)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    set_scheduler(pipe, args.scheduler)
    cfg_images = _generate(pipe, args, prompt, None)
    recorder = Recorder(max_steps=None if args.show_regions else 1)
    scfg_images = _generate(pipe, args, prompt, config, on_step=recorder)
    last = recorder.steps[-1] if recorder.steps else None
    info = _png_info(_metadata(args, prompt, "compare", config))
    for i, path in enumerate(paths):
        panel = compare_panel(cfg_images[i], scfg_images[i], last, i, args.scale)
        panel.save(path, pnginfo=info)
        print(path)
        if args.show_regions and recorder.steps:
            from .viz import rate_curves, save_step_animation, step_grid

            stem = path.with_suffix("")
            step_grid(recorder.steps, i).save(f"{stem}-steps.png")
            save_step_animation(recorder.steps, f"{stem}-steps.gif", i)
            rate_curves(recorder.steps, i).save(f"{stem}-rates.png")
            print(f"{stem}-steps.png\n{stem}-steps.gif\n{stem}-rates.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "ui":
        from .ui import main as ui_main

        ui_main([*(["--model", args.model] if args.model else []), "--host", args.host, "--port", str(args.port)])
        return 0
    if getattr(args, "model", "") is None:
        args.model = default_model()
        if args.model is None:
            parser.error("--model is required (no demo model is installed): a hub id or a local diffusers folder")
    try:
        if args.command == "generate":
            cmd_generate(args)
        elif args.command == "compare":
            cmd_compare(args)
        elif args.command == "eval":
            cmd_eval(args)
        else:
            cmd_bench(args)
    except SCFGError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
