"""Per-step cost of S-CFG against plain CFG on full-size denoisers with random weights (no download).

    python benchmarks/overhead.py --model sd15 --reps 5            # SD 1.5 UNet at 512x512, float32 CPU
    python benchmarks/overhead.py --model sdxl --reps 3            # SDXL UNet at 1024x1024 (Kolors: --model kolors)
    python benchmarks/overhead.py --model pixart-sigma --size 512  # PixArt-Sigma, SD3-medium: --model sd3
    python benchmarks/overhead.py --model flux --blocks 1  # FLUX.1 true CFG, cut to 1 + 2 blocks (default 2 + 4)
    python benchmarks/overhead.py --model chroma --size 512  # Chroma (FLUX.2 [klein]: flux2-klein), 2 + 4 blocks
    python benchmarks/overhead.py --model qwen-image --size 512  # Qwen-Image true CFG, cut to 4 of 60 blocks
    python benchmarks/overhead.py --model wan --frames 81 --device cuda  # Wan 2.1 1.3B at 480x832, 4 of 30 blocks
    python benchmarks/overhead.py --model ltx  # LTX-Video 0.9, 25 frames at 512x768, 4 of 28 blocks
    python benchmarks/overhead.py --model z-image --size 512  # Z-Image (list CFG; Krea 2: krea2), 4 blocks
    python benchmarks/overhead.py --model hunyuan-video15 --device cuda  # 33 frames at 480x848, 4 of 54 blocks
    python benchmarks/overhead.py --model sd15 --device cuda --dtype float16

Methods, interleaved A B C A B C ... after a warm-up, median over `--reps` steps each:
- `cfg`: the denoiser on the CFG batch [uncond, cond] (or, for FLUX's true CFG, a cond pass then an uncond pass)
  plus the CFG line;
- `scfg`: the same with `scfg.enable` (hooks on the used layers only, SDPA kept);
- `scfg-all-layers`: `scfg.SCFGConfig()` as it is, without the family's preset overrides (SDXL: all 60 latent/4
  layers instead of the last of each stack);
- `scfg-reuse`: a step that reuses the previous step's regions (`mask_interval=2`): no attention captured;
- `naive`: prior art: every attention processor replaced by one that materialises softmax(QK^T) per head and
  keeps every map at latent/2 and below; the same S-CFG rule then runs on the stored maps (UNets only: the prior
  ports exist for SD/SDXL).
Peak memory is measured in a fresh subprocess per method (RSS on CPU, max allocated on GPU).
Prints a markdown table with ratios against `cfg` from the same run, and for a cut model the factor by which
`time / CFG - 1` transfers to the whole one (`_cut`, `transfer`).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
KOLORS_UNET = dict(  # Kwai-Kolors/Kolors-diffusers unet/config.json: SDXL's UNet, ChatGLM3 states projected in
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    encoder_hid_dim=4096,  # ChatGLM3-6B's hidden size, projected to 2048 by the UNet ("text_proj")
    encoder_hid_dim_type="text_proj",
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=5632,  # 6 time ids x 256 + ChatGLM's pooled 4096
)
PIXART_SIGMA = dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    sample_size=128,
    patch_size=2,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json, 19 + 38 blocks, cut by --blocks
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CHROMA_HD = dict(  # lodestones/Chroma1-HD (ChromaTransformer2DModel's defaults), 19 + 38 blocks, cut by --blocks
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    axes_dims_rope=(16, 56, 56),
    approximator_num_channels=64,
    approximator_hidden_dim=5120,
    approximator_layers=5,
)
FLUX2_KLEIN_4B = dict(  # FLUX.2 [klein] (base) 4B: diffusers' scripts/convert_flux2_to_diffusers.py "klein-4b"
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,  # Qwen3-4B's layers 9, 18 and 27 side by side (3 x 2560)
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
WAN21_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, 30 blocks, cut by --blocks
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
QWEN_IMAGE = dict(  # Qwen/Qwen-Image transformer/config.json, 60 double-stream blocks, cut by --blocks
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
LTX_VIDEO = dict(  # Lightricks/LTX-Video (0.9) transformer/config.json, 28 blocks, cut by --blocks
    in_channels=128,
    out_channels=128,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=32,
    attention_head_dim=64,
    cross_attention_dim=2048,
    num_layers=28,
    activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=4096,
    attention_bias=True,
    attention_out_bias=True,
)
HUNYUAN_VIDEO15 = dict(  # hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v transformer (8.3B, 54 blocks)
    in_channels=65,  # 32 latent channels, 32 of the condition latent, 1 mask
    out_channels=32,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=54,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    text_embed_dim=3584,  # Qwen2.5-VL-7B
    text_embed_2_dim=1472,  # byT5 glyph encoder
    image_embed_dim=1152,  # SigLIP
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    target_size=640,
    task_type="t2v",
)
SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)


@dataclass(frozen=True)
class Model:
    """A full-size denoiser from its real config: how to build it, its CFG-batch inputs, and the attribute names
    under which a pipeline holds it (what `scfg.enable` recognises the family by)."""

    name: str
    size: int  # image side in pixels (the latent is size / 8)
    build: Callable[[int | str | None], nn.Module]  # the cut's block count, "full", or None for a whole model
    inputs: Callable[..., dict]  # (latent side, device, dtype[, video_frames=])
    holder: tuple[str, ...]
    naive: bool  # prior art exists (UNets): measure the naive approach too
    passes: str = "batched"  # how its pipeline runs CFG: one [uncond, cond] batch, "separate" passes, or "list"
    blocks: int | None = None  # the default cut (see `_cut`); None: the whole model is built
    frames: int | None = None  # video models: the clip's frames by default


def _unet(config):
    def build(blocks):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)

    return build


def _transformer(cls_name, config):
    def build(blocks):
        import diffusers

        return getattr(diffusers, cls_name)(**config)

    return build


def _sd15_inputs(latent, device, dtype):
    return dict(
        sample=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(2, 77, 768, device=device, dtype=dtype),
    )


def _sdxl_inputs(latent, device, dtype):
    size = latent * 8
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)
    return dict(
        sample=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(2, 77, 2048, device=device, dtype=dtype),
        added_cond_kwargs={"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype), "time_ids": time_ids},
    )


def _kolors_inputs(latent, device, dtype):
    # 256 ChatGLM3 tokens (KolorsPipeline's `max_sequence_length`), 4096 wide: the UNet projects them itself. The
    # whole UNet fits (SDXL-sized, ~10 GB in float32): the ratio is the full model's.
    size = latent * 8
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)
    return dict(
        sample=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(2, 256, 4096, device=device, dtype=dtype),
        added_cond_kwargs={"text_embeds": torch.randn(2, 4096, device=device, dtype=dtype), "time_ids": time_ids},
    )


def _pixart_inputs(latent, device, dtype):
    return dict(
        hidden_states=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, 300, 4096, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(2, 300, device=device, dtype=dtype),
        timestep=torch.tensor([500, 500], device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _sd3_inputs(latent, device, dtype):
    return dict(
        hidden_states=torch.randn(2, 16, latent, latent, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, 333, 4096, device=device, dtype=dtype),  # 77 CLIP + 256 T5
        pooled_projections=torch.randn(2, 2048, device=device, dtype=dtype),
        timestep=torch.tensor([500, 500], device=device),
    )


def _cut(cls_name, config, key, single=None):
    """A transformer from its real config with its stack of blocks (`config[key]`) cut to `blocks`, and for the
    FLUX-like models its single-stream stack (`config[single]`) to twice that; `blocks="full"` keeps the whole."""

    def build(blocks):
        import diffusers

        cls = getattr(diffusers, cls_name)
        if blocks == "full":
            return cls(**config)
        return cls(**{**config, key: blocks, **({single: 2 * blocks} if single else {})})

    return build


# Where a whole model does not fit in 24 GiB in float32, or a CPU step of it takes many minutes, the `Model` entry
# cuts its blocks (`Model.blocks`, `--blocks`) and keeps every width, head count and the text length. S-CFG's extra
# work per step is per captured layer (each of the same geometry), plus the regions and the rule, once per step; the
# step's work is proportional to the parameters (each parameter multiplies every token once). So `time / CFG - 1`
# of the cut model transfers to the full one multiplied by (captured_full / parameters_full) / (captured_cut /
# parameters_cut), which `transfer()` computes from the full model built on the meta device, and prints.


def _flux(config):
    return _cut("FluxTransformer2DModel", config, "num_layers", "num_single_layers")


def _flux_inputs(latent, device, dtype):
    tokens = (latent // 2) ** 2
    rows, cols = torch.meshgrid(torch.arange(latent // 2), torch.arange(latent // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(device, dtype)
    return dict(
        hidden_states=torch.randn(1, tokens, 64, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, 768, device=device, dtype=dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(512, 3, device=device, dtype=dtype),
    )


def _chroma(config):
    return _cut("ChromaTransformer2DModel", config, "num_layers", "num_single_layers")


_CHROMA_KEPT = 66  # T5 positions Chroma keeps of 512: a 64-token prompt, `</s>` and one pad; the rest masked


def _chroma_inputs(latent, device, dtype):
    inputs = _flux_inputs(latent, device, dtype)
    del inputs["pooled_projections"], inputs["guidance"]  # Chroma has neither
    tokens = inputs["hidden_states"].shape[1]
    # as ChromaPipeline builds it: the kept text positions, then every image token, in the embeddings' dtype
    mask = torch.ones(1, 512 + tokens, device=device, dtype=dtype)
    mask[:, _CHROMA_KEPT:512] = 0
    return {**inputs, "attention_mask": mask}


def _flux2_klein(config):
    return _cut("Flux2Transformer2DModel", config, "num_layers", "num_single_layers")


def _flux2_klein_inputs(latent, device, dtype):
    grid = latent // 2  # the 32-channel latent (size / 8) patchified 2x2 into 128 channels
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(grid), torch.arange(grid), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(512))
    return dict(
        hidden_states=torch.randn(1, grid * grid, 128, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, 7680, device=device, dtype=dtype),  # not masked: all 512 attended
        timestep=torch.tensor([0.5], device=device, dtype=dtype),  # the pipeline passes t / 1000
        img_ids=ids.to(device),
        txt_ids=text_ids.to(device),
        guidance=None,
    )


def _wan(config):
    return _cut("WanTransformer3DModel", config, "num_layers")


_WAN_FRAMES = 17  # video frames: (17 - 1) / 4 + 1 = 5 latent frames


def _wan_inputs(latent, device, dtype, video_frames=_WAN_FRAMES):
    # `--size` is the height; the width keeps Wan's 480x832 aspect (60x104 latent at 480), even for the 2x2 patch
    width = 2 * round(latent * 832 / 480 / 2)
    frames = (video_frames - 1) // 4 + 1
    return dict(
        hidden_states=torch.randn(1, 16, frames, latent, width, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=dtype),  # no zero padding: all 512 real
        timestep=torch.tensor([500], device=device),
    )


def _qwen_image(config):
    return _cut("QwenImageTransformer2DModel", config, "num_layers")


_QWEN_TEXT = 256  # Qwen-Image does not pad a single prompt: a long prompt plus the template's 5 closing tokens


def _qwen_image_inputs(latent, device, dtype):
    grid = latent // 2  # 2x2 packed tokens of the 16-channel latent
    return dict(
        hidden_states=torch.randn(1, grid * grid, 64, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, _QWEN_TEXT, 3584, device=device, dtype=dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),  # the pipeline passes t / 1000
        img_shapes=[[(1, grid, grid)]],
    )


def _ltx(config):
    return _cut("LTXVideoTransformer3DModel", config, "num_layers")


_LTX_FRAMES = 25  # video frames: (25 - 1) / 8 + 1 = 4 latent frames
_LTX_TEXT = 128  # LTXPipeline's default max_sequence_length


def _ltx_inputs(latent, device, dtype, video_frames=_LTX_FRAMES):
    # `--size` is the height; the width keeps 512x768's aspect. LTX's VAE compresses 32x in space (the harness's
    # `latent` is size / 8) and 8x in time; tokens are packed [B, F·H·W, 128] (patch sizes 1 and 1)
    height = latent // 4
    width = 2 * round(height * 768 / 512 / 2)
    frames = (video_frames - 1) // 8 + 1
    return dict(
        hidden_states=torch.randn(2, frames * height * width, 128, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, _LTX_TEXT, 4096, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(2, _LTX_TEXT, device=device, dtype=dtype),  # no padding: all 128 real
        timestep=torch.tensor([500, 500], device=device),
        num_frames=frames,
        height=height,
        width=width,
        rope_interpolation_scale=(8 / 25, 32, 32),  # (temporal compression / frame rate, spatial, spatial)
    )


def _hunyuan_video15(config):
    return _cut("HunyuanVideo15Transformer3DModel", config, "num_layers")


_HUNYUAN_FRAMES = 33  # video frames: (33 - 1) / 4 + 1 = 9 latent frames
_HUNYUAN_PROMPT = 120  # valid Qwen tokens of a prompt (the pipeline pads to 1000); no quoted text for byT5


def _hunyuan_video15_inputs(latent, device, dtype, video_frames=_HUNYUAN_FRAMES):
    # `--size` is the height; the width keeps 480x848's aspect. The VAE compresses 16x in space (the harness's
    # `latent` is size / 8) and 4x in time; the patch is 1, so the 9x30x53 latent is 14,310 image tokens. The text is
    # what the pipeline passes: 1000 Qwen positions (120 valid), 256 byT5 ones (none valid), 729 zero image tokens.
    height = latent // 2
    width = round(height * 848 / 480)
    frames = (video_frames - 1) // 4 + 1
    mask = torch.zeros(1, 1000, device=device, dtype=dtype)
    mask[:, :_HUNYUAN_PROMPT] = 1
    return dict(
        hidden_states=torch.randn(1, 65, frames, height, width, device=device, dtype=dtype),
        timestep=torch.tensor([500.0], device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 1000, 3584, device=device, dtype=dtype),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(1, 256, 1472, device=device, dtype=dtype),
        encoder_attention_mask_2=torch.zeros(1, 256, device=device, dtype=dtype),
        image_embeds=torch.zeros(1, 729, 1152, device=device, dtype=dtype),
    )


Z_IMAGE = dict(  # Tongyi-MAI/Z-Image-Turbo transformer/config.json (the base Z-Image's shape), 30 main blocks cut
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=(32, 48, 48),
    axes_lens=(1536, 512, 512),
)
KREA2 = dict(  # Krea 2's transformer config (diffusers' Krea2Transformer2DModel defaults), 28 blocks cut
    in_channels=64,
    num_layers=28,
    attention_head_dim=128,
    num_attention_heads=48,
    num_key_value_heads=12,
    intermediate_size=16384,
    timestep_embed_dim=256,
    text_hidden_dim=2560,
    num_text_layers=12,
    text_num_attention_heads=20,
    text_num_key_value_heads=20,
    text_intermediate_size=6912,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(32, 48, 48),
    rope_theta=1000.0,
    norm_eps=1e-5,
)


def _z_image(config):
    return _cut("ZImageTransformer2DModel", config, "n_layers")


_Z_IMAGE_TEXT = (128, 8)  # caption tokens: a long prompt in the chat template, and the empty negative prompt's 8


def _z_image_inputs(latent, device, dtype):
    # ZImagePipeline's one CFG call: lists [cond, uncond] of the same latent [16, 1, H, W], the normalised time
    # (1000 - t) / 1000 in float32, and captions of their own lengths (the pipeline drops their padding)
    x = torch.randn(16, 1, latent, latent, device=device, dtype=dtype)
    return dict(
        x=[x, x.clone()],
        t=torch.tensor([0.5, 0.5], device=device),
        cap_feats=[torch.randn(n, 2560, device=device, dtype=dtype) for n in _Z_IMAGE_TEXT],
    )


def _krea2(config):
    return _cut("Krea2Transformer2DModel", config, "num_layers")


_KREA2_PROMPT = 128  # real prompt tokens of the 512 text positions; the rest of the prompt part is masked padding


def _krea2_inputs(latent, device, dtype):
    # one Krea2Pipeline pass: 2x2-packed latents, 12 tapped Qwen3-VL layers per text token, the text mask (the
    # prompt, padding, the 5-token assistant suffix), rotary ids with the text at the origin
    grid = latent // 2
    mask = torch.zeros(1, 512, dtype=torch.bool, device=device)
    mask[:, :_KREA2_PROMPT] = True
    mask[:, -5:] = True
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return dict(
        hidden_states=torch.randn(1, grid * grid, 64, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, 12, 2560, device=device, dtype=dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),  # the pipeline passes t / 1000
        position_ids=torch.cat([torch.zeros(512, 3), image_ids.float()]).to(device),
        encoder_attention_mask=mask,
    )


MODELS = {
    "sd15": Model("SD 1.5 UNet", 512, _unet(SD15_UNET), _sd15_inputs, ("unet",), True),
    "sdxl": Model("SDXL UNet", 1024, _unet(SDXL_UNET), _sdxl_inputs, ("unet", "text_encoder_2"), True),
    "kolors": Model("Kolors UNet", 1024, _unet(KOLORS_UNET), _kolors_inputs, ("unet", "text_encoder"), True),
    "pixart-sigma": Model(
        "PixArt-Sigma",
        1024,
        _transformer("PixArtTransformer2DModel", PIXART_SIGMA),
        _pixart_inputs,
        ("transformer",),
        False,
    ),
    "flux": Model(
        "FLUX.1-dev (true CFG)", 1024, _flux(FLUX_DEV), _flux_inputs, ("transformer",), False, "separate", blocks=2
    ),
    "chroma": Model(
        "Chroma1-HD (CFG)", 1024, _chroma(CHROMA_HD), _chroma_inputs, ("transformer",), False, "separate", blocks=2
    ),
    "flux2-klein": Model(
        "FLUX.2 [klein] base 4B (CFG)",
        1024,
        _flux2_klein(FLUX2_KLEIN_4B),
        _flux2_klein_inputs,
        ("transformer",),
        False,
        "separate",
        blocks=2,
    ),
    "sd3": Model(
        "SD3-medium MMDiT",
        1024,
        _transformer("SD3Transformer2DModel", SD3_MEDIUM),
        _sd3_inputs,
        ("transformer",),
        False,
    ),
    "wan": Model(
        "Wan 2.1 T2V-1.3B (480x832; --size is the height)",
        480,
        _wan(WAN21_1_3B),
        _wan_inputs,
        ("transformer",),
        False,
        "separate",
        blocks=4,
        frames=_WAN_FRAMES,
    ),
    "qwen-image": Model(
        "Qwen-Image (true CFG)",
        1024,
        _qwen_image(QWEN_IMAGE),
        _qwen_image_inputs,
        ("transformer",),
        False,
        "separate",
        blocks=4,
    ),
    "ltx": Model(
        "LTX-Video 0.9 (512x768; --size is the height)",
        512,
        _ltx(LTX_VIDEO),
        _ltx_inputs,
        ("transformer",),
        False,
        blocks=4,
        frames=_LTX_FRAMES,
    ),
    "hunyuan-video15": Model(
        "HunyuanVideo 1.5 480p T2V (cond + uncond passes through its guider, 480x848; --size is the height)",
        480,
        _hunyuan_video15(HUNYUAN_VIDEO15),
        _hunyuan_video15_inputs,
        ("transformer",),
        False,
        "separate",
        blocks=4,
        frames=_HUNYUAN_FRAMES,
    ),
    "z-image": Model(
        "Z-Image (list CFG)", 1024, _z_image(Z_IMAGE), _z_image_inputs, ("transformer",), False, "list", blocks=4
    ),
    "krea2": Model("Krea 2 (CFG)", 1024, _krea2(KREA2), _krea2_inputs, ("transformer",), False, "separate", blocks=4),
}


def build(model: Model, size: int, device: str, dtype: torch.dtype, blocks=None, frames=None):
    torch.manual_seed(0)
    denoiser = model.build(blocks or model.blocks).to(device, dtype).eval()
    clip = {"video_frames": frames or model.frames} if model.frames else {}
    return denoiser, model.inputs(size // 8, torch.device(device), dtype, **clip)


def transfer(model: Model, bench_denoiser: nn.Module) -> str:
    """How `time / CFG - 1` of a cut model transfers to the whole one (see `_cut`): the layers S-CFG captures and
    the parameters, here and in the whole model built on the meta device (no memory)."""
    if model.blocks is None:
        return "the whole model is measured"

    def captured(denoiser):
        with enabled(SimpleNamespace(model=model, denoiser=denoiser)) as handle:
            return len(handle.pairs), sum(p.numel() for p in denoiser.parameters())

    cut_layers, cut_params = captured(bench_denoiser)
    with torch.device("meta"):
        full = model.build("full")
    full_layers, full_params = captured(full)
    factor = (full_layers / full_params) / (cut_layers / cut_params)
    return (
        f"captured layers: {cut_layers} here ({cut_params / 1e9:.2f}B parameters), {full_layers} in the whole model "
        f"({full_params / 1e9:.2f}B): (time / CFG - 1) transfers to it multiplied by {factor:.3f}"
    )


def fake_pipe(model: Model, denoiser, guidance_scale=7.5, timesteps=(500,)):
    """The attributes `scfg.enable` reads from a pipeline during a denoising step."""
    holder = SimpleNamespace(
        do_classifier_free_guidance=True,
        guidance_scale=guidance_scale,
        guidance_rescale=0.0,
        scheduler=SimpleNamespace(timesteps=torch.tensor(timesteps)),
    )
    setattr(holder, model.holder[0], denoiser)
    for extra in model.holder[1:]:
        setattr(holder, extra, None)
    return holder


class NaiveProcessor:
    """Prior art: materialised softmax per head for every layer, maps kept for latent/2 and below."""

    def __init__(self, name, store, keep_max_queries):
        self.name, self.store, self.keep = name, store, keep_max_queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, q_len, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        if q_len <= self.keep:
            self.store[self.name] = probs.mean(dim=1)
        out = (probs @ v).transpose(1, 2).reshape(b, q_len, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class Bench:
    model: Model
    denoiser: nn.Module
    inputs: dict
    device: str
    uncond_text: torch.Tensor | None = None  # the negative prompt's states, for separate-pass models

    def forward(self, **overrides):
        return self.denoiser(**{**self.inputs, **overrides}).sample

    def latent(self) -> torch.Tensor:
        return self.inputs["sample"] if "sample" in self.inputs else self.inputs["hidden_states"]


def cfg_line(pred, g=7.5):
    u, c = pred.chunk(2)
    # learned-sigma channels (PixArt) are not guided
    return u[:, : c.shape[1]] + g * (c - u)


def denoise(bench: Bench, g=7.5, **overrides):
    """One step's denoiser work and CFG line, as the model's pipeline runs it: one [uncond, cond] batch, or a cond
    pass then an uncond pass (FLUX's true CFG)."""
    if bench.model.passes == "separate":
        cond = bench.forward(**overrides)
        uncond = bench.forward(**{"encoder_hidden_states": bench.uncond_text, **overrides})
        return uncond + g * (cond - uncond)
    if bench.model.passes == "list":  # Z-Image: one call on lists [cond, uncond], a prediction per sample
        cond, uncond = torch.stack(bench.forward(**overrides)).chunk(2)
        return cond + g * (cond - uncond)
    return cfg_line(bench.forward(**overrides), g)


def enabled(bench: Bench, g=7.5, config=None, timesteps=(500,)):
    """`scfg.enable` on a holder of the denoiser, with the CFG layout its pipeline uses."""
    import scfg
    from scfg.engine import CFGLayout

    layout = CFGLayout("separate", ("cond", "uncond"), "uncond", g) if bench.model.passes == "separate" else None
    return scfg.enable(fake_pipe(bench.model, bench.denoiser, g, timesteps), config, layout=layout)


def cfg_step(bench: Bench, g=7.5):
    return denoise(bench, g)


def scfg_step(bench: Bench, g=7.5):
    with enabled(bench, g):
        return denoise(bench, g)


def scfg_all_layers_step(bench: Bench, g=7.5):
    """S-CFG with an `SCFGConfig` object as it is (no family preset overrides): e.g. all 60 SDXL latent/4 layers."""
    import scfg

    with enabled(bench, g, scfg.SCFGConfig()):
        return denoise(bench, g)


def scfg_reuse_step(bench: Bench, g=7.5):
    """One step that reuses the previous step's regions (`mask_interval=2`); times only that step."""
    import scfg

    if "t" in bench.inputs:
        # Z-Image passes (1000 - t) / 1000: the schedule repeats t = 500, which the engine reads as the next step
        schedule, later = (500, 500), {}
    else:
        t = bench.inputs["timestep"]  # 500, or FLUX's 0.5 (its family reads t * 1000)
        schedule = (500, 499)
        later = {"timestep": (t * 499 / 500).to(t.dtype) if t.is_floating_point() else torch.full_like(t, 499)}
    with enabled(bench, g, scfg.SCFGConfig(mask_interval=2), schedule):
        denoise(bench, g)  # step 0 (t = 500) computes the regions
        sync(bench.device)
        t0 = time.perf_counter()
        denoise(bench, g, **later)
        sync(bench.device)
        return time.perf_counter() - t0


def naive_step(bench: Bench, g=7.5):
    """Prior art's capture (every processor replaced, every map kept), then the same engine as `scfg.enable`."""
    from scfg.capture import grid_for, level_grid
    from scfg.engine import CFGLayout, MapAccumulator, guided_prediction, step_regions
    from scfg.families import family_for

    unet, x = bench.denoiser, bench.latent()
    family = family_for(fake_pipe(bench.model, unet))
    store: dict = {}
    keep = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({n: NaiveProcessor(n[: -len(".processor")], store, keep) for n in originals})
    try:
        pred = bench.forward()
        grid = tuple(x.shape[-2:])
        accumulator = MapAccumulator(level_grid(grid, min(family.default_levels)))
        for pair in family.layer_pairs(unet):
            if pair.level in family.default_levels:
                cross = store[pair.cross]
                accumulator.add(cross, store.get(pair.self_attn), grid_for(cross.shape[1], grid))
        layout = CFGLayout("batched", ("uncond", "cond"), "uncond", g)
        regions = step_regions(accumulator.result().split(layout))
        u, c = pred.chunk(2)
        return guided_prediction(u, c, regions, layout).guided
    finally:
        unet.set_attn_processor(dict(originals))


STEPS = {
    "cfg": cfg_step,
    "scfg": scfg_step,
    "scfg-all-layers": scfg_all_layers_step,
    "scfg-reuse": scfg_reuse_step,
    "naive": naive_step,
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_one(method: str, bench: Bench) -> float:
    sync(bench.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        own = STEPS[method](bench)
    sync(bench.device)
    return own if isinstance(own, float) else time.perf_counter() - t0


def breakdown(bench: Bench):
    """Seconds spent by S-CFG's parts during one step, from the engine's own `torch.profiler.record_function`
    labels: `scfg.capture` (the hooks forming each layer's q/k), `scfg.maps` (each layer's probabilities, completion
    and maps: the N² work), `scfg.segmentation` (the step's regions) and `scfg.rate` (the rule). The profiler's own
    cost inflates the step a little, so the shares are of the profiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        total = time_one("scfg", bench)
    spent = {"capture": 0.0, "maps": 0.0, "segmentation": 0.0, "rate": 0.0}
    for event in prof.key_averages():
        part = event.key.removeprefix("scfg.")
        if event.key.startswith("scfg.") and part in spent:
            device_time = getattr(event, "device_time_total", 0.0) if bench.device.startswith("cuda") else 0.0
            spent[part] += max(event.cpu_time_total, device_time) / 1e6
    return spent, total


def op_profile(bench: Bench, pairs: int = 2, top: int = 8) -> None:
    """Self CPU time per aten op in `pairs` CFG steps and as many S-CFG steps, interleaved, and the ops whose time
    differs most (S-CFG minus CFG, per step): what S-CFG adds shows up as its own ops (`bmm`, `softmax`, `sum`),
    while the model's ops (`addmm`, fused attention) differ only by the machine's step-to-step noise."""
    from torch.profiler import ProfilerActivity, profile

    spent: dict[str, list[dict[str, float]]] = {"cfg": [], "scfg": []}
    for _ in range(pairs):
        for method in ("cfg", "scfg"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                seconds = time_one(method, bench)
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if not e.key.startswith("scfg.")}
            spent[method].append(ops)
            print(f"op profile: {method} step {seconds:.3f} s", file=sys.stderr, flush=True)
    keys = set().union(*spent["cfg"], *spent["scfg"])
    diff = {
        k: sum(o.get(k, 0.0) for o in spent["scfg"]) / pairs - sum(o.get(k, 0.0) for o in spent["cfg"]) / pairs
        for k in keys
    }
    ranked = sorted(diff.items(), key=lambda item: -abs(item[1]))[:top]
    print()
    print(f"| aten op | S-CFG - CFG self CPU time per step (s), mean of {pairs} pairs |")
    print("|---|---|")
    for key, seconds in ranked:
        print(f"| {key} | {seconds:+.3f} |")
    print(f"| (all ops) | {sum(diff.values()):+.3f} |")


def peak_memory(args, method):
    """Peak memory of one step of `method`, in a fresh process."""
    command = [sys.executable, __file__, "--model", args.model, "--size", str(args.size), "--device", args.device]
    command += ["--dtype", args.dtype, "--threads", str(args.threads)]
    command += [f"--{name}={getattr(args, name)}" for name in ("blocks", "frames") if getattr(args, name)]
    command += ["--_memory", method]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:  # e.g. SIGKILL from the kernel's out-of-memory killer
        reason = "killed: out of memory?" if out.returncode in (-9, 137) else f"exit code {out.returncode}"
        print(f"peak memory of {method}: the process failed ({reason})", file=sys.stderr)
        return {"failed": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child(args):
    """Peak memory during one step: max allocated on GPU; on CPU, RSS sampled every 2 ms by a thread (the
    process-wide `ru_maxrss` would report the model's construction instead)."""
    import threading

    import psutil

    bench = make_bench(args)
    if args.device.startswith("cuda"):
        time_one(args._memory, bench)  # warm-up: allocator pools, kernels
        torch.cuda.reset_peak_memory_stats()
        time_one(args._memory, bench)
        peak = torch.cuda.max_memory_allocated()
    else:
        process, samples, done = psutil.Process(), [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(process.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample)
        thread.start()
        time_one(args._memory, bench)
        done.set()
        thread.join()
        peak = max(samples)
    print(json.dumps({"peak": peak}))


def make_bench(args) -> Bench:
    model = MODELS[args.model]
    denoiser, inputs = build(model, args.size, args.device, getattr(torch, args.dtype), args.blocks, args.frames)
    uncond = torch.randn_like(inputs["encoder_hidden_states"]) if model.passes == "separate" else None
    return Bench(model, denoiser, inputs, args.device, uncond)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="cut models: keep this many blocks (FLUX-like: k double-, 2k single-stream)",
    )
    parser.add_argument("--frames", type=int, default=None, help="video models: the clip's frames")
    parser.add_argument("--methods", nargs="+", default=None, help="default: cfg scfg scfg-reuse (+ naive for UNets)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-methods", nargs="+", default=None, help="methods whose peak memory is measured")
    parser.add_argument(
        "--op-profile", type=int, default=0, metavar="PAIRS", help="also profile PAIRS cfg/scfg step pairs op by op"
    )
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = MODELS[args.model]
    args.size = args.size or model.size
    if args.methods is None:
        args.methods = ["cfg", "scfg", "scfg-reuse"] + (["naive"] if model.naive else [])
    if "naive" in args.methods and not model.naive:
        parser.error(f"--model {args.model}: the naive approach is only implemented for UNets (sd15, sdxl)")
    if args.blocks is not None and model.blocks is None:
        parser.error(f"--model {args.model} is measured whole: --blocks applies to the cut models only")
    if args.frames is not None and model.frames is None:
        parser.error(f"--model {args.model} is not a video model: --frames applies to wan, ltx, hunyuan-video15")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args)
        return
    bench = make_bench(args)
    for _ in range(args.warmup):
        for method in args.methods:
            time_one(method, bench)
    times = {m: [] for m in args.methods}
    for rep in range(args.reps):
        for method in args.methods:
            times[method].append(time_one(method, bench))
            print(f"rep {rep}: {method} {times[method][-1]:.3f} s", file=sys.stderr, flush=True)
    spent, total = breakdown(bench)
    if args.op_profile:
        op_profile(bench, args.op_profile)
    median = {m: statistics.median(v) for m, v in times.items()}
    params = sum(p.numel() for p in bench.denoiser.parameters()) / 1e6
    print(f"timings: {json.dumps(times)}; breakdown {json.dumps(spent)} of {total:.3f} s", flush=True)
    transfer_line = transfer(model, bench.denoiser)
    del bench  # the memory children each build their own model: do not hold a second copy meanwhile
    gc.collect()
    measured = [m for m in args.methods if args.memory_methods is None or m in args.memory_methods]
    memory = {} if args.no_memory else {m: peak_memory(args, m) for m in measured}
    k = args.blocks or model.blocks
    two_stacks = "flux" in args.model or args.model == "chroma"
    cut = (
        (f", cut to {k} double- and {2 * k} single-stream blocks" if two_stacks else f", cut to {k} blocks")
        if model.blocks
        else ""
    )
    clip = f", {args.frames or model.frames} frames" if model.frames else ""
    print(
        f"{model.name}{cut}{clip} ({params:.0f}M parameters, random weights) at {f'{args.size} px high' if model.frames else f'{args.size}x{args.size}'}, "
        f"{'cond + uncond passes' if model.passes == 'separate' else 'batch 2 (uncond+cond)'}, {args.device} {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}; medians of {args.reps} interleaved steps after "
        f"{args.warmup} warm-up"
    )
    print()
    print("| method | step time (s) | time / CFG | peak memory (GiB) | memory / CFG |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        mem = memory.get(m, {}).get("peak")
        base = memory.get("cfg", {}).get("peak")
        mem_s = f"{mem / 2**30:.2f}" if mem else memory.get(m, {}).get("failed", "-")
        ratio_s = f"{mem / base:.3f}" if mem and base else "-"
        print(f"| {m} | {median[m]:.3f} | {median[m] / median['cfg']:.3f} | {mem_s} | {ratio_s} |")
    if "scfg" in median and "naive" in median:
        ours, theirs = median["scfg"] - median["cfg"], median["naive"] - median["cfg"]
        print(
            f"\noverhead: ours {ours:+.3f} s, naive {theirs:+.3f} s, ours / naive = "
            f"{ours / theirs if theirs > 0 else float('nan'):.3f}"
        )
    share = ", ".join(f"{k} {v:.4f} s ({v / total:.1%})" for k, v in spent.items())
    print(f"S-CFG step breakdown (one instrumented step of {total:.3f} s): {share}; all steps: {json.dumps(times)}")
    # memory: S-CFG's extra bytes depend on one layer's geometry, not on the number of blocks, so the whole model's
    # memory / CFG is at most the cut one's
    print(f"transfer: {transfer_line}")


if __name__ == "__main__":
    main()
