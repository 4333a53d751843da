"""The `scfg` command line: `scfg generate` and `scfg compare`. No algorithm here."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import PRESETS, SCFGConfig, SCFGError
from .eval.methods import METHODS

__all__ = ["main"]

logger = logging.getLogger("scfg.cli")  # also when run as `python -m scfg.cli` (__main__)

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


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `error: <message> (see scfg <command> --help)`, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {_one_line(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the (sub)command they were given to, so that the hint names its --help
            getattr(parsed, "command_parser", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SCFGConfig field, generated from the dataclass so that help text has one source."""
    group = parser.add_argument_group("S-CFG knobs (override the preset; see the README for each)")
    hints = typing.get_type_hints(SCFGConfig)
    for f in dataclasses.fields(SCFGConfig):
        if f.name == "preset_name":  # --preset
            continue
        flag = "--" + f.name.replace("_", "-")
        parts = _union_parts(hints[f.name])
        literals = [c for p in parts if typing.get_origin(p) is typing.Literal for c in typing.get_args(p)]
        choices = [c for c in literals if c != "auto"]  # "auto" (not set) is what leaving the flag out means
        optional = type(None) in parts
        kwargs: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": argparse.SUPPRESS}
        if choices:
            kwargs["choices"] = choices
        elif f.name == "levels":
            kwargs.update(type=int, nargs="+")
        elif f.name == "rate_clamp":
            kwargs.update(type=_clamp_bound, nargs=2, metavar=("LOW", "HIGH"))
        elif int in parts:
            kwargs["type"] = _optional_int if optional else int
        else:
            kwargs["type"] = _optional_float if optional else float
        if "type" in kwargs and "metavar" not in kwargs:
            kwargs["metavar"] = f.name.upper()
        value = getattr(PRESETS["official"], f.name)
        help_text = f"default: from the preset and the model family ({value!r} in 'official')"
        if optional and kwargs.get("type") in (_optional_int, _optional_float):
            help_text += "; none for None"
        group.add_argument(flag, help=help_text, **kwargs)
    group.add_argument("--no-rate-clamp", action="store_true", help="disable the rate clamp")


