"""Krea 2: `Krea2Pipeline`, `Krea2Transformer2DModel`, a single-stream MMDiT over `[text; image]` with grouped-query
attention.

How the pipeline runs CFG: two transformer passes per step, the prompt first, then the negative prompt (an empty
one by default), combined as `cond + g (cond - uncond)` with `g = guidance_scale`, CFG on for `g > 0`
(`CFGLayout("separate", ("cond", "uncond"), "cond", g)`; the plain `u + a (c - u)` scale is `a = 1 + g`). The uncond
pass comes last, so it is the one rewritten and the conditional prediction stays the model's own
(docs/algorithm.md section 7).

Region definition:
- The latent is packed 2x2 into tokens `[B, L, 64]`; the token grid `(H/2, W/2)`, read from the image rows of
  `position_ids` and checked against `L`, is the grid of the masks and of the rule (a token's score norm is over its
  packed channels), as for FLUX.
- Every block runs one softmax over `[text; image]` keys (text first) after the per-head RMS norms and the rotary
  embedding, with fewer key heads than query heads: each key head serves a group of consecutive query heads
  (`repeat_interleave`, as `Krea2AttnProcessor` repeats them before its attention; `krea2_qk` mirrors it), and the
  probabilities are averaged over the query heads. For the image queries, the image-to-text block is the cross map
  and the image-to-image block the self map, each renormalised (as for SD3 and FLUX). Text queries are not formed.
  The middle half of the blocks is the candidate set whose mid-depth three feed the maps (`max_layers=3`) (7 to 20 of Krea 2's 28; the tiny test model's 4: 1 and 2).
- The text is `max_sequence_length` positions of the Qwen-Image chat template without its system prefix: the
  prompt's tokens, padding (masked by the pipeline's text mask: it gets exactly zero probability and never owns a
  region), then the assistant suffix `<|im_end|>\\n<|im_start|>assistant\\n` at the 5 fixed tail positions, valid
  in every prompt, the empty negative prompt included. The system prefix is dropped, so the first positions hold
  the prompt's words: there is no prompt-independent start token. The suffix's last token (the last text
  position), where a causal encoder has read the whole turn, plays the start token's role in the foreground map,
  as FLUX's last text position does. This choice is not validated on real weights: look at `--show-regions`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall
from ..capture import recorded_projection as _projection
from ..config import SCFGError
from ..engine import CFGLayout
from .base import Family, LayerPair, PassContext, last_valid_token, middle_half, scale_argument, text_first_split

__all__ = ["FAMILY", "krea2_qk"]

_PROCESSORS = ("Krea2AttnProcessor",)


def krea2_qk(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    projections: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the query and key `[B, num_heads, N, head_dim]` exactly as `Krea2AttnProcessor` hands them to its
    attention: `to_q` split into `num_heads` and `to_k` into `num_kv_heads` heads, the RMS norms `norm_q`/`norm_k`,
    the rotary embedding over the sequence, then each key head repeated for its group of `num_heads / num_kv_heads`
    consecutive query heads (`repeat_interleave`).

    Args:
        attn (`nn.Module`): a `Krea2Attention` with `Krea2AttnProcessor`.
        hidden_states (`torch.Tensor` of shape `[B, N, hidden]`): the layer's input, the joint `[text; image]`
            sequence.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`, *optional*): the `(cos, sin)` pair `[N, head_dim]`
            the transformer passes to every block.
        projections (`Mapping[str, torch.Tensor]`, *optional*): the outputs of `to_q`/`to_k` recorded during the
            processor's own call, used instead of running the projections again (the same tensors).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(query, key)`, heads first, the key with as many heads as the query.
    """
    name = type(getattr(attn, "processor", None)).__name__
    if name not in _PROCESSORS:
        raise SCFGError(
            f"Expected a Krea 2 attention layer with processor {', '.join(_PROCESSORS)}, but got {name}. S-CFG forms "
            "the layer's queries and keys as that processor does; restore it, or leave this layer out of `layers=`."
        )
    query = _projection(attn, "to_q", hidden_states, projections).unflatten(-1, (attn.num_heads, attn.head_dim))
    key = _projection(attn, "to_k", hidden_states, projections).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    groups = attn.num_heads // attn.num_kv_heads
    if groups > 1:  # query head h reads key head h // groups
        key = key.repeat_interleave(groups, dim=2)
    return query.transpose(1, 2), key.transpose(1, 2)


