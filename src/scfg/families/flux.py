"""FLUX.1 with true CFG: `FluxPipeline` (`true_cfg_scale > 1` and a negative prompt), `FluxTransformer2DModel`.

How the pipeline runs CFG: two separate transformer passes per step, the prompt first, then the negative prompt,
combined as `neg + true_cfg_scale · (cond - neg)` (`CFGLayout("separate", ("cond", "uncond"), "uncond")`). The
`guidance` embedding of FLUX.1-dev is distillation conditioning, not CFG, and stays as it is.

Region definition:
- The latent is packed 2x2 into tokens `[B, L, 64]`; the token grid `(H/2, W/2)` of the 16-channel latent is the
  grid of the masks and of the rule (the score norm of a token is over its 64 packed channels). It is read from
  `img_ids` (row, column) and checked against `L`.
- Double-stream blocks run one softmax over `[text; image]` keys (text first, after `norm_q/norm_k` and RoPE on the
  whole sequence; `flux_attention.flux_qkv` mirrors `FluxAttnProcessor`). For the image queries, the image-to-text
  block is the cross map and the image-to-image block the self map, each renormalised (as for SD3). Text queries
  are not formed. The middle half of the double-stream blocks is the candidate set whose mid-depth three feed the maps (`max_layers=3`) by default (as for SD3's joint
  blocks); the single-stream blocks are not used yet.
- The text is T5's `max_sequence_length` tokens (no start token; FLUX.1 attends to padding). The last position
  (a padding token for any prompt shorter than the text length) plays the start token's role in the foreground
  map. This choice is not validated on real weights: look at `--show-regions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall
from ..config import SCFGError
from ..engine import CFGLayout
from .base import Family, LayerPair, PassContext, middle_half, scale_argument, text_first_split
from .flux_attention import flux_qkv, flux_scale

__all__ = ["FAMILY"]


class FluxFamily(Family):
    """Adapter for FLUX.1 pipelines run with true CFG."""

    name = "flux"
    default_levels = (1,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_qkv", "to_added_qkv")

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        blocks = denoiser.transformer_blocks
        chosen = middle_half(len(blocks))
        return [LayerPair(f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.attn", 1) for i in chosen]

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        hidden_states = call.input(0, "hidden_states")
        encoder_hidden_states = call.input(1, "encoder_hidden_states")
        attention_mask = call.input(2, "attention_mask")
        rotary = call.input(3, "image_rotary_emb")
        query, key, _ = flux_qkv(module, hidden_states, encoder_hidden_states, rotary, projections=call.projections)
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else context.extra["text_len"]
        if attention_mask is not None:  # FluxPipeline passes none (Chroma, which does, has its own family)
            raise SCFGError(
                "Expected no attention mask in FLUX.1's joint attention, as FluxPipeline calls it, but got one. Run "
                "the pipeline without a custom `joint_attention_kwargs` mask."
            )
        kwargs = {} if budget is None else {"budget": budget}
        return AttentionRows(query[:, :, text:], key, flux_scale(module), **kwargs)

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        # text keys first; each block's rows renormalised, as for SD3's joint attention
        return text_first_split(rows[pair.cross])

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        last = torch.full((cross_probs.shape[0],), cross_probs.shape[2] - 1, dtype=torch.long)
        return last, None

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        scale = scale_argument(arguments, "true_cfg_scale")
        negative = arguments.get("negative_prompt") is not None or (
            arguments.get("negative_prompt_embeds") is not None
            and arguments.get("negative_pooled_prompt_embeds") is not None
        )
        if scale is None or not negative:
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "uncond", scale)
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        # true CFG runs only with a negative prompt; an empty one is the usual unconditional prompt. FLUX.1-dev's
        # `guidance_scale` is its distilled-guidance embedding and keeps the pipeline's default.
        return {"true_cfg_scale": scale, "negative_prompt": "" if negative_prompt is None else negative_prompt}

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        ids = kwargs.get("img_ids")
        if ids is None:
            raise SCFGError("Expected the FLUX transformer to be called with `img_ids`, as FluxPipeline does.")
        ids = ids[0] if ids.ndim == 3 else ids  # older pipelines passed a batch of ids
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        if grid[0] * grid[1] != hidden_states.shape[1]:
            raise SCFGError(
                f"Expected the FLUX latent's {hidden_states.shape[1]} tokens to form the {grid[0]}x{grid[1]} grid of "
                "its `img_ids`, but they do not (reference-image tokens, as in Kontext, are not supported yet)."
            )
        text = kwargs.get("encoder_hidden_states")
        timestep = kwargs.get("timestep")
        # FluxPipeline passes t / 1000; the scheduler lists t
        timestep = timestep * 1000 if timestep is not None else None
        extra = {"text_len": int(text.shape[1]) if text is not None else 0}
        return PassContext(grid=grid, batch=int(hidden_states.shape[0]), timestep=timestep, extra=extra)

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        packed = output[0] if isinstance(output, tuple) else output.sample
        return packed.transpose(1, 2).unflatten(2, context.grid)  # a view: [B, C, h, w]

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        return super().with_predictions(output, pred.flatten(2).transpose(1, 2).contiguous(), context)

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        tokenizer = getattr(pipe, "tokenizer_2", None)  # T5: what the transformer attends to
        if tokenizer is None:
            return []
        ids = tokenizer(prompts, padding="max_length", max_length=num_tokens, truncation=True, return_tensors="pt")
        return [(tokenizer, ids.input_ids)]


FAMILY = FluxFamily()
