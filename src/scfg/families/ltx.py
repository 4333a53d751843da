"""LTX-Video: `LTXPipeline` and `LTXImageToVideoPipeline`, `LTXVideoTransformer3DModel` (HaCohen et al., "LTX-Video:
Realtime Video Latent Diffusion", arXiv 2501.00103).

How the pipelines run CFG: one transformer pass on the batch `[uncond; cond]` (negative prompt first), combined as
`u + guidance_scale · (c - u)` when `pipe.do_classifier_free_guidance` (`guidance_scale > 1`): the defaults of
`families/base.py`. The conditional prediction stays the model's own, so the pipeline's `guidance_rescale` rescales
against it (docs/algorithm.md section 7).

Region definition:
- The latent `[B, 128, F, H, W]` is packed by `_pack_latents` into tokens `[B, F·H·W, 128]` in (frame, row, column)
  order (patch sizes 1 and 1 in the released LTX-Video 0.9 models); the pipelines pass that grid to the transformer
  as `num_frames`, `height` and `width`. It is the grid of the masks and of the rule (level 1); a token's score norm
  is over its packed channels (docs/algorithm.md section 8).
- Every block has a spatio-temporal self-attention (`attn1`, all tokens of the clip, 3-D rotary embedding) and a
  cross-attention to the T5 tokens (`attn2`, with the prompt's padding mask). The middle half of the blocks (7-20 of
  the 28 in LTX-Video 0.9) is the candidate set, as for PixArt and SD3, whose mid-depth three feed the maps
  (`max_layers=3`); `layers_per_level=k` keeps the last `k` of the candidates.
- Queries and keys are formed as `LTXVideoAttnProcessor` forms them (`ltx_qk`): the projections, the RMS norm over
  all heads at once (`qk_norm="rms_norm_across_heads"`, before the head split), the rotary embedding on the whole
  width (self-attention only), then the split into heads; SDPA's default scale `1 / sqrt(head_dim)`.
- T5 has no start token and the prompt is padded to `max_sequence_length` with an attention mask that the
  transformer turns into a `-10000` bias: masked padding gets exactly zero probability and never owns a region. The
  EOS token `</s>` (the last unmasked token) plays the start token's role in the foreground map, as for PixArt; the
  negative prompt (empty by default) has no words, so the foreground comes from the conditional half
  (`foreground_source="cond"` in this family's presets).
- Image-to-video: `LTXImageToVideoPipeline` keeps the first latent frame at the encoded image (its tokens get
  timestep 0) and drops that frame's prediction before the scheduler step. Those tokens are not denoised, so they
  are not part of the guided grid: the grid is the generated frames `(F - 1, H, W)`, the conditioning frame owns no
  region and takes no part in any region's score norm (its untrained prediction would bias every rate), and its
  tokens are left out of the queries of both maps and of the self-attention's keys (the generated frames' block of
  the softmax, renormalised, as SD3's image block is). They are found from the per-token timesteps the pipeline
  passes: leading whole frames below the step's timestep.

Not validated on real weights (no checkpoint can be run here): the layer choice, EOS as the foreground reference
and the exclusion of the conditioning frame's keys. What to look at: the regions of a step (`scfg.Recorder()`, or
`--show-regions`), frame by frame.

Not supported: `LTXConditionPipeline` and `LTXI2VLongMultiPromptPipeline` (they pass `video_coords` with conditioning
tokens appended to the sequence, not a token grid), and transformer patch sizes other than 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall
from ..capture import recorded_projection as _projection
from ..config import SCFGError
from .base import Family, LayerPair, PassContext, last_valid_token, middle_half

__all__ = ["FAMILY", "SUPPORTED_PROCESSORS", "ltx_bias", "ltx_qk"]

# `LTXVideoAttnProcessor` on `LTXAttention` (diffusers >= 0.35); `LTXVideoAttentionProcessor2_0` on `Attention`
# before (from 0.35 on that name builds an `LTXVideoAttnProcessor`). Both run the same maths.
SUPPORTED_PROCESSORS = ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0")

# Pipelines whose transformer is LTX's but whose calls carry no token grid (`video_coords`, appended tokens).
_UNSUPPORTED_PIPELINES = ("LTXConditionPipeline", "LTXI2VLongMultiPromptPipeline")

# LTXVideoTransformer3DModel.forward's leading parameters, for calls that pass some of them positionally.
_FORWARD = (
    "hidden_states",
    "encoder_hidden_states",
    "timestep",
    "encoder_attention_mask",
    "num_frames",
    "height",
    "width",
)


def ltx_qk(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    projections: Mapping[str, torch.Tensor] | None = None,
    with_value: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return the query and key `[B, heads, N, head_dim]` exactly as LTX's attention processor forms them before its
    attention, and the value when `with_value`.

    The processor's order, mirrored with the same diffusers functions:
    1. projections `to_q` of `hidden_states`, `to_k`/`to_v` of `encoder_hidden_states` (or of `hidden_states` for
       self-attention), `[B, N, heads · head_dim]`;
    2. `norm_q` / `norm_k`: one RMS norm over all heads together (`qk_norm="rms_norm_across_heads"`), before the
       heads are split;
    3. the rotary embedding (`transformer_ltx.apply_rotary_emb`) on the whole width, when given (self-attention);
    4. the split into heads, `unflatten(2, (heads, -1))`, heads first as the attention function sees them.
    The softmax scale is SDPA's default `1 / sqrt(head_dim)`; the attention mask is the caller's to apply.

    Args:
        attn (`nn.Module`): `LTXAttention` (or `Attention` before diffusers 0.35) with one of `SUPPORTED_PROCESSORS`.
        hidden_states (`torch.Tensor` of shape `[B, Q, C]`): the layer's `hidden_states`.
        encoder_hidden_states (`torch.Tensor` of shape `[B, T, C']`, *optional*): the text, for cross-attention.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`, *optional*): the `(cos, sin)` pair the transformer
            passes to its self-attention layers.
        projections (`Mapping[str, torch.Tensor]`, *optional*): outputs of `to_q`, `to_k` (and `to_v`) recorded
            during the processor's own call, used instead of running the modules again (the same tensors).
        with_value (`bool`, defaults to `False`): also return the value.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]`: `(query, key, value)`, each `[B, heads, N,
        head_dim]`; `value` is `None` unless `with_value`.
    """
    name = type(getattr(attn, "processor", None)).__name__
    if name not in SUPPORTED_PROCESSORS:
        raise SCFGError(
            f"Expected an LTX attention layer whose processor is one of {', '.join(SUPPORTED_PROCESSORS)}, but got "
            f"{type(attn).__name__} with processor {name}. S-CFG forms the layer's queries and keys the way these "
            f"processors do; restore the default with `transformer.set_default_attn_processor()`, or leave this "
            f"layer out of `layers=`."
        )
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    # 1.-2. projections, then the RMS norm across heads
    query = attn.norm_q(_projection(attn, "to_q", hidden_states, projections))
    key = attn.norm_k(_projection(attn, "to_k", context, projections))
    value = _projection(attn, "to_v", context, projections) if with_value else None
    if image_rotary_emb is not None:  # 3.
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = apply_rotary_emb(query, image_rotary_emb)
        key = apply_rotary_emb(key, image_rotary_emb)

    def heads(x: torch.Tensor) -> torch.Tensor:  # 4.
        return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

    return heads(query), heads(key), None if value is None else heads(value)


