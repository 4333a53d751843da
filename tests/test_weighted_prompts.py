"""The `word:scale` / `(words:scale)` prompt grammar, and words -> exactly their token positions (CLIP and T5)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scfg import SCFGError, WordScale, parse_weighted_prompt
from scfg.tokens import MAX_TOKEN_SCALE, token_scale_tensor, validate_token_scales

# Text that contains colons but no scale syntax; each must come back unchanged.
LITERALS = [
    "10:30",
    "16:9",
    "3:2",
    "http://x",
    "https://example.com:8080/path:2",
    "a:b",
    "time:30min",
    "cat:2,5",
    "cat:1.5.5",
    "cat :1.5",
    "cat: 1.5",
    "(fluffy)",
    "[dog]",
    "BREAK",
    "((cat:1.2):1.5)",
    "(10:30:1.5)",
    "(red cat:1.5)dog",
]
SEPARATORS = [" ", ", ", "; ", "! ", "? ", ". ", "\n", "  "]
# The reference notion of a word for counting occurrences: maximal runs, as the module docstring defines them.
RUNS = re.compile(r"<[^\s<>():]+>|[^\W_]+(?:['’\-_][^\W_]+)*")

words = st.one_of(
    st.from_regex(r"[0-9]{0,2}[A-Za-z][A-Za-z0-9]{0,5}(['\-_][A-Za-z0-9]{1,4})?", fullmatch=True),
    st.sampled_from(["café", "naïve", "<cat-toy>", "<sks>", "cat", "Cat"]),
)


@st.composite
def scale_texts(draw, in_group: bool = False) -> str:
    """A plain decimal in [0, 100): `7`, `7.25`, `.5`, and (in a group, where `)` ends it) `7.`."""
    whole = draw(st.integers(0, 99))
    fraction = draw(st.text("0123456789", max_size=3))
    forms = [str(whole), f"{whole}.{fraction}" if fraction else str(whole)]
    if whole == 0 and fraction:
        forms.append(f".{fraction}")
    if in_group:
        forms.append(f"{whole}.")
    return draw(st.sampled_from(forms))


@st.composite
def weighted_prompts(draw) -> tuple[str, str, list[tuple[str, float, int]]]:
    """Return (text with syntax, the same text without it, [(word, scale, start in the plain text)])."""
    text, plain, expected = [], [], []
    for index in range(draw(st.integers(1, 6))):
        if index:
            separator = draw(st.sampled_from(SEPARATORS))
            text.append(separator)
            plain.append(separator)
        start = sum(map(len, plain))
        kind = draw(st.sampled_from(["plain", "literal", "single", "group"]))
        if kind == "plain":
            word = draw(words)
            text.append(word)
            plain.append(word)
        elif kind == "literal":
            literal = draw(st.sampled_from(LITERALS))
            text.append(literal)
            plain.append(literal)
        elif kind == "single":
            word, scale = draw(words), draw(scale_texts())
            text.append(f"{word}:{scale}")
            plain.append(word)
            expected.append((word, float(scale), start))
        else:
            body, offset = [], 0
            for _ in range(draw(st.integers(1, 3))):
                if body:
                    gap = draw(st.sampled_from([" ", ", ", "  "]))
                    body.append(gap)
                    offset += len(gap)
                word = draw(words)
                body.append(word)
                expected.append((word, None, start + offset))
                offset += len(word)
            scale = draw(scale_texts(in_group=True))
            text.append(f"({''.join(body)}:{scale})")
            plain.append("".join(body))
            expected = [(w, float(scale) if s is None else s, p) for w, s, p in expected]
    return "".join(text), "".join(plain), expected


@given(weighted_prompts())
@settings(max_examples=300, deadline=None)
def test_weighted_prompt_round_trips(case):
    text, plain, expected = case
    runs = list(RUNS.finditer(plain))
    occurrences = [
        sum(1 for r in runs if r.start() < start and r.group().lower() == word.lower()) for word, _, start in expected
    ]
    assert parse_weighted_prompt(text) == (
        plain,
        [WordScale(word, scale, k) for (word, scale, _), k in zip(expected, occurrences, strict=True)],
    )


@given(st.text(alphabet=st.characters(exclude_characters=":")))
@settings(max_examples=200, deadline=None)
def test_text_without_colons_is_unchanged(text):
    assert parse_weighted_prompt(text) == (text, [])


@given(st.lists(st.one_of(st.sampled_from(LITERALS), words), min_size=1, max_size=6), st.sampled_from(SEPARATORS))
@settings(max_examples=200, deadline=None)
def test_times_ratios_urls_and_unsupported_syntax_stay_literal(pieces, separator):
    text = separator.join(pieces)
    assert parse_weighted_prompt(text) == (text, [])


@pytest.mark.parametrize("text", ["a clock showing 10:30", "ratio 16:9", "see http://host:8080", *LITERALS])
def test_literal_examples_are_unchanged(text):
    assert parse_weighted_prompt(text) == (text, [])


@pytest.mark.parametrize(
    ("text", "plain", "scales"),
    [
        ("a Cat:1.5", "a Cat", [WordScale("Cat", 1.5, 0)]),
        ("a cat:1.5 on a CAT:.5", "a cat on a CAT", [WordScale("cat", 1.5, 0), WordScale("CAT", 0.5, 1)]),
        ("a photo,cat:1.5", "a photo,cat", [WordScale("cat", 1.5, 0)]),
        ("a cat:2. A dog:0!", "a cat. A dog!", [WordScale("cat", 2.0, 0), WordScale("dog", 0.0, 0)]),
        ("(red cat:2.), dog", "red cat, dog", [WordScale("red", 2.0, 0), WordScale("cat", 2.0, 0)]),
        ("(of a cat:1.5, on a sofa)", "(of a cat, on a sofa)", [WordScale("cat", 1.5, 0)]),
        ("a clock at (noon 10:30:1.2)", "a clock at noon 10:30", [WordScale("noon", 1.2, 0)]),
        (
            "<cat-toy>:1.2 on a sofa:100",
            "<cat-toy> on a sofa",
            [WordScale("<cat-toy>", 1.2, 0), WordScale("sofa", 100.0, 0)],
        ),
        ("a cat's:2 cat:3 bobcat", "a cat's cat bobcat", [WordScale("cat's", 2.0, 0), WordScale("cat", 3.0, 0)]),
    ],
)
def test_weighted_prompt_examples(text, plain, scales):
    assert parse_weighted_prompt(text) == (plain, scales)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a cat:-1", r"Expected the scale after `cat:` to be >= 0, but got -1\. .*use 0"),
        ("a cat:nan", r"Expected the scale after `cat:` to be a finite number, but got nan\. "),
        ("a cat:inf", r"finite number, but got inf\. "),
        ("a cat:+1.5", r"Expected a plain decimal scale after `cat:` \(like 1\.5\), but got '\+1\.5'\. Write"),
        ("a cat:1e-3", r"plain decimal scale .* but got '1e-3'"),
        ("a cat:150", r"at most 100, but got 150\. .*overflow float16/float32"),
        ("a (red cat:100.5)", r"after `\(red cat:` to be at most 100, but got 100\.5\. "),
    ],
)
def test_bad_scales_in_the_prompt_raise(text, message):
    with pytest.raises(SCFGError, match=message):
        parse_weighted_prompt(text)


def test_validate_token_scales_accepts_mappings_and_word_scales():
    given_scales = {"cat": 2, "sofa": 0.5}
    checked = validate_token_scales(given_scales)
    assert checked == {"cat": 2.0, "sofa": 0.5} and type(checked["cat"]) is float
    checked["dog"] = 1.0
    assert "dog" not in given_scales  # a copy
    assert validate_token_scales([WordScale("cat", 1, 0)]) == [WordScale("cat", 1.0, 0)]
    assert validate_token_scales({"cat": 0, "dog": MAX_TOKEN_SCALE}) == {"cat": 0.0, "dog": 100.0}


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ("a cat:1.5", r"Expected `token_scales` as .*WordScale.*, but got str 'a cat:1\.5'\. .*parse_weighted_prompt"),
        ([("cat", 1.5)], r"Expected `token_scales` as .*, but got a list whose item 0 is \('cat', 1\.5\)\. Write"),
        (42, r"Expected `token_scales` as .*, but got int\."),
        ({"cat": "1.5"}, r"Expected the scale of `cat` in `token_scales` to be a real number, but got str '1\.5'"),
        ({"cat": True}, r"`cat` in `token_scales` to be a real number, but got bool True"),
        ({"cat": None}, r"to be a real number, but got NoneType"),
        ({"cat": float("nan")}, r"`cat` in `token_scales` to be a finite number, but got nan"),
        ({"cat": -0.5}, r"`cat` in `token_scales` to be >= 0, but got -0\.5"),
        ({"cat": 101}, r"`cat` in `token_scales` to be at most 100, but got 101\. .*overflow"),
        ({"": 1.0}, r"keys of `token_scales` to be words \(non-empty strings\), but got ''"),
        ({1: 1.0}, r"keys of `token_scales` to be words .*, but got 1\."),
        ([WordScale("cat", math.inf)], r"finite number, but got inf"),
        ([WordScale("cat", 1.5, -1)], r"occurrence of `token_scales\[0\]` to be None or an int >= 0, but got -1"),
    ],
)
def test_validate_token_scales_rejects_other_forms(scales, message):
    with pytest.raises(SCFGError, match=message):
        validate_token_scales(scales)


# -- words -> token positions ---------------------------------------------------------------------------------


class SlowTokenizer:
    """A tokenizer without offset mappings (like transformers' Python tokenizers): forces the fallback path."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tokenizer(*args, **kwargs)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from conftest import write_t5_tokenizer, write_tokenizer
    from transformers import CLIPTokenizer, T5TokenizerFast  # 5.x: the same class as T5Tokenizer

    folder = tmp_path_factory.mktemp("tokenizers")
    write_tokenizer(str(folder / "clip"))
    write_t5_tokenizer(str(folder / "t5"))
    return {
        "clip": CLIPTokenizer.from_pretrained(folder / "clip"),
        "t5": T5TokenizerFast.from_pretrained(folder / "t5"),
    }


def scaled_positions(tokenizer, prompt, scales, slow=False, length=24):
    """(positions with a scale, their token strings, their values) for one prompt."""
    ids = tokenizer([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    out = token_scale_tensor([(SlowTokenizer(tokenizer) if slow else tokenizer, ids)], [prompt], scales)
    assert out.shape == ids.shape
    positions = (~out[0].isnan()).nonzero().flatten().tolist()
    return positions, tokenizer.convert_ids_to_tokens(ids[0, positions].tolist()), out[0, positions].tolist()


# The tokens of "cat" right after "photo,": CLIP splits punctuation off (the tiny vocabulary maps "," to its
# unknown token); the T5 sentencepiece has no "cat" without its "▁" prefix, so ",cat" is spelled out.
ADJACENT_CAT = {"clip": ["cat</w>"], "t5": ["c", "a", "t"]}


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "subsequence"])
@pytest.mark.parametrize("name", ["clip", "t5"])
def test_punctuation_adjacent_word_scales_only_its_tokens(tokenizers, name, slow):
    tokenizer = tokenizers[name]
    prompt, scales = parse_weighted_prompt("a photo,cat:1.5 on a sofa")
    positions, pieces, values = scaled_positions(tokenizer, prompt, scales, slow)
    assert pieces == ADJACENT_CAT[name] and values == [1.5] * len(pieces)
    ids = tokenizer(prompt).input_ids
    assert positions == list(range(positions[0], positions[0] + len(pieces)))
    assert ids[positions[0] - 1] == tokenizer.unk_token_id  # the "," just before, unscaled
    if name == "t5":  # "cat" tokenized on its own ("▁cat") is nowhere in this prompt's ids
        assert tokenizer("cat", add_special_tokens=False).input_ids[0] not in ids


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "subsequence"])
@pytest.mark.parametrize("name", ["clip", "t5"])
def test_multi_token_word_gets_the_scale_on_all_its_tokens(tokenizers, name, slow):
    positions, pieces, values = scaled_positions(tokenizers[name], "a zqx cat", {"zqx": 2.0}, slow)
    # "zqx" is not in the tiny vocabularies: spelled out, after CLIP's start token and "a" (T5: "▁a", "▁").
    assert (positions, pieces) == {
        "clip": ([2, 3, 4], ["z", "q", "x</w>"]),
        "t5": ([1, 2, 3, 4], ["▁", "z", "q", "x"]),
    }[name]
    assert values == [2.0] * len(pieces)


