"""Tiny, offline Stable Diffusion pipelines built from configs, saved and reloaded like real checkpoints."""

from __future__ import annotations

import json
import os
import string
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

WORDS = ["a", "red", "blue", "green", "cat", "dog", "circle", "square", "on", "left", "of", "the", "sofa"]


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@pytest.fixture(autouse=True, scope="session")
def float64_causal_mask():
    """Version compat (transformers 4.x, the floor): CLIP's causal mask is filled with `finfo(float64).min` in a
    float32 `torch.full`, which overflows for the float64 text encoders of the reference tests. 5.x builds it in
    the mask's dtype; on 4.x build it with float64 as the default dtype. Nothing changes on 5.x."""
    if transformers_major() >= 5:
        yield
        return
    from transformers.modeling_attn_mask_utils import AttentionMaskConverter

    original = AttentionMaskConverter._make_causal_mask

    lock = threading.Lock()  # the default dtype is process-wide: threads (test_reliability) must not interleave

    def make_causal_mask(input_ids_shape, dtype, *args, **kwargs):
        with lock:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64 if dtype == torch.float64 else previous)
            try:
                return original(input_ids_shape, dtype, *args, **kwargs)
            finally:
                torch.set_default_dtype(previous)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AttentionMaskConverter, "_make_causal_mask", staticmethod(make_causal_mask))
        yield


def write_tokenizer(folder) -> None:
    """A CLIP tokenizer whose vocabulary is whole words plus single characters; no merges needed."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [
        *string.ascii_lowercase,
        *(c + "</w>" for c in string.ascii_lowercase),
        *(w + "</w>" for w in WORDS),
    ]:
        vocab.setdefault(piece, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    # Merges that build each word from its characters, so whole words become one token.
    merges = ["#version: 0.2"]
    seen = set()
    for word in WORDS:
        if len(word) < 2:
            continue
        parts = [*list(word[:-1]), word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in seen:
                seen.add(pair)
                merges.append(f"{pair[0]} {pair[1]}")
                vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(folder)


def sharpen_attention(model, suffixes=("to_q.weight", "to_k.weight")) -> None:
    """Scale query/key weights so that random attention has clear winners (random init is nearly uniform)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(suffixes):
                param.mul_(4.0)


def tiny_vae(**overrides):
    """A 2-block AutoencoderKL: 8 channels, downsampling by 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = dict(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
    )
    return AutoencoderKL(**{**config, **overrides})


def tiny_clip_text_config(tokenizer) -> dict:
    """Arguments of a 2-layer CLIP text encoder (hidden 16, projection 16) over `tokenizer`'s vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=16,
    )


def build_tiny_sd(folder, prediction_type: str = "epsilon", demo_vocabulary: bool = False) -> None:
    """Save a tiny StableDiffusionPipeline whose UNet has cross-attention at latent/4 and latent/8."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if demo_vocabulary:
        from scfg.demo.data import write_tokenizer as write_demo_tokenizer

        write_demo_tokenizer(os.path.join(folder, "tokenizer_src"), max_length=24)
    else:
        write_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    sharpen_attention(unet)
    vae = tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_demo_path(tmp_path_factory):
    """A tiny SD pipeline with the demo domain's word-level vocabulary (untrained)."""
    folder = tmp_path_factory.mktemp("tiny-demo")
    build_tiny_sd(str(folder), demo_vocabulary=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-v")
    build_tiny_sd(str(folder), prediction_type="v_prediction")
    return folder


def load_pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_sd(tiny_sd_path):
    """A fresh pipeline per test, loaded through `from_pretrained` (the real loading path)."""
    return load_pipe(tiny_sd_path)


def build_tiny_sdxl(folder) -> None:
    """Save a tiny StableDiffusionXLPipeline: attention at latent/2 and latent/4, two text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=4,
    )
    sharpen_attention(unet)
    vae = tiny_vae()
    text_config = tiny_clip_text_config(tokenizer)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(str(folder))
    return folder


def write_t5_tokenizer(folder) -> None:
    """A T5 (Unigram) tokenizer over the test words: no start token, `</s>` at the end, `<pad>` after."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase] + [("▁", -3.0)]
    if transformers_major() >= 5:
        from transformers import T5Tokenizer

        tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)
    else:  # 4.x: the same `tokenizers` pipeline as 5.x's `T5Tokenizer(vocab=...)`, wrapped in `T5TokenizerFast`
        from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import Unigram
        from transformers import T5TokenizerFast

        backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
        )
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
        )
        tokenizer = T5TokenizerFast(
            tokenizer_object=backend,
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_ids=0,
            model_max_length=77,
        )
    tokenizer.save_pretrained(folder)