def ltx_bias(attn: nn.Module, attention_mask: torch.Tensor | None, batch: int, num_keys: int) -> torch.Tensor | None:
    """The processor's attention mask as an additive bias `[B, heads, 1 or Q, K]` (a boolean mask, True: attend,
    becomes 0 / -inf): `prepare_attention_mask` then the view over heads, as `LTXVideoAttnProcessor` does."""
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, num_keys, batch)
    mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=torch.float32).masked_fill(~mask, -torch.inf)
    return mask


class LTXFamily(Family):
    """Adapter for LTX-Video pipelines (text-to-video and image-to-video)."""

    name = "ltx"
    default_levels = (1,)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k")

    def matches(self, pipe: Any) -> bool:
        if type(getattr(pipe, "transformer", None)).__name__ != "LTXVideoTransformer3DModel":
            return False
        # a same-named subclass (scfg.enable's own, or a user's) is the pipeline it derives from
        return not any(cls.__name__ in _UNSUPPORTED_PIPELINES for cls in type(pipe).__mro__)

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        return {"official": {"foreground_source": "cond"}, "paper": {"foreground_source": "cond"}}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        blocks = len(denoiser.transformer_blocks)
        chosen = middle_half(blocks)
        return [LayerPair(f"transformer_blocks.{i}.attn2", f"transformer_blocks.{i}.attn1", 1) for i in chosen]

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        hidden_states = call.input(0, "hidden_states")
        encoder_hidden_states = call.input(1, "encoder_hidden_states")
        attention_mask = call.input(2, "attention_mask")
        rotary = call.input(3, "image_rotary_emb")
        query, key, _ = ltx_qk(module, hidden_states, encoder_hidden_states, rotary, projections=call.projections)
        bias = ltx_bias(module, attention_mask, query.shape[0], key.shape[2])
        # image-to-video: the conditioning frame's tokens are not queries, and not self-attention keys either: the
        # head-averaged softmax over all keys, its block of generated keys renormalised (as SD3's image block), so
        # that the completion (docs/algorithm.md step 2a) runs on the generated frames' rows only
        skip = context.extra.get("conditioning_tokens", 0) if context is not None else 0
        if bias is not None and bias.shape[-2] > 1:
            bias = bias[..., skip:, :]
        kwargs = {} if budget is None else {"budget": budget}
        rows = AttentionRows(query[:, :, skip:], key, query.shape[-1] ** -0.5, bias, **kwargs)
        return rows.select(slice(skip, None)) if skip and encoder_hidden_states is None else rows

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Masked padding gets exactly zero probability (a -10000 bias underflows exp); EOS is the last real token.
        return last_valid_token(cross_probs)

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        named = {**dict(zip(_FORWARD, args, strict=False)), **kwargs}
        hidden_states = named["hidden_states"]
        frames, height, width = (named.get(k) for k in ("num_frames", "height", "width"))
        if frames is None or height is None or width is None:
            raise SCFGError(
                "Expected the LTX transformer to be called with `num_frames`, `height` and `width` (the token grid, "
                "as LTXPipeline and LTXImageToVideoPipeline pass it), but got "
                f"num_frames={frames}, height={height}, width={width}. Calls with `video_coords` "
                "(LTXConditionPipeline) are not supported."
            )
        frames, height, width = int(frames), int(height), int(width)
        batch, tokens = int(hidden_states.shape[0]), int(hidden_states.shape[1])
        if frames * height * width != tokens:
            raise SCFGError(
                f"Expected the LTX latent's {tokens} tokens to form its {frames}x{height}x{width} grid "
                "(`num_frames` x `height` x `width`), but they do not. Transformer patch sizes other than 1 and "
                "appended conditioning tokens are not supported."
            )
        timestep, skip = self._timestep(named.get("timestep"), batch, tokens, height * width)
        grid = (frames - skip // (height * width), height, width)
        return PassContext(grid=grid, batch=batch, timestep=timestep, extra={"conditioning_tokens": skip})

    @staticmethod
    def _timestep(timestep: Any, batch: int, tokens: int, per_frame: int) -> tuple[Any, int]:
        """The step's timestep per sample, and how many leading tokens are conditioning tokens.

        `LTXImageToVideoPipeline` passes a timestep per token, `t · (1 - conditioning_mask)`: the first latent
        frame's tokens get 0. The step's timestep is the largest; the tokens below it must be whole leading frames,
        the same in every sample.
        """
        if not isinstance(timestep, torch.Tensor) or timestep.ndim < 2:
            return timestep, 0
        per_token = timestep.reshape(timestep.shape[0], -1)
        step = per_token.amax(dim=1)
        below = per_token < step[:, None]
        skip = int(below[0].sum())
        expected = torch.arange(below.shape[1], device=below.device) < skip  # the first `skip` tokens, no others
        if (
            per_token.shape != (batch, tokens)
            or skip % per_frame
            or skip >= tokens
            or not bool((below == expected).all())
        ):
            raise SCFGError(
                f"Expected per-token timesteps [{batch}, {tokens}] that hold back whole leading frames of "
                f"{per_frame} tokens, the same in every sample (LTXImageToVideoPipeline's first frame), but got "
                f"timesteps of shape {list(timestep.shape)} with {int(below.sum())} tokens below the step's."
            )
        return step, skip

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        packed = output[0] if isinstance(output, tuple) else output.sample
        skip = context.extra.get("conditioning_tokens", 0)
        # a view [B, C, f, h, w] of the packed tokens (docs/algorithm.md section 8): (frame, row, column) order
        return packed[:, skip:].transpose(1, 2).unflatten(2, context.grid)

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        tokens = pred.flatten(2).transpose(1, 2)
        skip = context.extra.get("conditioning_tokens", 0)
        if skip:  # the conditioning frame's prediction (dropped by the pipeline) stays the model's
            packed = output[0] if isinstance(output, tuple) else output.sample
            tokens = torch.cat([packed[:, :skip], tokens.to(packed.dtype)], dim=1)
        return super().with_predictions(output, tokens.contiguous(), context)


FAMILY = LTXFamily()