def _union_parts(hint: Any) -> tuple[Any, ...]:
    """The members of a union type hint (`int | None` -> (int, NoneType)), or the hint itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _optional_float(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, but got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, but got {text!r}") from None


def _clamp_bound(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers LOW HIGH, but got {text!r}. Use --no-rate-clamp to disable the clamp, or two numbers"
        ) from None


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
        "--model",
        default=None,
        help="hub id, local diffusers folder, or a shipped demo model: demo:shapes (the default), demo:scenes",
    )
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale g (default 7.5)")
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps (default 30)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="video models: frames to generate (writes .mp4, or .gif with --out x.gif); default: an image",
    )
    parser.add_argument("--fps", type=int, default=16, help="frames per second of a written video (default 16)")
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
    parser = _Parser(prog="scfg", description="Semantic-aware classifier-free guidance (S-CFG).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress, and tracebacks of errors")
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
    bench.add_argument("--model", default=None, help="default: demo:shapes, the shipped demo model (or demo:scenes)")
    bench.add_argument("--prompts", type=int, default=60, help="held-out prompts (1-3 objects)")
    bench.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    bench.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    bench.add_argument(
        "--methods",
        nargs="+",
        default=["cfg", "scfg-official", "scfg-paper"],
        choices=list(METHODS),
        help="scfg-mean, -no-completion, -power-mean, -words and -no-clamp are ablations of scfg-official",
    )
    bench.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the captions (0: none)")
    bench.add_argument(
        "--no-fidelity", action="store_true", help="skip the Fréchet distance (the domain's FID, scfg.demo.fidelity)"
    )
    bench.add_argument("--steps", type=int, default=25)
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--device", default=None)
    bench.add_argument("--out", default="bench", help="folder for results.json, table.md, samples.png, curves.png")
    bench.add_argument("--overwrite", action="store_true", help="replace results of an earlier run in --out")
    ui = sub.add_parser("ui", help="web UI (Gradio): CFG and S-CFG side by side with regions")
    ui.add_argument("--model", default=None, help="default: demo:shapes, the shipped demo model (or demo:scenes)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ev = sub.add_parser("eval", help="generate over prompts x methods x scales, then FID/CLIP reports")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    gen_ev = ev_sub.add_parser("generate", help="generate the run's images (resumable; works under accelerate)")
    gen_ev.add_argument("--model", default=None, help="default: demo:shapes, the shipped demo model (or demo:scenes)")
    gen_ev.add_argument("--prompts", required=True, help=".txt/.csv/.jsonl captions, or builtin:compositional")
    gen_ev.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    gen_ev.add_argument(
        "--methods",
        nargs="+",
        default=["cfg", "scfg-official"],
        choices=list(METHODS),
        help="scfg-mean, -no-completion, -power-mean, -words and -no-clamp are ablations of scfg-official",
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
    rep.add_argument(
        "--demo-metrics",
        action="store_true",
        help="for builtin:compositional on a demo model: the domain's fd (its FID) and exact scores (its CLIP score)",
    )
    for command_parser in (gen, cmp_, bench, ui, gen_ev, rep):
        command_parser.set_defaults(command_parser=command_parser)
    return parser


# -- validation: every bad input is one `SCFGError` naming its flag, before any output or model loading -----------

_COUNTS = {  # dest -> flag; the integer flags that must be >= 1
    "steps": "--steps",
    "num_images": "--num-images",
    "images_per_prompt": "--images-per-prompt",
    "batch_size": "--batch-size",
    "seeds": "--seeds",
    "limit": "--limit",
    "fid_size": "--fid-size",
    "frames": "--frames",
    "fps": "--fps",
}
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def validate_args(args: argparse.Namespace) -> None:
    """Check the generation flags the command has (steps, scales, counts, sizes, seed, device); raise `SCFGError`
    naming the flag. Called before any output is planned or the model is loaded."""
    counts = {dest: flag for dest, flag in _COUNTS.items() if getattr(args, dest, None) is not None}
    if args.command == "bench-compositional":
        counts["prompts"] = "--prompts"
    for dest, flag in counts.items():
        value = getattr(args, dest)
        if value < 1:
            raise SCFGError(f"Expected `{flag}` to be an integer >= 1, but got {value}. Pass {flag} 1 or more.")
    scales = [args.scale] if hasattr(args, "scale") else list(getattr(args, "scales", []))
    for scale in scales:
        if not math.isfinite(scale):
            flag = "--scale" if hasattr(args, "scale") else "--scales"
            raise SCFGError(f"Expected `{flag}` to be a finite number, but got {scale}. Pass e.g. {flag} 7.5.")
    for flag in ("height", "width"):
        value = getattr(args, flag, None)
        if value is not None and (value < 8 or value % 8):
            raise SCFGError(
                f"Expected `--{flag}` to be a positive multiple of 8, but got {value}. "
                f"Pass e.g. --{flag} {max(8, round(value / 8) * 8)}, or leave it out for the model's size."
            )
    seed = getattr(args, "seed", None)
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise SCFGError(f"Expected `--seed` to fit in 64 bits, but got {seed}. Pass a smaller seed such as 0.")
    if getattr(args, "device", None) is not None:
        _check_device(args.device)


def _check_device(text: str) -> None:
    """Raise unless `text` is a device string torch parses (`cpu`, `cuda`, `cuda:1`, `mps`) and that is present."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise SCFGError(
            f"Expected `--device` to be a torch device such as cpu, cuda or cuda:1, but got {text!r}. "
            "Pass one of those, or leave it out to use cuda if available, else cpu."
        ) from None
    if device.type == "cpu":
        return
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available"):
            raise SCFGError(
                f"Expected `--device` to be cpu, cuda, mps or another accelerator torch runs on, but got {text!r}. "
                "Pass one of those, or leave it out."
            )
        available = backend.is_available()
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        raise SCFGError(
            f"Expected `--device {text}` to be available, but this torch ({torch.__version__}) sees no "
            f"{device.type} device. Pass --device cpu, or install a torch build with {device.type} support."
        )
    if device.index is not None and device.index >= count:
        raise SCFGError(
            f"Expected `--device` to name one of the {count} {device.type} devices (0 to {count - 1}), but got "
            f"{text!r}. Pass an index below {count}."
        )


