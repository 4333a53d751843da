"""Every pipeline either has a family written for it or gets the clear "unsupported" error (never a wrong adapter)."""

from __future__ import annotations

import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    DiffusionPipeline,
    IFPipeline,
    KandinskyPipeline,
    KandinskyV22Pipeline,
    KolorsImg2ImgPipeline,
    KolorsPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
from diffusers.pipelines.kolors import ChatGLMModel
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

import scfg
from scfg import SCFGError
from scfg.families import FAMILIES, family_for


def tiny_chatglm() -> ChatGLMModel:
    torch.manual_seed(0)
    config = ChatGLMConfig(
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
    return ChatGLMModel(config)


def tiny_kolors(projected: bool = True, text_encoder: bool = True) -> KolorsPipeline:
    """Kolors: SDXL's UNet shape ("text_time"), ChatGLM3 states projected in by the UNet ("text_proj", as the
    released UNet is configured); `projected=False` is the UNet of diffusers' own Kolors tests, which has none.

    No ChatGLM tokenizer (routing reads the text encoder; tests/tiny_kolors.py builds one for the runs).
    """
    from conftest import tiny_vae

    projection = dict(encoder_hid_dim=16, encoder_hid_dim_type="text_proj") if projected else {}
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
        **projection,
    )
    return KolorsPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_chatglm() if text_encoder else None,
        tokenizer=None,
        unet=unet,
        scheduler=DDPMScheduler(),
    )


def tiny_movq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(  # its spatial norms use 32 groups
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


def tiny_kandinsky_unet(**conditioning) -> UNet2DConditionModel:
    """A Kandinsky 2.x decoder UNet (added-KV attention, as diffusers' Kandinsky tests build it)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
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
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        **conditioning,
    )


def tiny_kandinsky21() -> KandinskyPipeline:
    """Kandinsky 2.1's decoder: M-CLIP text and image embeddings ("text_image_proj", "text_image"), a MoVQ decoder.

    No XLM-R tokenizer: older transformers build it only from a sentencepiece file.
    """
    unet = tiny_kandinsky_unet(
        encoder_hid_dim=16, encoder_hid_dim_type="text_image_proj", addition_embed_type="text_image"
    )
    torch.manual_seed(0)
    text_encoder = MultilingualCLIP(
        MCLIPConfig(
            numDims=8,
            transformerDimensions=16,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=32,
        )
    )
    return KandinskyPipeline(
        text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=DDPMScheduler(), movq=tiny_movq()
    )


def tiny_kandinsky22() -> KandinskyV22Pipeline:
    """Kandinsky 2.2's decoder: image embeddings only ("image_proj", "image"), a MoVQ decoder, no text encoder."""
    unet = tiny_kandinsky_unet(encoder_hid_dim=8, encoder_hid_dim_type="image_proj", addition_embed_type="image")
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(), movq=tiny_movq())


KOLORS = {
    "kolors": tiny_kolors,
    "kolors-unprojected": partial(tiny_kolors, projected=False),
    "kolors-prompt-embeds": partial(tiny_kolors, text_encoder=False),
    "kolors-unprojected-prompt-embeds": partial(tiny_kolors, projected=False, text_encoder=False),
}

