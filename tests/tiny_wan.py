"""Tiny, offline Wan pipelines built from configs (random weights), saved with `save_pretrained`.

The VAE is diffusers' own test shape of `AutoencoderKLWan`: three spatial halvings (latent = frames / 8) and two
temporal ones (`scale_factor_temporal=4`: 5 frames -> 2 latent frames, `(F - 1) // 4 + 1`). With the transformer's
(1, 2, 2) patch a 48x80 clip is a 2x6x10 latent and a 2x3x5 token grid: non-square and odd, so a swapped or
ceil-halved axis fails. The rotary axes of a 16-wide head are 8 (frames) + 4 + 4.
"""

from __future__ import annotations

import os

import torch
from conftest import sharpen_attention, write_t5_tokenizer

HEIGHT, WIDTH, FRAMES = 48, 80, 5
LATENT = (2, 6, 10)  # (F, H, W) of a 48x80, 5-frame clip
TOKENS = (2, 3, 5)  # the transformer's token grid: latent / (1, 2, 2)


def tiny_transformer(seed: int = 0, **overrides):
    """A 4-block `WanTransformer3DModel` (2 heads of 16, text width 32); blocks 1-2 are the middle half."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    transformer = WanTransformer3DModel(**{**config, **overrides})
    # The RMS norms across heads undo any scaling of `to_q`; scaling the query norm's weights sharpens the logits.
    sharpen_attention(transformer, ("norm_q.weight",))
    return transformer


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_umt5(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_tiny_wan(folder, two_experts: bool = False, image_to_video: bool = False) -> None:
    """Save a tiny Wan pipeline: `WanPipeline` (Wan 2.1), with `two_experts` a Wan 2.2 A14B-shaped `WanPipeline`
    (`transformer` above `boundary_ratio`, `transformer_2` below), with `image_to_video` a Wan 2.1 I2V-shaped
    `WanImageToVideoPipeline` (36 input channels: latent, mask and image latent; CLIP image tokens through
    `add_k_proj`, their own softmax)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import T5TokenizerFast  # 5.x: `T5TokenizerFast is T5Tokenizer`

    write_t5_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_src"))
    common = dict(
        tokenizer=tokenizer,
        text_encoder=tiny_umt5(tokenizer),
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    if image_to_video:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(0)
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=8,  # 16 patches + the class token: 17 image tokens
            )
        )
        transformer = tiny_transformer(in_channels=36, image_dim=8, added_kv_proj_dim=32)
        pipe = WanImageToVideoPipeline(
            **common,
            transformer=transformer,
            image_encoder=image_encoder,
            image_processor=CLIPImageProcessor(crop_size=32, size=32),
        )
    elif two_experts:
        pipe = WanPipeline(
            **common, transformer=tiny_transformer(0), transformer_2=tiny_transformer(1), boundary_ratio=0.7
        )
    else:
        pipe = WanPipeline(**common, transformer=tiny_transformer())
    pipe.save_pretrained(folder, safe_serialization=True)
