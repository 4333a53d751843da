"""A tiny, offline Flux2KleinPipeline (an undistilled "base" klein, so it runs CFG) built from configs (random
weights), saved with `save_pretrained`.

- The transformer has FLUX.2's block structure cut to 4 double-stream and 2 single-stream blocks (2 heads of 16,
  the 4 rotary axes 4 + 4 + 4 + 4, 16 patchified channels); blocks 1-3 are the ones after the first quarter.
- The text encoder is a `Qwen3ForCausalLM` with klein's 28+ layers (the pipeline reads layers 9, 18 and 27) at
  width 8, so its 3 stacked layers are 24 wide; the tokenizer is a byte-level BPE over the test words with Qwen's
  special tokens and a chat template that renders what Qwen3's does with `enable_thinking=False`.
- The VAE is a 2-block `AutoencoderKLFlux2` (downsampling by 2, 4 latent channels, patchified 2x2 to 16): a 32x48
  image is an 8x12 token grid, non-square, so a swapped (h, w) fails.
"""

from __future__ import annotations

import json
import os

import torch
from conftest import WORDS, sharpen_attention

HEIGHT, WIDTH = 32, 48
GRID = (8, 12)  # the token grid of a 32x48 image
QWEN_WIDTH = 8
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's template for one user message, `add_generation_prompt=True, enable_thinking=False`
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def write_qwen_tokenizer(folder) -> None:
    """A Qwen2 (byte-level BPE) tokenizer: every byte, merges that make each test word (and " word") one token,
    Qwen's special tokens, `<think>`/`</think>`, and the chat template above."""
    from transformers import AddedToken, Qwen2TokenizerFast  # 5.x: `Qwen2TokenizerFast is Qwen2Tokenizer`

    vocab = {char: i for i, char in enumerate(_byte_chars())}
    merges = []

    def merge(parts: list[str]) -> None:  # left to right, each new pair ranked after the earlier ones
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((parts[0], parts[1]))
            parts = [merged, *parts[2:]]

    for word in ["ĊĊ", "user", "assistant", *WORDS]:
        merge(list(word))
    for word in WORDS:  # " word" ("Ġ" is the space byte): after the word's own merges, which BPE applies first
        merge(["Ġ", word])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    # from the files (vocab.json, merges.txt), the loading path every transformers version shares
    tokenizer = Qwen2TokenizerFast.from_pretrained(
        folder, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=512
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL]})
    tokenizer.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def tiny_transformer(seed: int = 0):
    """A `Flux2Transformer2DModel`: 4 double- and 2 single-stream blocks, 2 heads of 16, 16 packed channels."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=4,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * QWEN_WIDTH,  # Qwen3's layers 9, 18 and 27 side by side
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    # The QK RMS norms undo any scaling of the projections; scaling the norms' weights sharpens the logits instead.
    sharpen_attention(transformer, ("norm_q.weight", "norm_added_q.weight"))
    return transformer


def tiny_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    with torch.no_grad():  # the patchified latents' batch-norm statistics, as a trained VAE carries them
        vae.bn.running_mean.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        vae.bn.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    return vae


def build_tiny_flux2_klein(folder) -> None:
    """Save a tiny undistilled Flux2KleinPipeline (`is_distilled=False`: CFG runs for `guidance_scale > 1`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    write_qwen_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = Qwen2TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_WIDTH,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_transformer(),
        is_distilled=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