def _check_size_for_model(pipe: Any, args: argparse.Namespace) -> None:
    """Raise unless --height/--width are multiples of the model's VAE downsampling factor (if it has one)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    if not isinstance(factor, int) or factor <= 1:
        return
    for flag in ("height", "width"):
        value = getattr(args, flag, None)
        if value is not None and value % factor:
            raise SCFGError(
                f"Expected `--{flag}` to be a multiple of {factor} for this model (its VAE downsamples by {factor}), "
                f"but got {value}. Pass e.g. --{flag} {max(factor, round(value / factor) * factor)}."
            )


def _require_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SCFGError(
            f'Expected matplotlib for `{flag}`, but it is not installed. Run `pip install "semantic-cfg[viz]"`, '
            f"or drop {flag}."
        ) from None


def _config(args: argparse.Namespace) -> SCFGConfig:
    """`config_from_args`, with errors naming the flags (`--rate-clamp`) rather than the fields (`rate_clamp`). A demo
    model folder's own `levels` (`scfg.demo.demo_domain`: `(1, 2)` for the `scenes` model) apply unless `--levels`
    is given."""
    from .demo import demo_domain

    try:
        config = config_from_args(args)
        domain = demo_domain(getattr(args, "model", None))
        if domain is not None and not hasattr(args, "cfg_levels"):
            config = dataclasses.replace(config, levels=domain.levels)
        return config
    except SCFGError as err:
        message = str(err)
        for f in dataclasses.fields(SCFGConfig):
            message = message.replace(f"`{f.name}`", f"`--{f.name.replace('_', '-')}`")
        raise SCFGError(message) from err


def _check_writable(paths: list[Path], overwrite: bool, flag: str = "--out") -> None:
    """Raise if a path exists (unless `overwrite`), is a folder, or could not be created: the nearest existing
    folder above it must be a writable folder. Creates nothing."""
    existing = [str(p) for p in paths if p.exists() and not p.is_dir()]
    if existing and not overwrite:
        raise SCFGError(f"Expected new output files, but {existing} exist. Pass --overwrite or another {flag}.")
    for path in paths:
        if path.is_dir():
            raise SCFGError(
                f"Expected `{flag}` to leave room for the file {str(path)!r}, but it is a folder. Pass another {flag}."
            )
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise SCFGError(
                f"Expected `{flag}` to be under a folder, but {str(ancestor)!r} is a file. Pass another {flag}."
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise SCFGError(
                f"Expected `{flag}` to be writable, but the folder {str(ancestor)!r} is not. Pass another {flag} "
                "or change the folder's permissions."
            )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def cmd_eval(args: argparse.Namespace) -> None:
    if args.eval_command == "generate":
        import torch
        from accelerate import PartialState

        from .demo import demo_domain
        from .eval.prompts import load_prompts
        from .eval.runner import run_generation

        validate_args(args)
        domain = demo_domain(args.model)  # a demo model: its captions' backgrounds and S-CFG's levels for it
        prompts = load_prompts(args.prompts, args.limit, None if domain is None else domain.backgrounds)
        _check_writable([Path(args.run) / "manifest.jsonl"], overwrite=True)  # resumable: the run folder is reused
        state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo processes (torchrun/accelerate)
        device = args.device or str(state.device)
        pipe = load_pipeline(args.model, device, args.dtype)
        _check_size_for_model(pipe, args)
        pipe.set_progress_bar_config(disable=True)
        set_scheduler(pipe, args.scheduler)
        rows = run_generation(
            pipe,
            prompts,
            args.run,
            args.methods,
            args.scales,
            args.images_per_prompt,
            args.steps,
            args.batch_size,
            args.seed,
            {"height": args.height, "width": args.width},
            levels=None if domain is None else domain.levels,
        )
        if state.is_main_process:
            print(f"{len(rows)} images in {args.run}/manifest.jsonl")
        return
    from .eval.report import build_report

    validate_args(args)
    fid_fn = clip_fn = None
    if args.reference is not None:
        from .eval.metrics import fid

        def fid_fn(paths):
            return fid(paths, args.reference, weights=args.fid_weights, size=args.fid_size)

    if args.clip_model is not None:
        from .eval.metrics import clip_scores

        def clip_fn(paths, prompts):
            return clip_scores(paths, prompts, args.clip_model)

    demo_fn = None
    if args.demo_metrics:
        from .eval.metrics import demo_metrics as demo_fn
    table = build_report(args.run, fid_fn, clip_fn, demo_fn=demo_fn)
    for entry in table:
        print(json.dumps(entry))
    print(f"written: {args.run}/report.json, report.csv, plots.png, grid.png")


def cmd_bench(args: argparse.Namespace) -> None:
    from .demo import demo_domain
    from .demo.bench import format_table, run_benchmark

    validate_args(args)
    names = ("results.json", "table.md", "samples.png", "curves.png")
    _check_writable([Path(args.out) / name for name in names], args.overwrite)
    pipe = load_pipeline(args.model, args.device, "float32")
    pipe.set_progress_bar_config(disable=True)
    result = run_benchmark(
        pipe,
        args.prompts,
        args.seeds,
        tuple(args.scales),
        tuple(args.methods),
        args.steps,
        args.batch_size,
        args.out,
        domain=demo_domain(args.model),
        fidelity=None if args.no_fidelity else "shipped",
        resamples=args.resamples,
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


def _output_paths(
    out: str, stem: str, count: int, extras: tuple[str, ...] = (), video: bool = False
) -> tuple[list[Path], list[Path]]:
    """The files a command writes (one PNG per image, one .mp4 or .gif per video) and, per file, its companions
    (`<stem><extra>`). Creates nothing: `_check_writable` checks them all before anything is generated."""
    target = Path(out)
    suffixes = (".mp4", ".gif") if video else (".png",)
    if target.suffix.lower() in suffixes:
        suffix = target.suffix.lower()
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i}{suffix}") for i in range(count)]
    else:
        if target.suffix.lower() in (".png", ".mp4", ".gif"):
            kind = "a video (--frames): a folder, .mp4 or .gif" if video else "an image: a folder or a .png"
            raise SCFGError(f"Expected `--out` for {kind} path, but got {out!r}. Pass another --out.")
        if target.exists() and not target.is_dir():
            raise SCFGError(
                f"Expected `--out` to be a folder or a {'/'.join(suffixes)} path, but {out!r} is a file. Pass another "
                "--out."
            )
        paths = [target / f"{stem}-{i}{suffixes[0]}" for i in range(count)]
    companions = [Path(f"{path.with_suffix('')}{extra}") for path in paths for extra in extras]
    return paths, companions


@contextlib.contextmanager
def _new_file(path: Path, overwrite: bool) -> Iterator[typing.BinaryIO]:
    """Open `path` for writing (creating its folders); never replaces a file without `overwrite`, not even one
    that appeared while generating."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file = open(path, "wb" if overwrite else "xb")  # closed by the `with` below
    except FileExistsError:
        raise SCFGError(
            f"Expected new output files, but {str(path)!r} appeared while generating. Pass --overwrite or another --out."
        ) from None
    with file:
        yield file