# "Cat" as the tokenizers spell it: CLIP lowercases; the T5 vocabulary has no "C" (unknown) and no "▁Cat".
CAPITAL_CAT = {"clip": ["cat</w>"], "t5": ["▁", "<unk>", "a", "t"]}
SPACED_CAT = {"clip": ["cat</w>"], "t5": ["▁cat"]}


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "subsequence"])
@pytest.mark.parametrize("name", ["clip", "t5"])
def test_token_scales_match_case_insensitively_and_whole_words(tokenizers, name, slow):
    tokenizer = tokenizers[name]
    assert scaled_positions(tokenizer, "a Cat on a sofa", {"cat": 1.5}, slow)[1] == CAPITAL_CAT[name]
    assert scaled_positions(tokenizer, "a cat on a sofa", {"CAT": 1.5}, slow)[1] == SPACED_CAT[name]
    # "bobcat" and "cats" contain "cat" but are other words: only the standalone "cat" is scaled.
    prompt = "a bobcat cats cat"
    ids = tokenizer(prompt).input_ids
    assert scaled_positions(tokenizer, prompt, {"cat": 2.0}, slow)[0] == [len(ids) - 2]  # before the end token


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "subsequence"])
@pytest.mark.parametrize("name", ["clip", "t5"])
def test_one_occurrence_scales_only_that_occurrence(tokenizers, name, slow):
    tokenizer = tokenizers[name]
    prompt, scales = parse_weighted_prompt("a cat on a Cat:2, a cat")
    assert scales == [WordScale("Cat", 2.0, 1)]
    each = [scaled_positions(tokenizer, prompt, [WordScale("cat", 2.0, k)], slow)[0] for k in range(3)]
    every = scaled_positions(tokenizer, prompt, {"cat": 2.0}, slow)[0]
    assert scaled_positions(tokenizer, prompt, scales, slow)[0] == each[1]
    assert all(each) and sorted(each[0] + each[1] + each[2]) == every
    assert max(each[0]) < min(each[1]) <= max(each[1]) < min(each[2])


