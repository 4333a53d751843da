"""Per-word guidance control: the `word:scale` prompt syntax and mapping words to token positions.

`"a cat:1.5 on a sofa:0.7"` means: generate "a cat on a sofa", and multiply the guidance of the regions owned by
the tokens of that "cat" by 1.5 and of that "sofa" by 0.7. `"a (fluffy cat:1.5) on a sofa"` scales every word
inside the parentheses. In Python, `token_scales={"cat": 1.5}` scales every occurrence of "cat". A word the
tokenizer splits into several tokens scales all of them.

Grammar of `parse_weighted_prompt` (anything that does not match it stays literal text, exactly as written):

- A *word* is a run of letters and digits, with single `'`, `’`, `-` or `_` allowed between them (`cat`, `cat's`,
  `sci-fi`, `4k`), that contains at least one letter; or a textual-inversion token in angle brackets
  (`<cat-toy>`). `10`, `16` and `3` are not words, so `10:30`, `16:9` and `3:2` stay literal.
- A *scale* is a plain decimal number, `1`, `1.5`, `.5` or `2.`, from 0 to `MAX_TOKEN_SCALE` (100).
- `word:scale` scales that word. The scale follows `word:` directly (no space). The word starts the text or follows
  whitespace or one of `,.;!?(`; the scale ends the text or is followed by whitespace or one of `,.;!?)` (a `.` or
  `,` followed by a digit does not end it: `cat:2,5` and `cat:1.5.5` stay literal). In `a cat:2.` the final `.`
  ends the sentence and stays in the prompt.
- `(some words:scale)` (A1111 style) scales every word inside the parentheses; the parentheses and `:scale` are
  removed, the text inside is kept as written (a `cat:2` inside a group stays literal). The group must hold a word
  and stand where a word could, by the same rules before `(` and after `)`; `(red cat:1.5)dog` stays literal.
  Parentheses without a final `:scale`, like `(of a cat:1.5, on a sofa)`, stay and their `word:scale`s count.
- Literal, by these rules: `time:30min`, `a:b`, `cat :1.5`, `cat: 1.5`, `photo,cat:1.5,4k` (write `, 4k`), and any
  run of non-space characters containing `://` (`http://host:80/x`). Not supported, and left literal: bare `(word)`
  and `[word]` emphasis, nested parentheses (`((cat:1.2):1.5)`: nothing between the outer pair is parsed), `BREAK`.
- A scale that is negative, `nan`, `inf`, has a sign or an exponent, or exceeds 100 raises `SCFGError`.

Words match case-insensitively and as whole words: `cat` matches "Cat" and "cat," but not "cats", "cat's" or
"bobcat"; a `WordScale.occurrence` counts occurrences the same way. An occurrence scales exactly the tokens whose
characters overlap it: from the tokenizer's offset mapping (fast tokenizers), else by tokenizing the prompt up to
the occurrence and finding those tokens in the ids (slow tokenizers).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import SCFGError

__all__ = [
    "MAX_TOKEN_SCALE",
    "WordScale",
    "parse_weighted_prompt",
    "token_scale_tensor",
    "validate_token_scales",
]

MAX_TOKEN_SCALE = 100.0
"""Largest per-word multiplier: beyond it the region's guidance only saturates and can overflow float16/float32."""

