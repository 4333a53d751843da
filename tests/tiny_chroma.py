"""A tiny, offline ChromaPipeline built from configs (random weights), saved with `save_pretrained`.

The transformer has FLUX.1's block structure cut to 2 double-stream and 2 single-stream blocks (2 heads of 16, the
rotary axes 4 + 4 + 8), a one-layer approximator, and reads a 2-layer T5 (d_model 32). With the 2-block VAE
(downsampling by 2) and the 2x2 packing, a 32x48 image is an 8x12 token grid: non-square, so a swapped (h, w)
fails.
"""

from __future__ import annotations

import os

import torch
from conftest import sharpen_attention, tiny_vae, write_t5_tokenizer

HEIGHT, WIDTH = 32, 48
GRID = (8, 12)  # the token grid of a 32x48 image
TEXT_WIDTH = 32  # T5's d_model, the transformer's joint_attention_dim


def tiny_transformer(seed: int = 0):
    """A `ChromaTransformer2DModel`: 2 double- and 2 single-stream blocks, 2 heads of 16, 16 packed channels."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,  # 4 timestep + 4 guidance + 8 modulation-index channels
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    # The QK RMS norms undo any scaling of `to_q`/`to_k`; scaling the norms' weights sharpens the logits instead.
    sharpen_attention(transformer, ("norm_q.weight", "norm_added_q.weight"))
    return transformer


def build_tiny_chroma(folder) -> None:
    """Save a tiny ChromaPipeline: the transformer above, a 2-layer T5 encoder and its tokenizer, a 2-block VAE."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # 5.x: `T5TokenizerFast is T5Tokenizer`

    write_t5_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_WIDTH,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # Chroma uses FLUX.1's VAE: no quant convs, shifted and scaled before decoding (the real one: 0.1159, 0.3611)
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_transformer(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
