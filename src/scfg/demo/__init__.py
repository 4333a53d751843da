"""The demo model: a small text-to-image model trained here on procedural compositional scenes."""

from __future__ import annotations

from pathlib import Path

__all__ = ["shipped_model_path"]

MODEL_DIR = Path(__file__).parent / "model"


def shipped_model_path() -> str | None:
    """The folder of the demo model installed with the package (a StableDiffusionPipeline), or None."""
    return str(MODEL_DIR) if (MODEL_DIR / "model_index.json").is_file() else None