_ALNUM = r"[^\W_]"  # a letter or a digit
_JOINER = r"['’\-_]"
_WORD = rf"(?:<[^\s<>():]+>|{_ALNUM}+(?:{_JOINER}{_ALNUM}+)*)"
_WORD_RE = re.compile(_WORD)
_LETTER_RE = re.compile(r"[^\W\d_]")
_BEFORE = r"(?<![^\s,.;!?(])"  # start of text, whitespace or one of ,.;!?(
_AFTER = r"\s|\Z|[.,](?!\d)|[;!?)]"
_AFTER_RE = re.compile(_AFTER)
# Number-like text is captured so that a wrong scale (`cat:-1`, `cat:1e3`, `cat:nan`) raises instead of vanishing.
_SIGNED = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?i:inf(?:inity)?|nan)"
_SINGLE_RE = re.compile(rf"{_BEFORE}(?P<word>{_WORD}):(?P<scale>{_SIGNED})(?={_AFTER})")
_GROUP_RE = re.compile(rf"\((?P<body>[^()]*):(?P<scale>[-+]?\d+\.(?=\))|{_SIGNED})\)")
_DECIMAL_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_URL_RE = re.compile(r"\S*://\S*")
_WORD_START = rf"(?<!{_ALNUM})(?<!{_ALNUM}{_JOINER})"
_WORD_END = rf"(?!{_ALNUM})(?!{_JOINER}{_ALNUM})"
_ACCEPTED = '`{"word": scale}` or a list of `scfg.WordScale` (e.g. from `scfg.parse_weighted_prompt`)'


@dataclass(frozen=True)
class WordScale:
    """A guidance multiplier for a word; `occurrence` (0-based) picks one occurrence, `None` means all."""

    word: str
    scale: float
    occurrence: int | None = None


def _is_word(text: str) -> bool:
    return text.startswith("<") or _LETTER_RE.search(text) is not None