def _argument(args: tuple, kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class Krea2Family(Family):
    """Adapter for Krea 2 pipelines (two transformer passes per step, cond then uncond)."""

    name = "krea2"
    default_levels = (1,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k")

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "Krea2Transformer2DModel"

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        blocks = len(denoiser.transformer_blocks)
        chosen = middle_half(blocks)
        return [LayerPair(f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.attn", 1) for i in chosen]

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        if context is None:
            raise SCFGError("Expected the pass context of a Krea 2 transformer call (its text length).")
        hidden_states = call.input(0, "hidden_states")
        attention_mask = call.input(1, "attention_mask")
        query, key = krea2_qk(module, hidden_states, call.input(2, "image_rotary_emb"), call.projections)
        bias = None
        if attention_mask is not None:  # [B, 1, 1, N] key-padding mask, boolean (True: attend) or additive
            mask = attention_mask.to(query.device)
            bias = (
                mask
                if mask.dtype != torch.bool
                else torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -torch.inf)
            )
        text = context.extra["text_len"]
        scale = 1.0 / math.sqrt(query.shape[-1])  # the processor passes no scale: SDPA's default
        return AttentionRows(query[:, :, text:], key, scale, bias, **({} if budget is None else {"budget": budget}))

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        # text keys first; each block's rows renormalised, as for SD3's joint attention
        return text_first_split(rows[pair.cross])

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # masked padding gets exactly zero probability (-inf); the reference is the last valid position, the
        # suffix's final token (the last text position in the pipeline's layout)
        return last_valid_token(cross_probs)

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        try:
            on, scale = bool(pipe.do_classifier_free_guidance), float(pipe.guidance_scale)
        except AttributeError:  # outside the pipeline's call: read the argument (CFG on for g > 0)
            scale = scale_argument(arguments, "guidance_scale")
            on = scale is not None and scale > 0
        if not on or scale is None:
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "cond", scale)
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        # the pipeline's line is c + g (c - u) = u + (1 + g)(c - u): the usual scale `scale` is g = scale - 1
        return {"guidance_scale": scale - 1.0, "negative_prompt": negative_prompt}

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        hidden_states = _argument(args, kwargs, 0, "hidden_states")
        text = _argument(args, kwargs, 1, "encoder_hidden_states")
        timestep = _argument(args, kwargs, 2, "timestep")
        position_ids = _argument(args, kwargs, 3, "position_ids")
        if position_ids is None or text is None:
            raise SCFGError(
                "Expected the Krea 2 transformer to be called with `encoder_hidden_states` and `position_ids`, as "
                "Krea2Pipeline does."
            )
        text_len = int(text.shape[1])
        image_ids = position_ids[text_len:]
        grid = (int(image_ids[:, 1].max()) + 1, int(image_ids[:, 2].max()) + 1)
        if grid[0] * grid[1] != hidden_states.shape[1]:
            raise SCFGError(
                f"Expected the Krea 2 latent's {hidden_states.shape[1]} tokens to form the {grid[0]}x{grid[1]} grid of "
                "its `position_ids`, but they do not."
            )
        # Krea2Pipeline passes t / num_train_timesteps (1000 for its scheduler); the scheduler lists t
        t = None if timestep is None else torch.as_tensor(timestep).double() * 1000
        return PassContext(grid=grid, batch=int(hidden_states.shape[0]), timestep=t, extra={"text_len": text_len})

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        packed = output[0] if isinstance(output, tuple) else output.sample
        return packed.transpose(1, 2).unflatten(2, context.grid)  # a view: [B, C, h, w]

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        return super().with_predictions(output, pred.flatten(2).transpose(1, 2).contiguous(), context)

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        tokenizer = getattr(pipe, "tokenizer", None)
        prefix = getattr(pipe, "prompt_template_encode_prefix", None)
        suffix = getattr(pipe, "prompt_template_encode_suffix", None)
        if tokenizer is None or prefix is None or suffix is None:
            return []
        # `Krea2Pipeline.get_text_hidden_states`: [prefix | prompt | padding] to a fixed length, the prefix dropped,
        # then the suffix
        start = int(pipe.prompt_template_encode_start_idx)
        tail = int(pipe.prompt_template_encode_num_suffix_tokens)
        body = tokenizer(
            [prefix + prompt for prompt in prompts],
            truncation=True,
            padding="max_length",
            max_length=num_tokens + start - tail,
            return_tensors="pt",
        ).input_ids[:, start:]
        ends = tokenizer([suffix] * len(prompts), return_tensors="pt").input_ids
        ids = torch.cat([body, ends], dim=1)
        return [(tokenizer, ids)] if ids.shape[1] == num_tokens else []


FAMILY = Krea2Family()
