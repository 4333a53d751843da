"""`chat_message_words`: the user message's content in ChatML-templated ids, the rule behind the word masks of
Qwen-Image, FLUX.2 [klein], Z-Image and Krea 2 (each family's test checks it on its own tokenizer)."""

from __future__ import annotations

import torch

from scfg.families.base import chat_message_words

VOCAB = ["<|im_start|>", "<|im_end|>", "user", "Ċ", "a", "cat", "assistant", "<pad>", "<unk>"]
S, E, USER, NL, A, CAT, ASSISTANT, PAD, UNK = range(len(VOCAB))


class Tokens:
    """A tokenizer's two lookups, over `VOCAB` (or without the ChatML tags: they map to `<unk>`)."""

    def __init__(self, chatml: bool = True) -> None:
        self.chatml = chatml

    def convert_tokens_to_ids(self, token: str) -> int:
        known = VOCAB if self.chatml else [t for t in VOCAB if not t.startswith("<|")]
        return VOCAB.index(token) if token in known else UNK

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [VOCAB[i] for i in ids]


def words(ids: list[list[int]], chatml: bool = True) -> list[list[int]] | None:
    mask = chat_message_words(Tokens(chatml), torch.tensor(ids))
    return None if mask is None else [row.nonzero().flatten().tolist() for row in mask]


def test_content_between_the_user_header_and_the_first_end_tag():
    templated = [S, USER, NL, A, CAT, E, NL, S, ASSISTANT, NL, PAD, PAD]
    assert words([templated]) == [[3, 4]]


def test_prefix_dropped_by_the_pipeline_starts_at_zero():
    # Qwen-Image and Krea 2 drop `<|im_start|>user\n` (and the system turn): the content starts at position 0
    assert words([[A, CAT, E, NL, S, ASSISTANT, NL, PAD]]) == [[0, 1]]


def test_truncated_message_runs_to_the_end_and_rows_are_independent():
    assert words([[S, USER, NL, A, CAT, CAT], [S, USER, NL, CAT, E, PAD]]) == [[3, 4, 5], [3]]


def test_only_the_first_message_is_content():
    # the families' texts hold one message (a system turn, where a template has one, is dropped by the pipeline
    # before the denoiser sees it): whatever follows the first `<|im_end|>` is the template's
    assert words([[S, USER, NL, A, E, NL, S, USER, NL, CAT, E]]) == [[3]]


def test_tokenizers_without_chatml_tags_get_none():
    assert words([[A, CAT, PAD]], chatml=False) is None
