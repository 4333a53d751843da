"""A tiny Krea 2 pipeline built offline: the Qwen-layout BPE tokenizer of tests/tiny_z_image.py (Krea 2's template
prefix is exactly 34 tokens there, as with Qwen's own tokenizer), a 2-layer Qwen3-VL model (text layers tapped for
the transformer, a 1-block vision tower never used), a 4-block `Krea2Transformer2DModel` with grouped-query
attention (4 query heads, 2 key/value heads) and a 2-level Qwen-Image VAE.

Used by tests/test_pipeline_krea2.py through a session fixture; nothing here downloads anything.
"""

from __future__ import annotations

import os

import torch
from tiny_z_image import TEXT_HIDDEN, write_qwen_tokenizer

TAPPED_LAYERS = (0, 1, 2)  # the embeddings and both layers' states (Krea 2 taps 12 of Qwen3-VL-4B's 37)
LATENT_CHANNELS = 4


def tiny_qwen3_vl(vocab_size: int):
    """A Qwen3-VL model whose text part has 2 layers of width 16 (grouped-query attention, 3-axis mRoPE split
    2 + 1 + 1 over the 4 rotary pairs of its head dimension 8) and whose vision tower is a single tiny block."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_HIDDEN,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
    )
    torch.manual_seed(0)
    return Qwen3VLModel(config)


def tiny_krea2_transformer():
    """Krea 2's shape at toy size: 4 blocks of 4 query heads and 2 key/value heads of 16 (rotary axes 4 + 6 + 6),
    a text fusion over 3 tapped layers, and 2x2-packed latents of the 4-channel VAE (16 input channels)."""
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(0)
    transformer = Krea2Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        timestep_embed_dim=16,
        text_hidden_dim=TEXT_HIDDEN,
        num_text_layers=len(TAPPED_LAYERS),
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=32,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6),
    )
    # The RMS norms' weights are zero-centred (the multiplier is 1 + weight) and they undo any scaling of `to_q`:
    # a multiplier of 4 on the main blocks' query norms sharpens the random logits, and random modulation tables
    # keep the blocks from starting as the identity.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.startswith("transformer_blocks.") and name.endswith("attn.norm_q.weight"):
                param.fill_(3.0)
            elif name.endswith("scale_shift_table"):
                param.normal_(0.0, 0.5)
    return transformer


def tiny_qwen_image_vae():
    """A Qwen-Image VAE (causal 3-D convolutions) with 2 levels: 8x spatial compression becomes 2x, 4 latent
    channels, plain mean/std so the latents are used as they are."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


def build_tiny_krea2(folder) -> None:
    """Save a tiny Krea2Pipeline to `folder` with `save_pretrained` (safetensors)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    tokenizer = write_qwen_tokenizer(os.path.join(folder, "tokenizer_src"))
    pipe = Krea2Pipeline(
        # the scheduler settings Krea2Pipeline documents (the resolution-aware time shift)
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400
        ),
        vae=tiny_qwen_image_vae(),
        text_encoder=tiny_qwen3_vl(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=tiny_krea2_transformer(),
        text_encoder_select_layers=TAPPED_LAYERS,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
