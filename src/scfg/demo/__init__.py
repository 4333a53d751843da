"""The demo models: small text-to-image models trained here on procedural compositional scenes.

Two ship with the package: `shapes` (the default: flat shapes on white) and `scenes` (shapes on named textured
backgrounds, cross-attention on a 16x16 grid). Every command's `--model demo:shapes` / `--model demo:scenes` names
them (`resolve_model`); `--model` left out is `shapes`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_MODELS", "DemoDomain", "demo_domain", "resolve_model", "shipped_model_name", "shipped_model_path"]

MODEL_DIR = Path(__file__).parent / "model"
# the shipped demo models by name, the first the default
DEMO_MODELS: dict[str, Path] = {"shapes": MODEL_DIR, "scenes": Path(__file__).parent / "model-scenes"}


def shipped_model_path(name: str = "shapes") -> str | None:
    """The folder of the demo model `name` (`DEMO_MODELS`) installed with the package (a StableDiffusionPipeline), or
    None where it is not installed."""
    if name not in DEMO_MODELS:
        raise ValueError(f"Expected a demo model among {sorted(DEMO_MODELS)}, but got {name!r}.")
    folder = DEMO_MODELS[name]
    return str(folder) if (folder / "model_index.json").is_file() else None


def resolve_model(model: str | None) -> str | None:
    """A command's `--model`: None is the default demo model (None where it is not installed), `demo:<name>` a
    shipped one's folder (an `SCFGError` naming the folder where that one is not installed), anything else (a folder,
    a hub id) is returned as given."""
    from ..config import SCFGError

    if model is None:
        return shipped_model_path()
    if not model.startswith("demo:"):
        return model
    name = model.removeprefix("demo:")
    if name not in DEMO_MODELS:
        choices = ", ".join(f"demo:{n}" for n in DEMO_MODELS)
        raise SCFGError(f"Expected a shipped demo model ({choices}), but got {model!r}.")
    folder = shipped_model_path(name)
    if folder is None:
        raise SCFGError(
            f"Expected the `{name}` demo model in {DEMO_MODELS[name]}, but it is not installed there. Export one "
            f"(`python -m scfg.demo.train --recipe {name} --export ...`) or pass another `--model`."
        )
    return folder


def shipped_model_name(model: str | None) -> str | None:
    """`scfg-demo` (the default) or `scfg-demo-<name>` where `model` is a shipped demo model's folder, else None."""
    if model is None or not Path(model).expanduser().is_dir():
        return None
    resolved = Path(model).expanduser().resolve()
    for index, (name, folder) in enumerate(DEMO_MODELS.items()):
        if resolved == folder.resolve():
            return "scfg-demo" if index == 0 else f"scfg-demo-{name}"
    return None


@dataclass(frozen=True)
class DemoDomain:
    """What a demo model was trained on (`scfg.demo.train`'s recipe) and the S-CFG `levels` its cross-attention has.

    Attributes:
        recipe: `"shapes"` (objects on white) or `"scenes"` (objects on named textured backgrounds).
        backgrounds: the backgrounds its captions name (`scfg.demo.data.BACKGROUNDS`), or None for `shapes`.
        levels: S-CFG's `levels=` for it: `(4, 8)` for `shapes`, `(1, 2)` for `scenes` (a 16x16 latent).
    """

    recipe: str
    backgrounds: tuple[str, ...] | None
    levels: tuple[int, ...]


def demo_domain(folder: str | Path | None) -> DemoDomain | None:
    """The `DemoDomain` of a model folder exported by `scfg.demo.train` (read from its `training_state.json`), or
    None for any other model or hub id."""
    if folder is None:
        return None
    state_file = Path(folder).expanduser() / "training_state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    recipe = state.get("recipe", "shapes")  # exports from before the recipes are `shapes`
    from .data import BACKGROUNDS

    return DemoDomain(
        recipe=recipe,
        backgrounds=tuple(BACKGROUNDS) if recipe == "scenes" else None,
        levels=tuple(int(n) for n in state.get("scfg_levels", (4, 8))),
    )
