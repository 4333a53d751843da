"""Stable Diffusion 1.x/2.x: `UNet2DConditionModel` with CLIP text conditioning.

Region definition (the authors' recipe): the cross-attention (`attn2`) and self-attention (`attn1`) of every
transformer block at the latent/4 and latent/8 grids; for SD 1.5 at 512 px these are the two blocks of
`down_blocks.2` and the three of `up_blocks.1` (16x16) and the mid block (8x8). Levels are read from the UNet's
structure (which blocks downsample), so any depth works, and checked against the real grid at run time.
The CFG batch is `[uncond, cond]`, the order in which the diffusers pipelines concatenate prompt embeddings.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

from .base import Family, LayerPair

__all__ = ["FAMILY"]


def _block_levels(unet: UNet2DConditionModel) -> dict[str, int]:
    """Map each block prefix (`down_blocks.2`, `mid_block`, `up_blocks.1`) to its downsampling factor."""
    levels: dict[str, int] = {}
    level = 1
    for i, block in enumerate(unet.down_blocks):
        levels[f"down_blocks.{i}"] = level
        if getattr(block, "downsamplers", None) is not None:
            level *= 2
    levels["mid_block"] = level
    for i, block in enumerate(unet.up_blocks):
        levels[f"up_blocks.{i}"] = level
        if getattr(block, "upsamplers", None) is not None:
            level //= 2
    return levels


def has_added_kv_attention(unet: nn.Module) -> bool:
    """Whether the UNet's attention attends jointly to text through `add_k_proj` (DeepFloyd IF, Kandinsky)."""
    return any(isinstance(m, Attention) and m.add_k_proj is not None for m in unet.modules())


def has_clip_text(pipe: Any, suffix: str = "") -> bool:
    """Whether `pipe.text_encoder{suffix}` is a transformers CLIP text model or None (prompt embeddings passed in),
    and `pipe.tokenizer{suffix}`, if any, a CLIP tokenizer: the start token is token 0, the maps' reference."""
    text_encoder = getattr(pipe, f"text_encoder{suffix}", None)
    tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
    return (text_encoder is None or isinstance(text_encoder, (CLIPTextModel, CLIPTextModelWithProjection))) and (
        tokenizer is None or isinstance(tokenizer, (CLIPTokenizer, CLIPTokenizerFast))
    )


def feeds_text_directly(unet: UNet2DConditionModel) -> bool:
    """Whether the prompt's hidden states reach cross-attention as they are, with no projection of the model's own.

    `encoder_hid_dim_type` is None, or "ip_image_proj" (a loaded IP-Adapter: it projects only the image embeddings).
    Kolors projects ChatGLM states ("text_proj") and keeps that projection as `text_encoder_hid_proj` while an
    IP-Adapter is loaded; Kandinsky 2.x projects image embeddings ("text_image_proj", "image_proj").
    """
    return unet.config.encoder_hid_dim_type in (None, "ip_image_proj") and (
        getattr(unet, "text_encoder_hid_proj", None) is None
    )


def forward_rank(name: str) -> tuple[int, int, str]:
    """Sort key in forward order: down blocks, mid block, up blocks (`named_modules` lists up before mid)."""
    parts = name.split(".")
    group = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(parts[0], 3)
    index = int(parts[1]) if group in (0, 2) else 0
    return group, index, name


class SDUNetFamily(Family):
    """Adapter for StableDiffusion 1.x/2.x pipelines (text-to-image, img2img, inpainting, ControlNet).

    Everything but the pipeline match and the layers is `base.Family`'s default: separate `attn1`/`attn2`, the
    `[uncond, cond]` batch, CLIP tokens.
    """

    name = "sd_unet"
    default_levels = (4, 8)

    def matches(self, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        # A UNet conditioned directly on CLIP hidden states. Not SDXL (a second text encoder, "text_time" added
        # conditioning), not Kolors (ChatGLM), not IF or Kandinsky (T5 or image embeddings, added-KV attention).
        return (
            isinstance(unet, UNet2DConditionModel)
            and not hasattr(pipe, "text_encoder_2")
            and feeds_text_directly(unet)
            and unet.config.addition_embed_type is None
            and not has_added_kv_attention(unet)
            and has_clip_text(pipe)
        )

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        levels = _block_levels(denoiser)  # type: ignore[arg-type]
        pairs = []
        for name, module in denoiser.named_modules():
            if not (isinstance(module, Attention) and module.is_cross_attention and name.endswith(".attn2")):
                continue
            prefix = ".".join(name.split(".")[:2]) if not name.startswith("mid_block") else "mid_block"
            self_name = name[: -len("attn2")] + "attn1"
            self_module = denoiser.get_submodule(self_name) if hasattr(denoiser, "get_submodule") else None
            has_self = isinstance(self_module, Attention) and not self_module.is_cross_attention
            pairs.append(LayerPair(cross=name, self_attn=self_name if has_self else None, level=levels[prefix]))
        return sorted(pairs, key=lambda pair: forward_rank(pair.cross))


FAMILY = SDUNetFamily()
