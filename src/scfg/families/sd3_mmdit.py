"""Stable Diffusion 3 / 3.5: `SD3Transformer2DModel`, an MMDiT with joint attention over `[image; text]`.

Region definition:
- Each joint block's attention runs one softmax over the keys `[image tokens (Q); text tokens (T)]`. For the image
  queries, the image-to-text block is the cross map and the image-to-image block the self map; each block's rows
  are renormalised to sum to 1 (so completion keeps its meaning and every pixel's text attention is a
  distribution). Text queries are not needed and not computed.
- The text sequence is the CLIP part (77 tokens: CLIP-L and CLIP-G features side by side, start token first)
  followed by the T5 part (`max_sequence_length` tokens, no start token). Every position competes for regions;
  token strings and per-word scales cover both parts. CLIP's start token (position 0) is the foreground's
  reference, as in SD.
- One token grid (latent / patch size, level 2). The middle half of the joint blocks is the candidate set whose mid-depth three feed the maps (`max_layers=3`) (SD3.5's
  extra self-only `attn2` layers have no text and are not used); `layers_per_level=k` keeps the last `k`.
- Flow-matching velocity needs no change: rates are ratios of norms of the same difference. The pipeline's
  skip-layer-guidance pass (cond only) is recognised by its batch size and left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall, recorded_projection
from .base import LayerPair, PassContext, image_first_split
from .sd_unet import SDUNetFamily

__all__ = ["FAMILY", "joint_image_query_attention", "joint_image_query_probs"]

CLIP_TOKENS = 77


def joint_image_query_attention(
    attn: nn.Module, call: LayerCall, context: PassContext | None = None, budget: int | None = None
) -> AttentionRows:
    """Head-averaged joint probabilities of the image queries, `[B, Q, Q + T]` (image keys first, as in
    `JointAttnProcessor2_0`), as `AttentionRows`. Text queries are not needed and not formed."""
    hidden_states = call.input(0, "hidden_states")
    encoder_hidden_states = call.input(1, "encoder_hidden_states")
    # `JointAttnProcessor2_0` takes an `attention_mask` argument but never applies it: neither does the mirror
    b = hidden_states.shape[0]
    heads = attn.heads
    # the processor's own projections when it ran them on these inputs (a hook kept them), else recomputed
    query = recorded_projection(attn, "to_q", hidden_states, call.projections)
    head_dim = query.shape[-1] // heads
    query = query.view(b, -1, heads, head_dim).transpose(1, 2)
    key = (
        recorded_projection(attn, "to_k", hidden_states, call.projections).view(b, -1, heads, head_dim).transpose(1, 2)
    )
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is not None:
        text_key = (
            recorded_projection(attn, "add_k_proj", encoder_hidden_states, call.projections)
            .view(b, -1, heads, head_dim)
            .transpose(1, 2)
        )
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        key = torch.cat([key, text_key], dim=2)
    return AttentionRows(query, key, float(attn.scale), **({} if budget is None else {"budget": budget}))


def joint_image_query_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense `joint_image_query_attention`: `[B, Q, Q + T]`."""
    call = LayerCall((hidden_states, encoder_hidden_states, attention_mask), {})
    return joint_image_query_attention(attn, call).dense()


class SD3Family(SDUNetFamily):
    """Adapter for Stable Diffusion 3 / 3.5 pipelines."""

    name = "sd3_mmdit"
    default_levels = (2,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k", "add_k_proj")  # reused from the processor's own call (no text queries needed)

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        return joint_image_query_attention(module, call, context, budget)

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        level = int(denoiser.config.patch_size)
        blocks = denoiser.transformer_blocks
        pairs = []
        for i in range(len(blocks) // 4, len(blocks) - len(blocks) // 4):
            attn = getattr(blocks[i], "attn", None)
            if isinstance(attn, Attention) and attn.add_k_proj is not None:
                name = f"transformer_blocks.{i}.attn"
                pairs.append(LayerPair(cross=name, self_attn=name, level=level))
        if not pairs and len(blocks):  # very shallow models: use every joint block
            pairs = [
                LayerPair(f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.attn", level)
                for i, block in enumerate(blocks)
                if getattr(getattr(block, "attn", None), "add_k_proj", None) is not None
            ]
        return pairs

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        # each block's rows renormalised to sum to 1: the image-to-text block is the cross map, image-to-image the self
        return image_first_split(rows[pair.cross])

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        segments = []
        clip = getattr(pipe, "tokenizer", None)
        if clip is not None:
            ids = clip(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt")
            segments.append((clip, ids.input_ids))
        t5 = getattr(pipe, "tokenizer_3", None)
        rest = num_tokens - CLIP_TOKENS
        if t5 is not None and rest > 0:
            ids = t5(
                prompts,
                padding="max_length",
                max_length=rest,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            segments.append((t5, ids.input_ids))
        elif rest > 0 and clip is not None:  # no T5 (text_encoder_3=None): the pipeline feeds zeros
            pad = clip(prompts, padding="max_length", max_length=rest, truncation=True, return_tensors="pt")
            segments.append((clip, torch.full_like(pad.input_ids, clip.pad_token_id or 0)))
        return segments


FAMILY = SD3Family()
