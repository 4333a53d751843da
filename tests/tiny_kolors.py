"""A tiny Kolors pipeline built offline: a ChatGLM3-shaped text encoder over a sentencepiece model trained here on the
test words, a ChatGLM tokenizer (left padding, `[gMASK] sop` prefix), and an SDXL-shaped UNet that projects the
ChatGLM states itself (`encoder_hid_dim_type="text_proj"`, as the released Kolors UNet does).

Used by tests/test_pipeline_kolors.py through a session fixture; nothing here downloads anything.
"""

from __future__ import annotations

import io
import os
import string

import torch
from conftest import WORDS, sharpen_attention, tiny_vae

CHATGLM_HIDDEN = 16  # the tiny ChatGLM's hidden size (4096 in ChatGLM3-6B): what the UNet's `text_proj` projects
ADD_TIME_DIM = 8


def write_chatglm_tokenizer(folder) -> str:
    """Train a sentencepiece unigram model whose pieces are `▁<word>` for the test words plus single characters, and
    return the path of its `tokenizer.model`.

    The words are user-defined symbols, so each test word is one token whatever the training statistics; other words
    split into characters. One thread and fixed input: the model file is the same bytes on every run.
    """
    import sentencepiece as spm

    sentences = [" ".join(WORDS), " ".join(string.ascii_lowercase), string.ascii_lowercase]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=64,
        hard_vocab_limit=False,  # as many pieces as the tiny corpus has
        character_coverage=1.0,
        user_defined_symbols=["▁" + w for w in WORDS],
        unk_id=0,  # ChatGLM3's layout: <unk> (also its padding), <s>, </s>
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def tiny_chatglm_config(vocab_size: int):
    """A 2-layer ChatGLM3 (multi-query attention, 2D rotary, RMSNorm, QKV bias) wide enough for the tokenizer.

    Two layers, because the pipeline reads the penultimate hidden states: with one layer they would be the token
    embeddings, where padding is trivially identical.
    """
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    return ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=64 if vocab_size <= 64 else vocab_size,
        hidden_size=CHATGLM_HIDDEN,
        ffn_hidden_size=32,
        kv_channels=8,
        num_attention_heads=2,
        multi_query_attention=True,
        multi_query_group_num=1,
        seq_length=256,  # the pipeline's `max_sequence_length` default
        original_rope=True,
        add_qkv_bias=True,
        use_cache=True,  # in the released config.json; diffusers <= 0.32's ChatGLMModel.forward reads it
    )


def tiny_kolors_unet(projected: bool = True):
    """SDXL's shape at toy size: attention at latent/2 (1 block) and latent/4 (2 blocks), "text_time" conditioning
    (6 time ids x 8 + the pooled ChatGLM state); `projected`: ChatGLM states projected to the cross-attention width
    by the UNet (Kolors' `text_proj`)."""
    from diffusers import UNet2DConditionModel

    projection = dict(encoder_hid_dim=CHATGLM_HIDDEN, encoder_hid_dim_type="text_proj") if projected else {}
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
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + CHATGLM_HIDDEN,
        cross_attention_dim=32 if projected else CHATGLM_HIDDEN,
        norm_num_groups=4,
        **projection,
    )
    sharpen_attention(unet)
    return unet


def build_tiny_kolors(folder) -> None:
    """Save a tiny KolorsPipeline to `folder` with `save_pretrained` (safetensors)."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer(write_chatglm_tokenizer(os.path.join(folder, "tokenizer_src")))
    unet = tiny_kolors_unet()
    vae = tiny_vae()
    torch.manual_seed(0)
    # `empty_init=True` (the default) skips every initialisation, and even with `False` the RMSNorm weights are
    # `torch.empty`: set them to 1, as a trained norm starts
    text_encoder = ChatGLMModel(tiny_chatglm_config(tokenizer.vocab_size), empty_init=False)
    with torch.no_grad():
        for name, param in text_encoder.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
    # Kwai-Kolors/Kolors-diffusers scheduler/scheduler_config.json: 1100 training steps, scaled linear to 0.014
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1100,
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