def _check_scale(value: object, what: str) -> float:
    """Return `value` as a float if it is a real number in [0, MAX_TOKEN_SCALE]; raise `SCFGError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SCFGError(
            f"Expected {what} to be a real number, but got {type(value).__name__} {value!r}. Pass a float."
        )
    scale = float(value)
    if not math.isfinite(scale):
        raise SCFGError(
            f"Expected {what} to be a finite number, but got {scale}. Use 1 for the word's normal guidance, 0 to "
            "switch it off."
        )
    if scale < 0:
        raise SCFGError(
            f"Expected {what} to be >= 0, but got {scale:g}. A negative multiplier reverses the guidance of the "
            "word's region: use 0 to switch it off, or a value below 1 to weaken it."
        )
    if scale > MAX_TOKEN_SCALE:
        raise SCFGError(
            f"Expected {what} to be at most {MAX_TOKEN_SCALE:g}, but got {scale:g}. A larger per-word multiplier only "
            "saturates the region's guidance and can overflow float16/float32 in the guided prediction "
            f"`pred_uncond + g * rate * (pred_cond - pred_uncond)`; use a value of at most {MAX_TOKEN_SCALE:g}."
        )
    return scale


def _parse_scale(raw: str, after: str) -> float:
    scale = _check_scale(float(raw), f"the scale after `{after}:`")
    if not _DECIMAL_RE.fullmatch(raw):
        raise SCFGError(
            f"Expected a plain decimal scale after `{after}:` (like 1.5), but got {raw!r}. Write it without a sign "
            "or an exponent."
        )
    return scale


def _occurrences(text: str, word: str) -> list[tuple[int, int]]:
    """Character spans of the case-insensitive, whole-word occurrences of `word` in `text`."""
    word = word.strip()
    pattern = r"\s+".join(re.escape(part) for part in word.split())
    if re.match(_ALNUM, word[0]):
        pattern = _WORD_START + pattern
    if re.match(_ALNUM, word[-1]):
        pattern += _WORD_END
    return [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]


def _literal_spans(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Return (spans never parsed: URLs and nested parentheses, top-level parenthesis pairs without nesting)."""
    pairs, stack = [], []
    for i, char in enumerate(text):
        if char == "(":
            stack.append(i)
        elif char == ")" and stack:  # an unmatched parenthesis is a plain character
            pairs.append((stack.pop(), i + 1))
    tops: list[tuple[int, int, bool]] = []  # (start, end, has a pair inside)
    for start, end in sorted(pairs):
        if tops and start < tops[-1][1]:
            tops[-1] = (tops[-1][0], tops[-1][1], True)
        else:
            tops.append((start, end, False))
    literal = [m.span() for m in _URL_RE.finditer(text)] + [(a, b) for a, b, nested in tops if nested]
    return literal, [(a, b) for a, b, nested in tops if not nested]


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < b and a < end for a, b in spans)


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]` starts the text or follows whitespace or `,.;!?(`, and is followed by the end,
    whitespace, `,.;!?)` (a `.` or `,` not followed by a digit)."""
    before = start == 0 or text[start - 1].isspace() or text[start - 1] in ",.;!?("
    return before and _AFTER_RE.match(text, end) is not None


def parse_weighted_prompt(text: str) -> tuple[str, list[WordScale]]:
    """Split `"a cat:1.5 on a sofa:0.7"` into the plain prompt and the per-word scales (grammar: module docstring).

    >>> parse_weighted_prompt("a Cat:1.5 on a cat:0.5 sofa")
    ('a Cat on a cat sofa', [WordScale(word='Cat', scale=1.5, occurrence=0), WordScale(word='cat', scale=0.5, occurrence=1)])
    >>> parse_weighted_prompt("a (red cat:2) at 10:30, 16:9")
    ('a red cat at 10:30, 16:9', [WordScale(word='red', scale=2.0, occurrence=0), WordScale(word='cat', scale=2.0, occurrence=0)])

    Raises:
        SCFGError: a scale is negative, not finite, not a plain decimal, or above `MAX_TOKEN_SCALE`.
    """
    literal, flat = _literal_spans(text)
    # (start, end, replacement, [(offset in the replacement, word, scale)]) for each piece of syntax
    edits: list[tuple[int, int, str, list[tuple[int, str, float]]]] = []
    for start, end in flat:
        group = _GROUP_RE.fullmatch(text, start, end)
        if group is None:
            continue  # e.g. "(of a cat:1.5, on a sofa)": its `word:scale`s count
        if not _stands_alone(text, start, end) or _overlaps(start, start + 1, literal):
            literal.append((start, end))  # "(red cat:1.5)dog": group-shaped, but glued to its neighbours
            continue
        if _overlaps(group.end("body"), end, literal):
            continue
        body, body_start = group.group("body"), group.start("body")
        words = [
            m
            for m in _WORD_RE.finditer(text, body_start, group.end("body"))
            if _is_word(m.group()) and not _overlaps(*m.span(), literal)
        ]
        if words:
            scale = _parse_scale(group.group("scale"), f"({body}")
            edits.append((start, end, body, [(m.start() - body_start, m.group(), scale) for m in words]))
    groups = [(start, end) for start, end, _, _ in edits]
    for match in _SINGLE_RE.finditer(text):
        word = match.group("word")
        if not _is_word(word) or _overlaps(*match.span(), literal) or _overlaps(*match.span(), groups):
            continue
        edits.append((match.start(), match.end(), word, [(0, word, _parse_scale(match.group("scale"), word))]))

    pieces: list[str] = []
    placed: list[tuple[int, str, float]] = []  # (start in the plain prompt, word, scale)
    position = length = 0
    for start, end, replacement, words in sorted(edits):
        pieces += [text[position:start], replacement]
        length += start - position
        placed += [(length + offset, word, scale) for offset, word, scale in words]
        length += len(replacement)
        position = end
    pieces.append(text[position:])
    plain = "".join(pieces)
    # The occurrence of a word is its rank among the word's whole-word occurrences in the plain prompt.
    scales = [
        WordScale(word, scale, sum(1 for s, _ in _occurrences(plain, word) if s < start))
        for start, word, scale in placed
    ]
    return plain, scales


def validate_token_scales(scales: object) -> dict[str, float] | list[WordScale]:
    """Check `token_scales` and return a copy: `{"word": scale}` (every occurrence) or a list of `WordScale`.

    Scales are real numbers in [0, `MAX_TOKEN_SCALE`]; words are non-empty strings.

    >>> validate_token_scales({"cat": 2})
    {'cat': 2.0}
    >>> validate_token_scales("a cat:1.5")
    Traceback (most recent call last):
    ...
    scfg.config.SCFGError: Expected `token_scales` as `{"word": scale}` or a list of `scfg.WordScale` (e.g. from `scfg.parse_weighted_prompt`), but got str 'a cat:1.5'. Parse the prompt with `scfg.parse_weighted_prompt` and pass its scales.

    Raises:
        SCFGError: `scales` has another form, a word is not a non-empty string, or a scale is not a real number in
            [0, `MAX_TOKEN_SCALE`].
    """
    if isinstance(scales, Mapping):
        checked: dict[str, float] = {}
        for word, scale in scales.items():
            if not isinstance(word, str) or not word.strip():
                raise SCFGError(
                    f"Expected the keys of `token_scales` to be words (non-empty strings), but got {word!r}. Pass "
                    f"{_ACCEPTED}."
                )
            checked[word] = _check_scale(scale, f"the scale of `{word}` in `token_scales`")
        return checked
    if isinstance(scales, str | bytes):
        raise SCFGError(
            f"Expected `token_scales` as {_ACCEPTED}, but got {type(scales).__name__} {scales!r}. Parse the prompt "
            "with `scfg.parse_weighted_prompt` and pass its scales."
        )
    if not isinstance(scales, Sequence):
        raise SCFGError(f"Expected `token_scales` as {_ACCEPTED}, but got {type(scales).__name__}. Pass one of those.")
    items: list[WordScale] = []
    for index, item in enumerate(scales):
        if not isinstance(item, WordScale):
            raise SCFGError(
                f"Expected `token_scales` as {_ACCEPTED}, but got a {type(scales).__name__} whose item {index} is "
                f'{item!r}. Write `{{"cat": 1.5}}` or `[WordScale("cat", 1.5)]`.'
            )
        if not isinstance(item.word, str) or not item.word.strip():
            raise SCFGError(
                f"Expected the word of `token_scales[{index}]` to be a non-empty string, but got {item.word!r}. "
                "Name a word of the prompt."
            )
        occurrence = item.occurrence
        if occurrence is not None and (
            isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 0
        ):
            raise SCFGError(
                f"Expected the occurrence of `token_scales[{index}]` to be None or an int >= 0, but got "
                f"{occurrence!r}. Count occurrences from 0, or pass None for all of them."
            )
        scale = _check_scale(item.scale, f"the scale of `{item.word}` in `token_scales`")
        items.append(WordScale(item.word, scale, occurrence))
    return items


def _word_spans(tokenizer: Any, ids: list[int], word: str) -> list[list[int]]:
    """Token positions of each occurrence of `word`, tokenized on its own, in the token id sequence `ids`."""
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    return _find_subsequences(ids, pieces)


def _find_subsequences(ids: list[int], pieces: list[int]) -> list[list[int]]:
    n = len(pieces)
    if n == 0:
        return []
    return [list(range(i, i + n)) for i in range(len(ids) - n + 1) if ids[i : i + n] == pieces]


def _token_locator(tokenizer: Any, ids: list[int], prompt: str) -> Callable[[int, int], list[int]]:
    """Return `positions(start, end)`: the indices in `ids` (the tokenized `prompt`) of the characters' tokens."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(prompt, truncation=True, max_length=len(ids), return_offsets_mapping=True)
        if list(encoded["input_ids"]) == ids[: len(encoded["input_ids"])]:
            offsets = [tuple(span) for span in encoded["offset_mapping"]]

            def from_offsets(start: int, end: int) -> list[int]:
                # Special tokens have empty spans; a token that overlaps the occurrence is one of its tokens.
                return [k for k, (a, b) in enumerate(offsets) if a < b and a < end and start < b]

            return from_offsets

    # Slow tokenizer (or ids tokenized differently): the tokens that the occurrence adds to the prompt before it,
    # so that the occurrence is tokenized as written there (",cat" and " cat" differ in sentencepiece).
    with_special = tokenizer(prompt).input_ids
    without = tokenizer(prompt, add_special_tokens=False).input_ids
    lead = next(
        (i for i in range(len(with_special) - len(without) + 1) if with_special[i : i + len(without)] == without), 0
    )
    if getattr(tokenizer, "padding_side", "right") == "left":  # ChatGLM (Kolors): the pads come first in `ids`
        pad = tokenizer.pad_token_id
        lead += next((i for i, token in enumerate(ids) if token != pad), 0)

    def from_prefixes(start: int, end: int) -> list[int]:
        before = tokenizer(prompt[:start], add_special_tokens=False).input_ids
        through = tokenizer(prompt[:end], add_special_tokens=False).input_ids
        common = 0
        while common < min(len(before), len(through)) and before[common] == through[common]:
            common += 1
        pieces = through[common:]
        expected = lead + common
        if not pieces or expected + len(pieces) > len(ids):
            return []  # cut off at the tokenizer's length
        if ids[expected : expected + len(pieces)] == pieces:
            return list(range(expected, expected + len(pieces)))
        spans = _find_subsequences(ids, pieces)
        distances = [abs(span[0] - expected) for span in spans]
        return spans[distances.index(min(distances))] if spans else []

    return from_prefixes


def _select(spans: list[tuple[int, int]], occurrence: int | None) -> list[tuple[int, int]]:
    return spans if occurrence is None else spans[occurrence : occurrence + 1]


def token_scale_tensor(
    segments: Sequence[tuple[Any, torch.Tensor]],
    prompts: Sequence[str],
    scales: Mapping[str, float] | Sequence[WordScale],
) -> torch.Tensor:
    """Return `[P, T]` multipliers per prompt token: the word's scale on its tokens, NaN where none is set.

    Each occurrence of a word in a prompt (case-insensitive, whole words; see the module docstring) scales exactly
    the tokens whose characters overlap it, in every part. Where entries overlap, the later one wins.

    Args:
        segments: `(tokenizer, token_ids [P, T_k])` for each consecutive part of the text sequence the denoiser
            sees (one for CLIP models; SD3 has a CLIP part and a T5 part, `Σ T_k = T`).
        prompts: the `P` prompts of the call.
        scales: `{"word": scale}` (every occurrence) or `WordScale`s (one occurrence each, counted in the prompt
            text); checked by `validate_token_scales`.

    Raises:
        SCFGError: `scales` is invalid, or a word occurs in none of the prompts' tokens; the message lists each
            prompt's words.
    """
    checked = validate_token_scales(scales)
    items = [WordScale(w, s) for w, s in checked.items()] if isinstance(checked, dict) else checked
    occurrences = [[_select(_occurrences(prompt, item.word), item.occurrence) for item in items] for prompt in prompts]
    found = [False] * len(items)
    parts = []
    for tokenizer, token_ids in segments:
        if token_ids.shape[0] != len(prompts):
            raise SCFGError(
                f"Expected `segments` with one row per prompt ({len(prompts)}), but got token ids of shape "
                f"{tuple(token_ids.shape)}. Tokenize the same prompts."
            )
        out = torch.full(token_ids.shape, float("nan"), dtype=torch.float32)
        for row, ids in enumerate(token_ids.tolist()):
            if not any(occurrences[row]):
                continue
            positions = _token_locator(tokenizer, ids, prompts[row])
            for i, item in enumerate(items):
                for start, end in occurrences[row][i]:
                    tokens = positions(start, end)
                    if tokens:
                        out[row, tokens] = item.scale
                        found[i] = True
        parts.append(out)
    for i, item in enumerate(items):
        if not found[i]:
            words = sorted({m.group() for p in prompts for m in _WORD_RE.finditer(p) if _is_word(m.group())})
            which = f"`{item.word}`" if item.occurrence is None else f"occurrence {item.occurrence} of `{item.word}`"
            raise SCFGError(
                f"Expected {which} to be a word of the prompt, but it is not (or was cut off at the tokenizer's "
                f"length). Words match whole and case-insensitively; the prompt's words are: {', '.join(words)}."
            )
    return torch.cat(parts, dim=1)