def _resolved(pipe: Any, config: SCFGConfig | None) -> SCFGConfig | None:
    from .integration import resolve_config

    return None if config is None else resolve_config(pipe, config)


def _png_info(metadata: dict[str, Any]):
    """PNG text chunks: `parameters`, the A1111-style infotext that image browsers read (`_infotext`), and
    `scfg`, the full `metadata` as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", _infotext(metadata))
    info.add_text("scfg", json.dumps(metadata, sort_keys=True))
    return info


def _infotext(metadata: dict[str, Any]) -> str:
    """`metadata` as AUTOMATIC1111's infotext: the prompt; `Negative prompt: ...` if there is one; then one line of
    `key: value` fields (`Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 64x64, Model: ...`) followed by
    the S-CFG settings (`S-CFG: official, S-CFG rate clamp: 0.8-3.0, ...`). Values with a comma, colon or newline
    are JSON-quoted, as A1111 does; unknown ones (no scheduler, no size) are left out."""
    config = metadata["scfg_config"]
    fields: dict[str, Any] = {
        "Steps": metadata["num_inference_steps"],
        "Sampler": metadata["sampler"],
        "CFG scale": metadata["guidance_scale"],
        "Seed": metadata["seed"],
        "Size": f"{metadata['width']}x{metadata['height']}" if metadata["width"] and metadata["height"] else None,
        "Model": metadata["model_name"],
        "S-CFG": "off" if config is None else config["preset_name"],
    }
    if metadata["guidance"] == "compare":
        fields["S-CFG panel"] = "CFG | S-CFG | regions"
    for name, value in (config or {}).items():
        if name == "preset_name":
            continue
        if name == "rate_clamp" and value is not None:
            value = f"{value[0]}-{value[1]}"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        fields[f"S-CFG {name.replace('_', ' ')}"] = "none" if value is None else value
    fields["S-CFG version"] = metadata["scfg_version"]

    def quote(value: Any) -> str:
        text = str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    lines = [metadata["prompt"]]
    if metadata["negative_prompt"]:
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def _generate(pipe: Any, args: argparse.Namespace, prompt: str, config: SCFGConfig | None, on_step=None):
    from contextlib import nullcontext

    import torch

    from .integration import enable, guidance
    from .tokens import parse_weighted_prompt

    prompt, scales = parse_weighted_prompt(prompt)  # "a cat:1.5 on a sofa": per-word guidance (S-CFG only)

    kwargs = dict(
        prompt=prompt,
        num_inference_steps=args.steps,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    )
    frames = getattr(args, "frames", None)
    if frames is not None:  # a video pipeline: clips of frames, one per video
        kwargs.update(num_frames=frames, output_type="np")
        kwargs["num_videos_per_prompt"] = kwargs.pop("num_images_per_prompt")
    scope = nullcontext() if config is None else enable(pipe, config, on_step=on_step, token_scales=scales or None)
    with guidance(pipe, args.scale, args.negative_prompt) as arguments, scope:
        output = pipe(**kwargs, **arguments)
    return list(output.frames) if frames is not None else output.images


# diffusers scheduler -> the sampler name in A1111 infotext (diffusers' scheduler docs give the same mapping)
_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
}


def _metadata(
    args: argparse.Namespace,
    prompt: str,
    guidance: str,
    config: SCFGConfig | None,
    pipe: Any = None,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """What a PNG records (`_png_info`): the arguments, the resolved S-CFG config, the scheduler the pipeline ran
    (`sampler`, A1111's name) and the generated `size` (width, height; the flags' values without it)."""
    from . import __version__

    scheduler = getattr(pipe, "scheduler", None)
    sampler = type(scheduler).__name__ if scheduler is not None else None
    sampler = _SAMPLERS.get(sampler, sampler)
    if sampler is not None and getattr(scheduler, "config", {}).get("use_karras_sigmas"):
        sampler += " Karras"
    from .demo import shipped_model_name

    model = args.model
    if (shipped := shipped_model_name(model)) is not None:
        model_name = shipped
    elif model is not None and os.path.isdir(os.path.expanduser(model)):
        model_name = Path(model).expanduser().resolve().name  # a local folder's name, not the user's path
    else:
        model_name = model  # a hub id
    width, height = size if size is not None else (args.width, args.height)
    return {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "model_name": model_name,
        "guidance": guidance,
        "guidance_scale": args.scale,
        "num_inference_steps": args.steps,
        "scheduler": args.scheduler,
        "sampler": sampler,
        "seed": args.seed,
        "height": height,
        "width": width,
        "scfg_config": config.to_dict() if config is not None else None,
        "scfg_version": __version__,
    }


def _check_video(pipe: Any, args: argparse.Namespace, paths: list[Path]) -> None:
    """`--frames` needs a pipeline that takes `num_frames`, and PyAV for .mp4; an image pipeline refuses --frames."""
    import inspect

    takes_frames = "num_frames" in inspect.signature(type(pipe).__call__).parameters
    if args.frames is not None and not takes_frames:
        raise SCFGError(
            f"Expected a video pipeline for `--frames`, but {type(pipe).__name__} generates images. Drop --frames."
        )
    if args.frames is None and takes_frames:
        raise SCFGError(f"Expected `--frames N` for the video pipeline {type(pipe).__name__}, but got none.")


def _require_video_writer(paths: list[Path]) -> None:
    if any(p.suffix.lower() == ".mp4" for p in paths):
        try:
            import av  # noqa: F401
        except ImportError:
            raise SCFGError(
                'Expected PyAV to write .mp4 (`pip install "semantic-cfg[video]"`), but it is not installed. Install '
                "it, or pass --out clip.gif."
            ) from None


def _write_clips(clips: list, paths: list[Path], args: argparse.Namespace, metadata: dict[str, Any]) -> None:
    from .video import write_video

    tags = {"parameters": _infotext(metadata), "scfg": json.dumps(metadata, sort_keys=True)}
    for clip, path in zip(clips, paths, strict=True):
        if path.exists() and not args.overwrite:
            raise SCFGError(
                f"Expected new output files, but {str(path)!r} appeared while generating. Pass --overwrite or another "
                "--out."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(list(clip), path, fps=args.fps, metadata=tags)
        print(path)


def cmd_generate(args: argparse.Namespace) -> list[Path]:
    prompt = _prompt(args)
    config = _config(args) if args.guidance == "scfg" else None
    validate_args(args)
    video = args.frames is not None
    paths, _ = _output_paths(args.out, f"{args.guidance}-seed{args.seed}", args.num_images, video=video)
    _check_writable(paths, args.overwrite)
    if video:
        _require_video_writer(paths)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    _check_video(pipe, args, paths)
    _check_size_for_model(pipe, args)
    config = _resolved(pipe, config)  # the model family's preset values, recorded in the file as used
    set_scheduler(pipe, args.scheduler)
    if video:
        clips = _generate(pipe, args, prompt, config)
        height, width = clips[0].shape[1:3]
        _write_clips(clips, paths, args, _metadata(args, prompt, args.guidance, config, pipe, (width, height)))
        return paths
    images = _generate(pipe, args, prompt, config)
    info = _png_info(_metadata(args, prompt, args.guidance, config, pipe, images[0].size))
    for image, path in zip(images, paths, strict=True):
        with _new_file(path, args.overwrite) as file:
            image.save(file, format="PNG", pnginfo=info)
        print(path)
    return paths


REGION_FILES = ("-steps.png", "-steps.gif", "-rates.png")  # what `compare --show-regions` adds per image


def cmd_compare(args: argparse.Namespace) -> list[Path]:
    from .diagnostics import Recorder
    from .viz import compare_panel

    prompt = _prompt(args)
    config = _config(args)
    validate_args(args)
    if args.frames is not None:
        return _compare_video(args, prompt, config)
    if args.show_regions:
        _require_matplotlib("--show-regions")
    extras = REGION_FILES if args.show_regions else ()
    paths, companions = _output_paths(args.out, f"compare-seed{args.seed}", args.num_images, extras)
    _check_writable(paths + companions, args.overwrite)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    _check_size_for_model(pipe, args)
    config = _resolved(pipe, config)  # the model family's preset values, recorded in the PNG as used
    set_scheduler(pipe, args.scheduler)
    cfg_images = _generate(pipe, args, prompt, None)
    recorder = Recorder(max_steps=None if args.show_regions else 1)
    scfg_images = _generate(pipe, args, prompt, config, on_step=recorder)
    last = recorder.steps[-1] if recorder.steps else None
    info = _png_info(_metadata(args, prompt, "compare", config, pipe, cfg_images[0].size))
    for i, path in enumerate(paths):
        panel = compare_panel(cfg_images[i], scfg_images[i], last, i, args.scale)
        with _new_file(path, args.overwrite) as file:
            panel.save(file, format="PNG", pnginfo=info)
        print(path)
        if args.show_regions and recorder.steps:
            from .viz import rate_curves, save_step_animation, step_grid

            steps_png, steps_gif, rates_png = companions[i * len(extras) : (i + 1) * len(extras)]
            with _new_file(steps_png, args.overwrite) as file:
                step_grid(recorder.steps, i).save(file, format="PNG")
            with _new_file(steps_gif, args.overwrite) as file:
                save_step_animation(recorder.steps, file, i)  # PIL takes the format from the file's name
            with _new_file(rates_png, args.overwrite) as file:
                rate_curves(recorder.steps, i).save(file, format="PNG")
            print(f"{steps_png}\n{steps_gif}\n{rates_png}")
    return paths


def _compare_video(args: argparse.Namespace, prompt: str, config: SCFGConfig) -> list[Path]:
    """`compare --frames N`: CFG | S-CFG | the last step's regions, frame by frame, as one clip per video; with
    `--show-regions`, a `-regions` clip beside it: the region map and the rate map of every frame."""
    import numpy as np
    from PIL import Image

    from .diagnostics import Recorder
    from .viz import rate_heatmap, region_map

    paths, _ = _output_paths(args.out, f"compare-seed{args.seed}", args.num_images, video=True)
    companions = [p.with_name(f"{p.stem}-regions{p.suffix}") for p in paths] if args.show_regions else []
    _check_writable(paths + companions, args.overwrite)
    _require_video_writer(paths)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    _check_video(pipe, args, paths)
    _check_size_for_model(pipe, args)
    config = _resolved(pipe, config)
    set_scheduler(pipe, args.scheduler)
    cfg_clips = _generate(pipe, args, prompt, None)
    recorder = Recorder(max_steps=1)
    scfg_clips = _generate(pipe, args, prompt, config, on_step=recorder)
    last = recorder.steps[-1] if recorder.steps else None
    height, width = cfg_clips[0].shape[1:3]
    metadata = _metadata(args, prompt, "compare", config, pipe, (width, height))

    def as_image(frame: Any) -> Image.Image:
        return Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))

    def regions_of(i: int, f: int, frames: int) -> tuple[Image.Image, Image.Image]:
        # the mask grid has the latent's frames (temporally compressed): video frame f shows latent frame f * F' / F
        report = last.frame(min(last.frames - 1, f * last.frames // frames)) if last.frames else last
        return region_map(report, i, (width, height))[0], rate_heatmap(report, i, (width, height))

    panels, region_clips = [], []
    for i, (cfg_clip, scfg_clip) in enumerate(zip(cfg_clips, scfg_clips, strict=True)):
        frames, clip, regions = len(cfg_clip), [], []
        for f in range(frames):
            parts = [as_image(cfg_clip[f]), as_image(scfg_clip[f])]
            if last is not None:
                region, rate = regions_of(i, f, frames)
                parts.append(region)
                regions.append(np.hstack([np.asarray(region), np.asarray(rate)]))
            clip.append(np.hstack([np.asarray(p.convert("RGB")) for p in parts]))
        panels.append(clip)
        region_clips.append(regions)
    _write_clips(panels, paths, args, metadata)
    if args.show_regions and last is not None:
        _write_clips(region_clips, companions, args, metadata)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the `scfg` command line; return the exit status. Every error is one `error: ...` line on stderr:
    2 for bad input, 1 for anything else (`scfg -v ...` logs its traceback), 130 for Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a parser error, already printed as one line (2)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    logging.basicConfig(format="%(levelname)s %(message)s")
    logging.getLogger("scfg").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        _run(args)
    except SCFGError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); files written so far are kept", file=sys.stderr)
        return 130
    except Exception as err:  # the one place that turns any failure into one line
        logger.info("traceback of the error below", exc_info=err)
        hint = "" if args.verbose else " (run `scfg -v ...` for the traceback)"
        print(f"error: {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    from .demo import resolve_model

    if args.command == "ui":
        from .ui import main as ui_main

        model = resolve_model(args.model) if args.model else None  # an uninstalled demo:<name> is an error here
        ui_main([*(["--model", model] if model else []), "--host", args.host, "--port", str(args.port)])
        return
    if hasattr(args, "model"):
        given = args.model
        args.model = default_model() if given is None else resolve_model(given)  # `demo:scenes`: a shipped folder
        if args.model is None:
            raise SCFGError(
                "Expected `--model`, but got none and no demo model is installed. Pass a hub id or a local "
                "diffusers folder."
            )
    if args.command == "generate":
        cmd_generate(args)
    elif args.command == "compare":
        cmd_compare(args)
    elif args.command == "eval":
        cmd_eval(args)
    else:
        cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
