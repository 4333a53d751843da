"""A tiny, offline QwenImagePipeline built from configs: a 4-block transformer, a 2-layer Qwen2.5-VL text encoder, a
byte-level BPE tokenizer written here, and a tiny Qwen-Image VAE. Nothing is downloaded.

The tokenizer is the Qwen2 byte-level BPE (the GPT-2 byte alphabet, the Qwen2 pre-tokenizer regex) over a small
vocabulary: every byte, the chat-template special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, and merges
that make each word of the pipeline's template and of the test prompts one token, with and without its leading
space. The template's system prompt plus `<|im_start|>user\\n` is then 34 tokens, as with the real Qwen2.5-VL
tokenizer, so the pipeline's `prompt_template_encode_start_idx = 34` drops exactly the template prefix.
"""

from __future__ import annotations

import itertools
import json
import os
import re

import torch
from conftest import WORDS

EXTRA_WORDS = ["blurry", "low", "quality", "watermark", "two", "dogs", "grass", "dance", "monkey", "bad"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE_PREFIX_TOKENS = 34  # QwenImagePipeline.prompt_template_encode_start_idx


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token: merge the lowest-ranked adjacent pair until none is left."""
    parts = list(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(itertools.pairwise(parts)))
        if rank > len(ranks):
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def write_qwen_tokenizer(folder: str, template: str) -> None:
    """Write a Qwen2 tokenizer whose vocabulary makes each word of `template` and of the test prompts one token."""
    from transformers import Qwen2Tokenizer

    table = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for char in table.values():
        vocab.setdefault(char, len(vocab))
    words = set(re.findall(r"[A-Za-z]+", re.sub(r"<\|[a-z_]+\|>", " ", template))) | {*WORDS, *EXTRA_WORDS}
    pieces = {form for w in words for form in ("".join(table[b] for b in w.encode()), table[32] + w)}
    # Add the merge of the first two pieces each word still splits into, until every word is one token: merges
    # added later rank lower, so earlier words' merges never change.
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for piece in sorted(pieces):
            parts = _bpe(piece, ranks)
            if len(parts) > 1:
                ranks[(parts[0], parts[1])] = len(ranks)
                vocab.setdefault(parts[0] + parts[1], len(vocab))
                changed = True
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.save_pretrained(folder)


def tiny_qwen_text_encoder(vocab_size: int):
    """A 2-layer Qwen2.5-VL (hidden 16, multimodal RoPE sections summing to the head dimension's half) with a
    1-layer vision tower the text-only prompts never reach, as diffusers' own Qwen-Image tests configure it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(bos_token_id=0, eos_token_id=SPECIAL.index("<|im_end|>"), pad_token_id=0)
    text = dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0,
        **ids,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16, vocab_size=vocab_size, **ids)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(folder: str) -> None:
    """Save a tiny QwenImagePipeline.

    The VAE downsamples by 4 and the transformer packs 2x2 latent patches (`in_channels = 4 x z_dim = 16`), so the
    image size must be a multiple of 8: a 64x96 image is an 8x12 token grid. The rotary axes (8 + 4 + 4) add up to
    the head dimension, 16; 4 blocks, so the default middle half (blocks 1-2) is a real selection.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2Tokenizer

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,  # the text encoder's hidden size
        axes_dims_rope=(8, 4, 4),
    )
    # The QK RMS norms undo any scaling of the projections; scaling the norms' weights sharpens the logits instead.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith(("norm_q.weight", "norm_added_k.weight")):
                param.mul_(4.0)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    # the tokenizer's vocabulary covers the pipeline's own chat template
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    write_qwen_tokenizer(os.path.join(folder, "tokenizer_src"), template)
    tokenizer = Qwen2Tokenizer.from_pretrained(os.path.join(folder, "tokenizer_src"))
    prefix = tokenizer.convert_ids_to_tokens(tokenizer(template.format("")).input_ids[:drop])
    if drop != TEMPLATE_PREFIX_TOKENS or prefix[-3:] != ["<|im_start|>", "user", "Ċ"]:
        raise RuntimeError(f"the tiny tokenizer does not split the template prefix into {drop} tokens: {prefix}")
    pipe.register_modules(tokenizer=tokenizer, text_encoder=tiny_qwen_text_encoder(len(tokenizer)))
    pipe.save_pretrained(folder, safe_serialization=True)
