"""A tiny, offline HunyuanVideo 1.5 text-to-video pipeline built from configs (random weights), saved with
`save_pretrained`.

- Text: a Qwen2-style byte-level BPE tokenizer written here (the 256 byte symbols plus merges that make each test
  word one token, `<|im_start|>`/`<|im_end|>`/`<|endoftext|>` as special tokens, and Qwen2.5's chat template) over a
  3-layer `Qwen2_5_VLTextModel`; byT5's own byte tokenizer (it needs no vocabulary file) over a 2-layer
  `T5EncoderModel`. The pipeline keeps its real text lengths (1000 MLLM positions after its fixed crop of 108, 256
  byT5 positions, 729 image positions), so the transformer sees the released model's 1985-position text sequence.
  The tokenizer is byte-level, so the fixed crop leaves part of the system message in front of the prompt (the
  released tokenizer's crop ends at the prompt).
- Transformer: 4 dual-stream blocks (2 heads of 8), patch (1, 1, 1), rotary axes 2 + 2 + 4 = the head width.
- VAE: `AutoencoderKLHunyuanVideo15` with spatial compression 4 and temporal compression 2 (5 frames -> 3 latent
  frames, `(F - 1) // 2 + 1`); a 16x24 clip is a 3x4x6 latent and token grid: non-square, so a swapped axis fails.

Used by tests/test_pipeline_hunyuan_video15.py through a session fixture.
"""

from __future__ import annotations

import os

import torch
from conftest import WORDS, sharpen_attention

HEIGHT, WIDTH, FRAMES = 16, 24, 5
LATENT = (3, 4, 6)  # (F, H, W) of a 16x24, 5-frame clip; the patch is 1, so also the token grid
CHANNELS = 4  # latent channels; the transformer takes [latent, condition latent, mask] = 2 * 4 + 1
TEXT_WIDTH = 16  # the tiny Qwen's hidden size (3584 in Qwen2.5-VL-7B)
BYT5_WIDTH = 16  # the tiny byT5's d_model (1472 in the released glyph encoder)
IMAGE_WIDTH = 16  # SigLIP width of the image tokens (1152 released); zeros in text-to-video

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-symbol table, which byte-level BPE vocabularies (Qwen's) are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, symbols), strict=True))


def write_qwen_tokenizer(folder) -> None:
    """A Qwen2 tokenizer: every byte is a token, and merges make `Ġ<word>` one token for the test words."""
    from transformers import Qwen2Tokenizer

    table = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for symbol in table.values():
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = [table[b] for b in (" " + word).encode()]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def tiny_transformer(seed: int = 0, **overrides):
    """A 4-block `HunyuanVideo15Transformer3DModel`; blocks 1-2 are the middle half."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    config = dict(
        in_channels=2 * CHANNELS + 1,
        out_channels=CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=TEXT_WIDTH,
        text_embed_2_dim=BYT5_WIDTH,
        image_embed_dim=IMAGE_WIDTH,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type="t2v",
    )
    transformer = HunyuanVideo15Transformer3DModel(**{**config, **overrides})
    # The QK RMS norms undo any scaling of `to_q`/`to_k`; scaling the image query norm's weights sharpens the logits of
    # the image queries over image and text keys alike (random init is nearly uniform).
    sharpen_attention(transformer, ("attn.norm_q.weight",))
    return transformer


def tiny_vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo15(
        latent_channels=CHANNELS,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
    )


def build_tiny_hunyuan_video15(folder, guidance_scale: float = 6.0) -> None:
    """Save a tiny `HunyuanVideo15Pipeline` with a `ClassifierFreeGuidance` guider at `guidance_scale`."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        Qwen2Tokenizer,
        T5Config,
        T5EncoderModel,
    )

    write_qwen_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = Qwen2Tokenizer.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=32,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            # Qwen2.5-VL's multimodal rotary sections (temporal, height, width) split the head's 8 / 2 frequencies
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=BYT5_WIDTH,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_transformer(),
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def shorten_text(pipe, mllm: int = 32, byt5: int = 16, image: int = 8) -> int:
    """Shorten `pipe`'s text lengths to `image + byt5 + mllm` positions (returned) and crop its chat template right
    before the prompt, where the released tokenizer's fixed crop of 108 lands.

    The lengths and the crop are attributes the pipeline sets in `__init__` and reads in each call; the
    transformer's byT5 projection is 2048 wide whatever the config, so 256 byT5 positions cost most of a tiny run.
    """
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    rendered = pipe.tokenizer.apply_chat_template(
        format_text_input(["x"], pipe.system_message), add_generation_prompt=True, tokenize=False
    )[0]
    prefix = rendered[: rendered.rfind("x")]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix, add_special_tokens=False).input_ids)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = mllm, byt5, image
    return image + byt5 + mllm
