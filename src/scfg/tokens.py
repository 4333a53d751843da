"""Per-word guidance control: the `word:scale` prompt syntax and mapping words to token positions.

`"a cat:1.5 on a sofa:0.7"` means: generate "a cat on a sofa", and multiply the guidance of the regions owned by
the tokens of that "cat" by 1.5 and of that "sofa" by 0.7. In Python, `token_scales={"cat": 1.5}` scales every
occurrence of "cat". A word the tokenizer splits into several tokens scales all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import SCFGError

__all__ = ["WordScale", "parse_weighted_prompt", "token_scale_tensor"]

_WEIGHTED = re.compile(r"(?P<word>[^\s:]+):(?P<scale>[-+]?(?:\d+\.?\d*|\.\d+))(?=\s|$|[,.;!?])")


@dataclass(frozen=True)
class WordScale:
    """A guidance multiplier for a word; `occurrence` (0-based) picks one occurrence, `None` means all."""

    word: str
    scale: float
    occurrence: int | None = None


def parse_weighted_prompt(text: str) -> tuple[str, list[WordScale]]:
    """Split `"a cat:1.5 on a sofa:0.7"` into the plain prompt and the per-word scales.

    >>> parse_weighted_prompt("a cat:1.5 on a cat:0.5 sofa")
    ('a cat on a cat sofa', [WordScale(word='cat', scale=1.5, occurrence=0), WordScale(word='cat', scale=0.5, occurrence=1)])
    """
    scales: list[WordScale] = []
    pieces: list[str] = []
    position = 0
    for match in _WEIGHTED.finditer(text):
        word = match.group("word")
        scale = float(match.group("scale"))
        if not math.isfinite(scale) or scale < 0:
            raise SCFGError(f"Expected a scale >= 0 after `{word}:`, but got {match.group('scale')!r}.")
        pieces.append(text[position : match.start()] + word)
        position = match.end()
        prefix = "".join(pieces)
        occurrence = len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", prefix.lower())) - 1
        scales.append(WordScale(word, scale, occurrence))
    pieces.append(text[position:])
    return "".join(pieces), scales


def _word_spans(tokenizer: Any, ids: list[int], word: str) -> list[list[int]]:
    """Token positions of each occurrence of `word` in the token id sequence `ids`."""
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    if not pieces:
        return []
    n = len(pieces)
    return [list(range(i, i + n)) for i in range(len(ids) - n + 1) if ids[i : i + n] == pieces]


def token_scale_tensor(
    segments: Sequence[tuple[Any, torch.Tensor]],
    prompts: Sequence[str],
    scales: Mapping[str, float] | Sequence[WordScale],
) -> torch.Tensor:
    """Return `[P, T]` multipliers per prompt token: the word's scale on its tokens, NaN where none is set.

    Args:
        segments: `(tokenizer, token_ids [P, T_k])` for each consecutive part of the text sequence the denoiser
            sees (one for CLIP models; SD3 has a CLIP part and a T5 part, `Σ T_k = T`).
        prompts: the `P` prompts of the call.
        scales: `{"word": scale}` (every occurrence) or `WordScale`s (one occurrence each, counted per part).

    Raises:
        SCFGError: a word occurs in none of the prompts; the message lists each prompt's words.
    """
    items = [WordScale(w, float(s)) for w, s in scales.items()] if isinstance(scales, Mapping) else list(scales)
    parts = []
    found = {i: False for i in range(len(items))}
    for tokenizer, token_ids in segments:
        out = torch.full(token_ids.shape, float("nan"), dtype=torch.float32)
        for i, item in enumerate(items):
            if not math.isfinite(item.scale) or item.scale < 0:
                raise SCFGError(f"Expected the scale of `{item.word}` to be >= 0, but got {item.scale!r}.")
            for row, ids in enumerate(token_ids.tolist()):
                spans = _word_spans(tokenizer, ids, item.word)
                if item.occurrence is not None:
                    spans = spans[item.occurrence : item.occurrence + 1]
                for span in spans:
                    out[row, span] = item.scale
                    found[i] = True
        parts.append(out)
    for i, item in enumerate(items):
        if not found[i]:
            words = sorted({w for p in prompts for w in re.findall(r"[^\s,.;!?]+", p)})
            raise SCFGError(
                f"Expected `{item.word}` to be a word of the prompt, but it is not (or was cut off at the "
                f"tokenizer's length). The prompt's words are: {', '.join(words)}."
            )
    return torch.cat(parts, dim=1)
