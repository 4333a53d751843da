"""DeepFloyd IF, stage I (`IFPipeline`) and stage II (`IFSuperResolutionPipeline`), pixel-space UNets.

IF's attention layers attend jointly over `[text tokens; image tokens]` under one softmax (`AttnAddedKVProcessor`):
the text keys come from `add_k_proj`, the image keys from `to_k`. The head-averaged joint probabilities
`[B, Q, T + Q]` are split into a cross part (text columns) and a self part (image columns, whose rows no longer
sum to 1), as the released code does. T5 has no start token, so "token 0" of the foreground map is the first word.
The UNet predicts `[ε; variance]`: only the first `out_channels / 2` channels are guided (the pipeline splits the
variance off before its CFG line), so the rate is computed from, and applied to, those channels only.

Preset differences (docs/algorithm.md section 4), the values of every field the user leaves "auto": the released code uses only
the last 3 layers of each grid; stage I uses the whole-image mean norm as the benchmark; both stages apply only the
`g · rate <= 15` cap, not the [0.8, 3.0] clamp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import T5EncoderModel, T5Tokenizer, T5TokenizerFast

from ..attention import AttentionRows
from ..capture import LayerCall
from .base import LayerPair, PassContext
from .sd_unet import SDUNetFamily, _block_levels, forward_rank, has_added_kv_attention

__all__ = ["FAMILY", "joint_added_kv_attention", "joint_added_kv_probs"]


def joint_added_kv_attention(
    attn: nn.Module, call: LayerCall, context: PassContext | None = None, budget: int | None = None
) -> AttentionRows:
    """Head-averaged joint probabilities `[B, Q, T + Q]` of an added-KV `Attention`, text columns first, as
    `AttentionRows`. Mirrors `AttnAddedKVProcessor2_0` up to its `scaled_dot_product_attention`."""
    hidden_states = call.input(0, "hidden_states")
    context_states = call.input(1, "encoder_hidden_states")
    attention_mask = call.input(2, "attention_mask")
    b, c = hidden_states.shape[:2]
    x = hidden_states.view(b, c, -1).transpose(1, 2)
    if context_states is not None and attn.norm_cross:
        context_states = attn.norm_encoder_hidden_states(context_states)
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    heads = attn.heads
    query = attn.to_q(x)
    keys = [attn.add_k_proj(context_states if context_states is not None else x)]
    if not attn.only_cross_attention:
        keys.append(attn.to_k(x))
    key = torch.cat(keys, dim=1)
    head_dim = query.shape[-1] // heads
    query = query.view(b, -1, heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, heads, head_dim).transpose(1, 2)
    bias = None
    if attention_mask is not None:
        # as the processor: the target length is the image tokens', so the [B, 1, T] text mask is padded with Q
        # zeros to cover the [text; image] keys
        bias = attn.prepare_attention_mask(attention_mask, x.shape[1], b)
        bias = bias.view(b, heads, -1, bias.shape[-1]).to(torch.promote_types(query.dtype, torch.float32))
    return AttentionRows(query, key, float(attn.scale), bias, **({} if budget is None else {"budget": budget}))


def joint_added_kv_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense `joint_added_kv_attention`: `[B, Q, T + Q]`."""
    call = LayerCall((hidden_states, encoder_hidden_states, attention_mask), {})
    return joint_added_kv_attention(attn, call).dense()


def has_t5_text(pipe: Any) -> bool:
    """Whether `pipe.text_encoder` is a transformers `T5EncoderModel` or None (prompt embeddings passed in), and
    `pipe.tokenizer`, if any, a T5 tokenizer: no start token, so the maps' reference is the first word."""
    text_encoder = getattr(pipe, "text_encoder", None)
    tokenizer = getattr(pipe, "tokenizer", None)
    return (text_encoder is None or isinstance(text_encoder, T5EncoderModel)) and (
        tokenizer is None or isinstance(tokenizer, (T5Tokenizer, T5TokenizerFast))
    )


class DeepFloydIFFamily(SDUNetFamily):
    """Adapter for DeepFloyd IF stage I and stage II pipelines."""

    name = "deepfloyd_if"
    default_levels = (4, 8)
    projections = ()

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        return joint_added_kv_attention(module, call, context, budget)

    def matches(self, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, UNet2DConditionModel) or not has_added_kv_attention(unet):
            return False
        # T5 tokens projected into the UNet ("text_proj", the "text" added embedding). Kandinsky 2.x decoders have the
        # same added-KV attention but image (2.1: text and image) conditioning, a MoVQ decoder and a prior: not this.
        return (
            unet.config.encoder_hid_dim_type in (None, "text_proj")
            and unet.config.addition_embed_type in (None, "text")
            and not any(hasattr(pipe, name) for name in ("movq", "prior"))
            and has_t5_text(pipe)
        )

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        stage_one = "SuperResolution" not in type(pipe).__name__
        official: dict[str, Any] = {"rate_clamp": None, "layers_per_level": 3}
        if stage_one:
            official["benchmark"] = "mean"
        return {"official": official}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        levels = _block_levels(denoiser)  # type: ignore[arg-type]
        pairs = []
        for name, module in denoiser.named_modules():
            if isinstance(module, Attention) and module.add_k_proj is not None:
                prefix = "mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])
                self_name = None if module.only_cross_attention else name
                pairs.append(LayerPair(cross=name, self_attn=self_name, level=levels[prefix]))
        return sorted(pairs, key=lambda pair: forward_rank(pair.cross))

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows | None]:
        joint = rows[pair.cross]
        if pair.self_attn is None:
            return joint.dense(), None
        num_text = joint.shape[2] - joint.query_tokens
        # the released code splits the joint rows without renormalising them (docs/algorithm.md section 4)
        return joint.select(slice(0, num_text), renormalise=False).dense(), joint.select(
            slice(num_text, None), renormalise=False
        )

    def guided_channels(self, denoiser: nn.Module) -> int | None:
        return int(denoiser.config.out_channels) // 2


FAMILY = DeepFloydIFFamily()
