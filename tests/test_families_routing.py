"""Every pipeline either has a family written for it or gets the clear "unsupported" error (never a wrong adapter)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    KandinskyV22Pipeline,
    KolorsPipeline,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.kolors import ChatGLMModel
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

import scfg
from scfg import SCFGError
from scfg.families import family_for


def tiny_kolors() -> KolorsPipeline:
    """Kolors: SDXL's UNet shape, ChatGLM3 tokens projected in (`encoder_hid_dim_type="text_proj"`)."""
    from conftest import tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=56,
        cross_attention_dim=8,
        norm_num_groups=2,
        encoder_hid_dim=16,
        encoder_hid_dim_type="text_proj",
    )
    text_encoder = ChatGLMModel(
        ChatGLMConfig(
            num_layers=1,
            padded_vocab_size=64,
            hidden_size=16,
            ffn_hidden_size=32,
            kv_channels=8,
            num_attention_heads=2,
            multi_query_group_num=1,
            seq_length=32,
            original_rope=True,
        )
    )
    return KolorsPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=DDPMScheduler()
    )


def tiny_kandinsky22() -> KandinskyV22Pipeline:
    """Kandinsky 2.2's decoder: added-KV attention conditioned on image embeddings, a MoVQ decoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        in_channels=4,
        out_channels=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        attention_head_dim=4,
        norm_num_groups=4,
        cross_attention_dim=8,
        encoder_hid_dim=8,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(  # its spatial norms use 32 groups
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(), movq=movq)


@pytest.mark.parametrize("build", [tiny_kolors, tiny_kandinsky22], ids=["kolors", "kandinsky-2.2"])
def test_pipelines_without_a_family_are_refused(build):
    pipe = build()
    name = type(pipe).__name__
    for attempt in (family_for, scfg.enable):
        with pytest.raises(SCFGError, match=rf"supported model family \(sd_unet.*but got {name}"):
            attempt(pipe)


@pytest.mark.parametrize(
    ("fixture", "family"),
    [
        ("tiny_sd_path", "sd_unet"),
        ("tiny_sdxl_path", "sdxl_unet"),
        ("tiny_if_path", "deepfloyd_if"),
        ("tiny_if2_path", "deepfloyd_if"),
        ("tiny_pixart_path", "pixart"),
        ("tiny_sd3_path", "sd3_mmdit"),
    ],
)
def test_supported_pipelines_keep_their_family(fixture, family, request):
    pipe = DiffusionPipeline.from_pretrained(str(request.getfixturevalue(fixture)), use_safetensors=True)
    assert family_for(pipe).name == family
