"""A tiny Z-Image pipeline built offline: a byte-level BPE tokenizer in Qwen's layout trained here on the test words
(with Qwen3's chat template and its `<|im_start|>` / `<|im_end|>` tokens), a 2-layer Qwen3 text encoder, a
4-main-block `ZImageTransformer2DModel` and the 2-block test VAE.

Used by tests/test_pipeline_z_image.py (and the Qwen tokenizer by tests/tiny_krea2.py); nothing here downloads
anything.
"""

from __future__ import annotations

import os

import torch
from conftest import WORDS, sharpen_attention, tiny_vae

# Qwen2's pre-tokenizer split (transformers' `Qwen2Tokenizer`)
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen3's chat template, reduced to what the pipelines use: one user turn and the generation prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
# The text Krea 2's template adds around a prompt (Krea2Pipeline.prompt_template_encode_prefix), so that its words
# are whole tokens here too: the pipeline drops exactly 34 prefix tokens, as many as Qwen's tokenizer makes of it.
KREA2_PREFIX = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:\nuser\nassistant\n"
)
EXTRA_WORDS = ["two", "dogs", "grass", "blurry", "low", "quality", "watermark"]
TEXT_HIDDEN = 16  # the tiny Qwen3's hidden size (Z-Image's `cap_feat_dim`; 2560 in Qwen3-4B)


def write_qwen_tokenizer(folder):
    """Train a byte-level BPE over the test words and the templates' text until every word is one token, and return
    it as a `Qwen2Tokenizer` (padding `<|endoftext|>`, special `<|im_start|>` and `<|im_end|>`, Qwen3's chat
    template), saved to `folder`. The training input is fixed, so the vocabulary is the same on every run."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = WORDS + EXTRA_WORDS
    corpus = [KREA2_PREFIX, " ".join(words), "\n".join(words)]
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # more than the corpus can fill: merging stops when every word is one token
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = Qwen2Tokenizer(vocab=backend.get_vocab(), merges=_merges(backend))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def _merges(backend) -> list[tuple[str, str]]:
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def tiny_qwen3(vocab_size: int):
    """A 2-layer Qwen3 text model (grouped-query attention, q/k norms). Two layers, because the pipeline reads the
    penultimate hidden states: with one layer they would be the token embeddings."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    return Qwen3Model(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
        )
    )


def tiny_z_image_transformer():
    """Z-Image's shape at toy size: 1 noise-refiner and 1 context-refiner block, 4 main blocks, patch 2, 2 heads of
    16 whose rotary axes (8 + 4 + 4) add up to the head dimension; the 4 latent channels of the test VAE."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=4,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    # The per-head RMS norms undo any scaling of `to_q`/`to_k`; scaling the norm's weight sharpens the logits.
    sharpen_attention(transformer, ("norm_q.weight",))
    return transformer


def build_tiny_z_image(folder) -> None:
    """Save a tiny ZImagePipeline to `folder` with `save_pretrained` (safetensors)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = write_qwen_tokenizer(os.path.join(folder, "tokenizer_src"))
    text_encoder = tiny_qwen3(len(tokenizer))
    transformer = tiny_z_image_transformer()
    # Z-Image uses FLUX's VAE, shifted and scaled before decoding (0.1159 and 0.3611)
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Tongyi-MAI/Z-Image-Turbo's scheduler config
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(folder, safe_serialization=True)