def test_two_parts_map_each_tokenizer_separately(tokenizers):
    clip, t5 = tokenizers["clip"], tokenizers["t5"]
    prompts = ["a photo,cat on a sofa", "a red dog"]
    segments = [
        (clip, clip(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids),
        (t5, t5(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids),
    ]
    out = token_scale_tensor(segments, prompts, {"cat": 1.5, "dog": 3.0})
    assert out.shape == (2, 28)
    set_at = [(~row.isnan()).nonzero().flatten().tolist() for row in out]
    assert [out[0, p].item() for p in set_at[0]] == [1.5] * 4 and [out[1, p].item() for p in set_at[1]] == [3.0, 3.0]
    assert clip.convert_ids_to_tokens(segments[0][1][0, set_at[0][0]].item()) == "cat</w>"
    assert t5.convert_ids_to_tokens(segments[1][1][0, [p - 12 for p in set_at[0][1:]]].tolist()) == ["c", "a", "t"]
    assert t5.convert_ids_to_tokens(segments[1][1][1, set_at[1][1] - 12].item()) == "▁dog"


def test_textual_inversion_token_scales_its_added_token(tmp_path):
    from conftest import write_tokenizer
    from transformers import CLIPTokenizer

    write_tokenizer(str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    tokenizer.add_tokens(["<cat-toy>"])
    prompt, scales = parse_weighted_prompt("a <cat-toy>:1.2 on a sofa")
    positions, pieces, values = scaled_positions(tokenizer, prompt, scales)
    # the scale tensor is float32: 1.2 rounded once to it (half an ulp, 2**-24 relative), and nothing else
    assert pieces == ["<cat-toy>"] and positions == [2] and values == pytest.approx([1.2], rel=2**-24, abs=0)


def test_unknown_or_cut_off_word_raises(tokenizers):
    clip = tokenizers["clip"]
    with pytest.raises(SCFGError, match=r"Expected `dog` to be a word of the prompt.*words are: Red, a, cat\."):
        scaled_positions(clip, "a Red cat", {"dog": 2.0})
    with pytest.raises(SCFGError, match=r"Expected occurrence 1 of `cat` to be a word of the prompt"):
        scaled_positions(clip, "a cat", [WordScale("cat", 2.0, 1)])
    with pytest.raises(SCFGError, match="cut off"):
        scaled_positions(clip, "a red cat on the sofa", {"sofa": 2.0}, length=5)
    with pytest.raises(SCFGError, match=r"`cat` in `token_scales` to be at most 100"):
        scaled_positions(clip, "a cat", {"cat": 1000.0})


def test_cut_off_occurrence_is_not_scaled_at_an_earlier_one(tokenizers):
    # The second "cat" is beyond the 5 tokens: scaling it must not land on the first "cat".
    for slow in (False, True):
        with pytest.raises(SCFGError, match="cut off"):
            scaled_positions(tokenizers["clip"], "a cat on the cat", [WordScale("cat", 2.0, 1)], slow, length=5)
    positions, _, _ = scaled_positions(tokenizers["clip"], "a cat on the cat", [WordScale("cat", 2.0, 0)], True, 5)
    assert positions == [2]