def build_tiny_if(folder, stage: int = 1) -> None:
    """Save a tiny DeepFloyd IF stage I (or II) pipeline: joint added-KV attention at latent/4 and latent/8."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # 5.x: `T5TokenizerFast is T5Tokenizer`

    write_t5_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    extra = {"class_embed_type": "timestep"} if stage == 2 else {}
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=(
            "ResnetDownsampleBlock2D",
            "ResnetDownsampleBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
        ),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=(
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "ResnetUpsampleBlock2D",
            "ResnetUpsampleBlock2D",
        ),
        in_channels=3 if stage == 1 else 6,
        out_channels=6,
        cross_attention_dim=32,  # the cross-attention group norm has 32 groups
        encoder_hid_dim=16,
        attention_head_dim=4,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=4,
        **extra,
    )
    sharpen_attention(unet, ("to_q.weight", "to_k.weight", "add_k_proj.weight"))
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        variance_type="learned_range",
    )
    common = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    if stage == 1:
        pipe = IFPipeline(**common)
    else:
        noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        pipe = IFSuperResolutionPipeline(image_noising_scheduler=noising, **common)
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_if_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-if")
    build_tiny_if(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_if2_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-if2")
    build_tiny_if(str(folder), stage=2)
    return folder


def build_tiny_pixart(folder) -> None:
    """Save a tiny PixArtSigmaPipeline: 4 DiT blocks, patch 2, learned sigma, T5 with padding masks."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # 5.x: `T5TokenizerFast is T5Tokenizer`

    write_t5_tokenizer(os.path.join(folder, "tokenizer_src"))
    tokenizer = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_src"))
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=4,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=16,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    sharpen_attention(transformer)
    vae = tiny_vae()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_pixart_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-pixart")
    build_tiny_pixart(str(folder))
    return folder


def build_tiny_sd3(folder) -> None:
    """Save a tiny StableDiffusion3Pipeline: 4 joint MMDiT blocks, two CLIP encoders and a T5 encoder."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,  # 5.x: `T5TokenizerFast is T5Tokenizer`; 4.x: the one that loads from tokenizer.json
    )

    write_tokenizer(os.path.join(folder, "clip_src"))
    write_t5_tokenizer(os.path.join(folder, "t5_src"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "clip_src"))
    t5_tok = T5TokenizerFast.from_pretrained(os.path.join(folder, "t5_src"))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    )
    sharpen_attention(transformer, ("to_q.weight", "to_k.weight", "add_k_proj.weight"))
    clip_config = tiny_clip_text_config(clip_tok)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))
    torch.manual_seed(2)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # SD3's VAE is shifted and scaled before decoding (the real one: 0.0609 and 1.5305)
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3(str(folder))
    return folder


def build_tiny_flux(folder) -> None:
    """Save a tiny FluxPipeline: 2 double-stream and 2 single-stream blocks, a CLIP and a T5 encoder.

    FLUX packs 2x2 latent patches into one token, so the transformer's `in_channels` is 4 x the VAE's latent
    channels; with the 2-block VAE (downsampling by 2) the image size must be a multiple of 4, and a 32x48 image is
    an 8x12 token grid. The rotary axes (4 + 4 + 8) add up to the head dimension, 16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,  # 5.x: `T5TokenizerFast is T5Tokenizer`; 4.x: the one that loads from tokenizer.json
    )

    write_tokenizer(os.path.join(folder, "clip_src"))
    write_t5_tokenizer(os.path.join(folder, "t5_src"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "clip_src"))
    t5_tok = T5TokenizerFast.from_pretrained(os.path.join(folder, "t5_src"))
    clip_config = tiny_clip_text_config(clip_tok)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=clip_config["hidden_size"],  # CLIPTextModel's pooled output
        axes_dims_rope=[4, 4, 8],
    )
    # The QK RMS norms undo any scaling of `to_q`/`to_k`; scaling the norms' weights sharpens the logits instead.
    sharpen_attention(transformer, ("norm_q.weight", "norm_added_q.weight"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config))
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # FLUX's VAE has no quant convs and is shifted and scaled before decoding (the real one: 0.1159 and 0.3611)
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux(str(folder))
    return folder