UNSUPPORTED = {
    "kandinsky-2.1": tiny_kandinsky21,
    "kandinsky-2.2": tiny_kandinsky22,
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_pipelines_without_a_family_are_refused(case):
    pipe = UNSUPPORTED[case]()
    name = type(pipe).__name__
    families = re.escape("(" + ", ".join(FAMILIES) + ": ")
    for attempt in (family_for, scfg.enable):
        with pytest.raises(SCFGError, match=rf"supported model family {families}.*but got {name} with denoiser"):
            attempt(pipe)


@pytest.mark.parametrize("case", sorted(KOLORS))
def test_kolors_pipelines_route_to_kolors(case):
    # Kolors has SDXL's UNet shape but one ChatGLM encoder; run on prompt embeddings (no text encoder, no tokenizer)
    # the pipeline says Kolors. Not SDXL, not SD: their CLIP assumptions (start token 0, no padding ties) do not hold.
    pipe = KOLORS[case]()
    assert family_for(pipe).name == "kolors"
    assert family_for(KolorsImg2ImgPipeline(**pipe.components)).name == "kolors"


def test_kolors_unet_in_a_bare_holder_routes_by_its_text_projection():
    # a holder of the denoiser alone (as the benchmarks use): the UNet's own ChatGLM projection says Kolors; without
    # it, nothing says which text the UNet expects
    projected, unprojected = (
        tiny_kolors(text_encoder=False).unet,
        tiny_kolors(projected=False, text_encoder=False).unet,
    )
    assert family_for(SimpleNamespace(unet=projected, text_encoder=None)).name == "kolors"
    with pytest.raises(SCFGError, match="but got SimpleNamespace with denoiser UNet2DConditionModel"):
        family_for(SimpleNamespace(unet=unprojected, text_encoder=None))


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


def test_stable_diffusion_variants_keep_sd_unet(tiny_sd):
    components = tiny_sd.components
    controlnet = ControlNetModel.from_unet(tiny_sd.unet, conditioning_embedding_out_channels=(16, 16))
    variants = [
        StableDiffusionImg2ImgPipeline(**components),
        StableDiffusionInpaintPipeline(**components),
        StableDiffusionControlNetPipeline(**components, controlnet=controlnet),
        StableDiffusionPAGPipeline(**components),
        StableDiffusionPipeline(**{**components, "text_encoder": None, "tokenizer": None}),  # run on prompt_embeds
    ]
    assert [family_for(pipe).name for pipe in variants] == ["sd_unet"] * len(variants)


def test_sdxl_refiner_and_if_without_text_encoder_keep_their_family(tiny_sdxl_path, tiny_if_path):
    sdxl = DiffusionPipeline.from_pretrained(str(tiny_sdxl_path), use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline(**{**sdxl.components, "text_encoder": None, "tokenizer": None})
    assert family_for(refiner).name == "sdxl_unet"
    deepfloyd = DiffusionPipeline.from_pretrained(str(tiny_if_path), use_safetensors=True)
    assert family_for(IFPipeline(**{**deepfloyd.components, "text_encoder": None})).name == "deepfloyd_if"


def tiny_ip_adapter(unet: UNet2DConditionModel, image_dim: int = 8) -> dict:
    """A random IP-Adapter state dict for `unet`, in the layout `load_ip_adapter` reads (keys 1, 3, 5... per attn2)."""
    generator = torch.Generator().manual_seed(5)
    cross = unet.config.cross_attention_dim
    adapter = {}
    cross_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for i, name in enumerate(cross_layers):
        key_id = 2 * i + 1
        hidden = unet.get_submodule(name[: -len(".processor")]).to_q.in_features
        adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=generator) / cross**0.5
        adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=generator) / cross**0.5
    image_proj = {
        "proj.weight": torch.randn(4 * cross, image_dim, generator=generator) / image_dim**0.5,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": adapter}


def test_ip_adapter_keeps_sd_unet_and_runs(tiny_sd):
    # `load_ip_adapter` sets `encoder_hid_dim_type="ip_image_proj"`: only the image embeddings are projected.
    tiny_sd.load_ip_adapter(tiny_ip_adapter(tiny_sd.unet), subfolder="", weight_name="", image_encoder_folder=None)
    assert tiny_sd.unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert family_for(tiny_sd).name == "sd_unet"
    recorder = scfg.Recorder()
    embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(6))]  # [uncond; cond] image embeddings
    with scfg.enable(tiny_sd, on_step=recorder):
        out = tiny_sd(
            "a red cat",
            height=64,
            width=64,
            num_inference_steps=2,
            output_type="latent",
            ip_adapter_image_embeds=embeds,
        ).images
    assert len(recorder.steps) == 2 and torch.isfinite(out).all()


def test_ip_adapter_on_kolors_keeps_kolors_and_runs(tmp_path):
    # Kolors keeps its ChatGLM projection as `text_encoder_hid_proj` and switches to "ip_image_proj"; the cross map is
    # the text part of the (text, image) embeddings that `attn2` gets.
    pytest.importorskip("sentencepiece")
    from tiny_kolors import build_tiny_kolors

    build_tiny_kolors(str(tmp_path))
    pipe = KolorsPipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(tiny_ip_adapter(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    assert pipe.unet.config.encoder_hid_dim_type == "ip_image_proj" and pipe.unet.text_encoder_hid_proj is not None
    assert family_for(pipe).name == "kolors"
    assert family_for(KolorsPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})).name == "kolors"
    recorder = scfg.Recorder()
    embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(6))]  # [uncond; cond] image embeddings
    with scfg.enable(pipe, on_step=recorder):
        out = pipe(
            "a red cat",
            height=32,
            width=48,
            num_inference_steps=2,
            output_type="latent",
            ip_adapter_image_embeds=embeds,
        ).images
    assert len(recorder.steps) == 2 and torch.isfinite(out).all()
    assert recorder.steps[0].token_masks.shape == (1, 256, 4, 6)
