"""A tiny LTX-Video pipeline built offline: a 4-block `LTXVideoTransformer3DModel`, a T5 encoder over the test words
and a small `AutoencoderKLLTXVideo`, saved with `save_pretrained` like a checkpoint.

The VAE is the one of diffusers' own LTX tests (`spatio_temporal_scaling=(True, True, False, False)`, patch size 1):
it compresses 4x in space and 4x in time, so 9 frames of 32x64 pixels are a 3x8x16 latent, 384 tokens of 8
channels (transformer patch sizes 1 and 1, as LTX-Video 0.9 has). The grid is non-square so that a swap of height
and width fails, and has several frames so that a swap of frames and rows fails.

Used by tests/test_pipeline_ltx.py through a session fixture; nothing here downloads anything.
"""

from __future__ import annotations

import inspect
import os

import torch
from conftest import sharpen_attention, write_t5_tokenizer

FRAMES, HEIGHT, WIDTH = 9, 32, 64  # pixels (LTXPipeline wants multiples of 32); the token grid is (3, 8, 16)
GRID = (3, 8, 16)
T5_DIM = 32


def tiny_ltx_vae():
    """The VAE of diffusers' LTX tests (4x spatial, 4x temporal compression, 8 latent channels), with the decoder
    as small as the encoder where this diffusers has the decoder arguments (0.33 and later)."""
    from diffusers import AutoencoderKLLTXVideo

    config = dict(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    decoder = dict(
        decoder_block_out_channels=(8, 8, 8, 8),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_spatio_temporal_scaling=(True, True, False, False),
    )
    accepted = inspect.signature(AutoencoderKLLTXVideo.__init__).parameters
    config.update({k: v for k, v in decoder.items() if k in accepted})
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(**config)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def build_tiny_ltx(folder) -> None:
    """Save a tiny LTXPipeline to `folder`: 4 transformer blocks of 2 heads x 8 (so the RMS norm across heads and
    the head split are distinguishable), cross-attention to a 2-layer T5 with padding masks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # 5.x: `T5TokenizerFast is T5Tokenizer`

    write_t5_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=4,
        caption_channels=T5_DIM,
    )
    # The q/k RMS norms undo any scaling of `to_q`/`to_k`; scaling the query norm's weight sharpens the logits.
    sharpen_attention(transformer, ("norm_q.weight",))
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_DIM,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_ltx_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
