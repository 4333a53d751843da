"""Wan 2.1 / 2.2 video: `WanPipeline`, `WanImageToVideoPipeline`, `WanVideoToVideoPipeline` on
`WanTransformer3DModel` (diffusers >= 0.35, whose attention is `WanAttention` with `WanAttnProcessor`).

How the pipelines run CFG (read from their `__call__`): two separate transformer passes per step, the prompt first
(`noise_pred`), then the negative prompt (`noise_uncond`), combined as `noise_uncond + s · (noise_pred -
noise_uncond)`: `CFGLayout("separate", ("cond", "uncond"), "uncond", s)`. CFG runs iff `guidance_scale > 1`
(`do_classifier_free_guidance`). Wan 2.2 A14B has two experts: `transformer` on the steps with `t >=
boundary_ratio · num_train_timesteps` (high noise) at `guidance_scale`, `transformer_2` below it at
`guidance_scale_2` (the pipeline sets it to `guidance_scale` when it is not given). Both are denoisers here, each
with its own scale; an expert whose scale is 1 is left alone (its line is the conditional prediction).

The architecture (Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models", arXiv 2503.20314): a DiT
over a Wan-VAE latent (4x8x8 compression), each block self-attention with 3-D RoPE, cross-attention to umT5 text
(Chung et al., "UniMax", ICLR 2023) and an MLP. S-CFG itself: Shen et al., CVPR 2024 (docs/algorithm.md).

Region definition (docs/algorithm.md sections 2 and 8):
- Grid. The latent is `[B, C, F, H, W]` and the patch `(1, 2, 2)`, so the transformer's tokens form the grid
  `(F, H/2, W/2)`, frames first. As for PixArt and SD3 (latent / patch), the maps and masks live on that token grid
  (level 2 on the spatial axes, frames kept) and the rule runs on the latent grid `(F, H, W)`: masks are upsampled
  to it (nearest), a cell's score norm is over its 16 latent channels, and a region's rate is the mean over all its
  cells in all frames.
- Layers. Every block has self-attention (`attn1`, RoPE over frames x height x width: spatio-temporal, so the
  completion couples frames) and cross-attention (`attn2`) to the text. The middle half of the blocks is the
  candidate set whose mid-depth three (`max_layers=3`) feed the maps (as for PixArt and SD3: early blocks are still close to the noise, late ones to pixels; Wan 2.1 1.3B's 30
  blocks: 7-22). `wan_qk` forms their queries and keys exactly as `WanAttnProcessor` does.
- Text. UMT5 tokens, `max_sequence_length` (512) of them; the pipeline zeroes the embeddings after the real tokens
  and passes no attention mask, so the transformer attends to the padding: after its text projection every padding
  position is the same key, and all of them together take the attention no real token gets (Wan's reference
  implementation attends to its zero-padded context the same way: `WanModel.forward` passes `context_lens=None`).
  Padding positions carry no token, so they are zero columns of the cross map here: they never own a region and are
  not in the foreground's rest-of-text sum. They are read from the zero rows of the transformer's
  `encoder_hidden_states`, which also works with `prompt_embeds`. The real tokens keep the probabilities the model
  gives them (not renormalised).
- Foreground. UMT5 has no start token; as for PixArt (also T5), the EOS token `</s>` (the last real token) plays
  its role, and the foreground comes from the conditional pass in this family's presets: Wan's negative prompts
  are either empty (EOS alone: no words, an empty foreground) or lists of defects ("overexposed, static, blurred
  details, subtitles, ..."), whose words do not locate the subject.
- Image-to-video (Wan 2.1 I2V): the image's CLIP tokens come in front of the text in `attn2`, but the processor
  gives them their own softmax (`add_k_proj`): the text map is its own softmax over the text keys, and image
  tokens never own regions (a transformer that puts them in the text's softmax has those columns dropped). The
  processor takes the last 512 positions as text, so the text must be 512 tokens there.

Not validated on real weights (no Wan checkpoint was run): the choice of blocks, EOS as the foreground reference
(the padding, a learned sink of identical keys, is the other candidate: it needs `token_roles` to see the pass's
context) and the foreground from the conditional pass; look at `--show-regions` or a `scfg.Recorder`'s masks.
Wan 2.2 TI2V's per-token timesteps are read as the largest one (the denoised frames'); its image-conditioned
first frame is guided as part of the clip although the pipeline overwrites it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall
from ..capture import recorded_projection as _projection
from ..config import SCFGError
from ..engine import CFGLayout
from .base import Family, LayerPair, PassContext, last_valid_token, scale_argument

__all__ = ["FAMILY", "I2V_TEXT_TOKENS", "SUPPORTED_PROCESSORS", "wan_qk"]

SUPPORTED_PROCESSORS = ("WanAttnProcessor",)
I2V_TEXT_TOKENS = 512  # `WanAttnProcessor` takes the last 512 positions as text when the layer has image keys
_EXPERTS = ("transformer", "transformer_2")


def _check_processor(attn: nn.Module) -> None:
    """Raise unless `attn` is a `WanAttention` whose processor `wan_qk` mirrors."""
    processor = type(getattr(attn, "processor", None)).__name__
    if type(attn).__name__ != "WanAttention" or processor not in SUPPORTED_PROCESSORS:
        raise SCFGError(
            f"Expected a `WanAttention` layer with processor {', '.join(SUPPORTED_PROCESSORS)} (diffusers >= 0.35), "
            f"but got {type(attn).__name__} with processor {processor}. S-CFG forms the layer's queries and keys the "
            "way that processor does: upgrade diffusers, or restore it with "
            "`transformer.set_attn_processor(WanAttnProcessor())`."
        )


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """`WanAttnProcessor`'s rotary embedding of `x` `[B, N, heads, d]` (interleaved pairs), op for op."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_qk(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    projections: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the query `[B, heads, Q, d]` and key `[B, heads, K, d]` that `WanAttnProcessor` passes to its (text)
    attention, heads first.

    The processor's order: with image keys (`add_k_proj`, Wan 2.1 I2V) the last 512 positions of
    `encoder_hidden_states` are the text, the rest the image (its own softmax, not formed here); projections
    (`to_q`/`to_k`, or the fused `to_qkv` in self-attention and `to_kv` in cross-attention); `norm_q`/`norm_k` across
    heads; heads split (`unflatten(2, (heads, -1))`); the rotary embedding (self-attention only). The scale is the
    attention function's default, `d ** -0.5`.

    Args:
        attn (`nn.Module`): a `WanAttention` (`attn1` or `attn2` of a `WanTransformerBlock`).
        hidden_states, encoder_hidden_states, rotary_emb: the layer's arguments, as its forward received them.
        projections (*optional*): outputs of the layer's projection modules recorded during that call, reused
            instead of projecting again.
    """
    _check_processor(attn)
    if attn.add_k_proj is not None and encoder_hidden_states is not None:
        encoder_hidden_states = encoder_hidden_states[:, encoder_hidden_states.shape[1] - I2V_TEXT_TOKENS :]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            query, key, _ = _projection(attn, "to_qkv", hidden_states, projections).chunk(3, dim=-1)
        else:
            query = _projection(attn, "to_q", hidden_states, projections)
            key, _ = _projection(attn, "to_kv", context, projections).chunk(2, dim=-1)
    else:
        query = _projection(attn, "to_q", hidden_states, projections)
        key = _projection(attn, "to_k", context, projections)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _rotate(query, *rotary_emb)
        key = _rotate(key, *rotary_emb)
    return query.transpose(1, 2), key.transpose(1, 2)


class WanFamily(Family):
    """Adapter for Wan 2.1 / 2.2 pipelines (text-to-video, image-to-video, video-to-video; one or two experts)."""

    name = "wan"
    default_levels = (2,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k", "to_qkv", "to_kv")

    def matches(self, pipe: Any) -> bool:
        return any(type(getattr(pipe, name, None)).__name__ == "WanTransformer3DModel" for name in _EXPERTS)

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        experts = {name: module for name in _EXPERTS if (module := getattr(pipe, name, None)) is not None}
        if len({id(module) for module in experts.values()}) != len(experts):
            raise SCFGError(
                "Expected `transformer` and `transformer_2` to be different modules (Wan 2.2's two experts, each "
                "with its own guidance scale), but both are the same one. Load the pipeline without `transformer_2`."
            )
        return experts

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        return {"official": {"foreground_source": "cond"}, "paper": {"foreground_source": "cond"}}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        p_t, p_h, p_w = (int(p) for p in denoiser.config.patch_size)
        if p_t != 1 or p_h != p_w or p_h & (p_h - 1):
            raise SCFGError(
                f"Expected a Wan transformer with patch size (1, p, p), p a power of two (the released models: "
                f"(1, 2, 2)), but got {tuple(denoiser.config.patch_size)}."
            )
        blocks = len(denoiser.blocks)
        pairs = []
        for i in range(blocks // 4, blocks - blocks // 4):  # the middle half; every block when there are < 4
            block = denoiser.blocks[i]
            _check_processor(block.attn1)
            _check_processor(block.attn2)
            pairs.append(LayerPair(f"blocks.{i}.attn2", f"blocks.{i}.attn1", p_h))
        return pairs

    # -- attention ------------------------------------------------------------------------------------------------

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        hidden_states = call.input(0, "hidden_states")
        encoder_hidden_states = call.input(1, "encoder_hidden_states")
        if call.input(2, "attention_mask") is not None:
            raise SCFGError(
                "Expected a Wan attention layer called without `attention_mask` (WanTransformerBlock passes none), "
                "but got one; S-CFG does not mirror masked Wan attention."
            )
        rotary_emb = call.input(3, "rotary_emb")
        text = context.extra.get("text_valid") if context is not None else None
        if module.add_k_proj is not None and text is not None and text.shape[1] != I2V_TEXT_TOKENS:
            raise SCFGError(
                f"Expected {I2V_TEXT_TOKENS} text positions for a Wan attention layer with image keys (its processor "
                f"takes the last {I2V_TEXT_TOKENS} as text), but got {text.shape[1]}. Keep `max_sequence_length="
                f"{I2V_TEXT_TOKENS}` in image-to-video."
            )
        query, key = wan_qk(module, hidden_states, encoder_hidden_states, rotary_emb, projections=call.projections)
        return AttentionRows(query, key, query.shape[-1] ** -0.5, **({} if budget is None else {"budget": budget}))

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        cross = rows[pair.cross].dense()
        text = context.extra.get("text_valid") if context is not None else None
        if text is not None:
            batch, tokens = text.shape
            if cross.shape[0] != batch or cross.shape[2] < tokens:
                raise SCFGError(
                    f"Expected `{pair.cross}` to attend to the {tokens} text positions of the transformer's "
                    f"`encoder_hidden_states` of batch {batch}, but its attention is {list(cross.shape)}."
                )
            # image tokens in the text's own softmax (no `add_k_proj`) come first: dropped, they never own regions;
            # padding columns zeroed (the model's attention to the embedded zeros: no token of the prompt)
            cross = cross[:, :, cross.shape[2] - tokens :] * text[:, None, :].to(cross.dtype)
        return cross, rows[pair.self_attn]

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Padding columns are exactly zero (`layer_attention`); EOS is the last real token, the reference.
        return last_valid_token(cross_probs)

    # -- the pipeline's CFG ---------------------------------------------------------------------------------------

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        try:
            if not pipe.do_classifier_free_guidance:  # guidance_scale <= 1: no negative pass for either expert
                return None
            # the pipeline's `current_guidance_scale`: `guidance_scale` for `transformer` (high noise), the call's
            # `guidance_scale_2` for `transformer_2`, which the pipeline defaults to `guidance_scale`
            scale = pipe.guidance_scale
            if denoiser != "transformer":
                second = scale_argument(arguments, "guidance_scale_2")
                scale = scale if second is None else second
        except AttributeError:
            return None
        if scale is None:
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "uncond", float(scale))
        return layout if layout.is_guided else None

    # -- one denoiser call ----------------------------------------------------------------------------------------

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
            # Wan 2.2 TI2V: one timestep per token, 0 on an image-conditioned first frame; the step's is the largest
            timestep = timestep.amax(dim=1)
        extra: dict[str, Any] = {}
        if text is not None:
            # the pipeline's zero padding after the real tokens; a text of zeros only keeps every position
            valid = text.ne(0).any(dim=-1)
            extra["text_valid"] = valid | ~valid.any(dim=1, keepdim=True)
        grid = tuple(int(n) for n in hidden_states.shape[2:])  # (F, H, W): the latent grid the rule runs on
        return PassContext(grid=grid, batch=int(hidden_states.shape[0]), timestep=timestep, extra=extra)

    # -- text -----------------------------------------------------------------------------------------------------

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is None:
            return []
        # the pipeline cleans each prompt (ftfy when installed, HTML entities, whitespace) before tokenising it
        clean = getattr(inspect.getmodule(type(pipe)), "prompt_clean", None)
        prompts = [clean(p) for p in prompts] if callable(clean) else prompts
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=num_tokens,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return [(tokenizer, ids.input_ids)]


FAMILY = WanFamily()
