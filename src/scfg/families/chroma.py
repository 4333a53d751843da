"""Chroma: `ChromaPipeline` (and its img2img / inpainting variants), `ChromaTransformer2DModel`.

Chroma is FLUX.1-schnell's transformer (19 double-stream and 38 single-stream blocks, the same `FluxAttention` and
`FluxAttnProcessor`) with its modulation pruned to a small approximator network, no CLIP text, and T5's padding
masked in the transformer; this family is `flux.FluxFamily` with what differs.

How the pipeline runs CFG: two separate transformer passes per step, the prompt first, then the negative prompt
(`""` when none is given), combined as `neg + guidance_scale · (cond - neg)`, on when `guidance_scale > 1`
(`pipe.do_classifier_free_guidance`): `CFGLayout("separate", ("cond", "uncond"), "uncond", guidance_scale)`.

Region definition:
- The token grid, the packed 2x2 latent `[B, L, 64]` and the joint attention over `[text; image]` (text first,
  `norm_q/norm_k`, RoPE on the whole sequence) are FLUX.1's (`flux_attention.flux_qkv` mirrors the processor). The
  middle half of the double-stream blocks is the candidate set whose mid-depth three feed the maps (`max_layers=3`) (blocks 4-14 of 19), as for FLUX.1: these blocks keep
  the text in its own stream, with its own projections and norms, so their image-to-text block is attention from
  image tokens to the T5 tokens themselves; ConceptAttention (Helbling et al., ICML 2025) reads FLUX's text-image
  attention from the double-stream blocks too. The single-stream blocks are not used.
- The text is T5's `max_sequence_length` tokens. Chroma masks all of T5's padding except one token: the pipeline
  keeps positions `0..n` of a prompt of `n` tokens (the words and `</s>`, then the first `<pad>`), and the
  transformer applies the outer product of that mask. Masked padding gets no probability and never owns a
  region; the probabilities are those of the kept tokens alone.
- The mask is applied as Chroma means it (a keep-mask, as its training code and a boolean mask apply it): a masked
  key is left out of the softmax. diffusers (0.42, and the releases since Chroma's addition) builds the mask in
  the prompt embeddings' float dtype, and SDPA *adds* a float mask to the logits (huggingface/diffusers#12116,
  #13619): the model then still gives masked padding `e^-1` of a kept key's weight. For an image query the +1
  lands on every kept text key and every image key alike, so within the kept text keys (the cross map,
  renormalised) and within the image keys (the self map, renormalised) it cancels: the maps are the same under
  either mask; only the weight the model itself puts on masked padding differs, and it is left out.
- The foreground's reference (CLIP's start token's role): the one unmasked `<pad>`, the last kept token, as the last
  (padding) position is for FLUX.1. It is the only kept position that holds no word of the prompt: the one pad
  Chroma keeps as a place to put attention when it masks the rest (its model card: FLUX.1 was trained with T5's
  padding unmasked and over-attends to it). A prompt that fills the text length has no pad left, and `</s>` is
  the reference. The negative prompt is often empty (`</s>` and the kept pad only), so the foreground comes from
  the conditional pass in this family's presets (`foreground_source="cond"`), as for PixArt.
- Not validated on real weights (no Chroma checkpoint could be run here): the block range, the pad as the
  reference and the conditional foreground are the choices to check with `--show-regions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall
from ..engine import CFGLayout
from .base import Family, PassContext, last_valid_token
from .flux import FluxFamily
from .flux_attention import flux_qkv, flux_scale

__all__ = ["FAMILY"]


def _image_keep(mask: torch.Tensor, text: int) -> torch.Tensor:
    """Which keys each image query may attend to, `[B, 1, 1 or Q, N]` bool, from the mask a Chroma block hands its
    attention: `[B, N]` (keys), or `[B, 1, N, N]` (the outer product of the pipeline's `[B, T + Q]` mask)."""
    keep = mask != 0  # a keep-mask: 1 or True attends, in either dtype
    if keep.ndim == 2:
        return keep[:, None, None, :]
    keep = keep.reshape(keep.shape[0], -1, keep.shape[-2], keep.shape[-1])[:, :, text:]
    # every image query is kept, so its row of the outer product is the key mask: keep one row, not Q of them
    first = keep[:, :, :1]
    return first if bool((keep == first).all()) else keep


class ChromaFamily(FluxFamily):
    """Adapter for Chroma pipelines (FLUX.1's transformer, T5 with one unmasked pad, CFG on `guidance_scale`)."""

    name = "chroma"

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "ChromaTransformer2DModel"

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        return {"official": {"foreground_source": "cond"}, "paper": {"foreground_source": "cond"}}

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        hidden_states = call.input(0, "hidden_states")
        encoder_hidden_states = call.input(1, "encoder_hidden_states")
        attention_mask = call.input(2, "attention_mask")
        rotary = call.input(3, "image_rotary_emb")
        query, key, _ = flux_qkv(module, hidden_states, encoder_hidden_states, rotary, projections=call.projections)
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else context.extra["text_len"]
        bias = None
        if attention_mask is not None:  # masked keys out of the joint softmax, before its split (section 4)
            keep = _image_keep(attention_mask.to(query.device), text)
            bias = torch.zeros(keep.shape, dtype=torch.float32, device=query.device).masked_fill(~keep, -torch.inf)
        kwargs = {} if budget is None else {"budget": budget}
        return AttentionRows(query[:, :, text:], key, flux_scale(module), bias, **kwargs)

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Masked padding has exactly zero probability (exp(-inf)) and owns no region (docs/algorithm.md step 4); the
        # kept pad, the last kept token, is the reference channel of the foreground maps (step 2e).
        return last_valid_token(cross_probs)

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        if not getattr(pipe, "do_classifier_free_guidance", False):
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "uncond", float(pipe.guidance_scale))
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        return Family.guidance_arguments(self, scale, negative_prompt)  # `guidance_scale`, not FLUX's true CFG

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        return Family.tokenize(self, pipe, prompts, num_tokens)  # T5 is `pipe.tokenizer` (FLUX: `tokenizer_2`)


FAMILY = ChromaFamily()
