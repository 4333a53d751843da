"""The demo model: a small text-to-image model trained here on procedural compositional scenes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoDomain", "demo_domain", "shipped_model_path"]

MODEL_DIR = Path(__file__).parent / "model"


def shipped_model_path() -> str | None:
    """The folder of the demo model installed with the package (a StableDiffusionPipeline), or None."""
    return str(MODEL_DIR) if (MODEL_DIR / "model_index.json").is_file() else None


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
