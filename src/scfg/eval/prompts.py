"""Prompt sets: a text, CSV or JSON-lines file of captions, or the built-in compositional set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..config import SCFGError

__all__ = ["load_prompts"]

_FIELDS = ("caption", "prompt", "text")


def load_prompts(source: str, limit: int | None = None, backgrounds: tuple[str, ...] | None = None) -> list[str]:
    """Load captions from `source`.

    `source` is a `.txt` file (one caption per line), a `.csv` file (a `caption`, `prompt` or `text` column, else
    the first column), a `.jsonl` file (one object per line with one of those fields, e.g. COCO captions you
    exported), or `builtin:compositional` (the demo domain's held-out set; with `backgrounds`, the `scenes` domain's
    captions, each naming one: `scfg.demo.demo_domain(model).backgrounds`). `limit` keeps the first `limit`.
    """
    if source.startswith("builtin:compositional"):
        from ..demo.bench import held_out_prompts

        return held_out_prompts(limit or 60, backgrounds=backgrounds)
    path = Path(source)
    if not path.is_file():
        raise SCFGError(
            f"Expected `--prompts` to be a .txt/.csv/.jsonl file or builtin:compositional, got {source!r}."
        )
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            field = next((f for f in _FIELDS if f in row), None)
            if field is None:
                raise SCFGError(f"Expected a field in {_FIELDS} on line {number} of {source}, but got {sorted(row)}.")
            prompts.append(str(row[field]))
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            field = next((f for f in _FIELDS if f in (reader.fieldnames or [])), (reader.fieldnames or [None])[0])
            prompts = [row[field] for row in reader if row.get(field)]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SCFGError(f"Expected at least one caption in {source}, but found none.")
    return prompts[:limit] if limit else prompts
