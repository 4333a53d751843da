"""FLUX.2 [klein]: `Flux2KleinPipeline` (and `Flux2KleinInpaintPipeline`), `Flux2Transformer2DModel`.

How the pipeline runs CFG: the undistilled ("base") klein models run two separate transformer passes per step, the
prompt first, then the empty prompt (the pipeline has no `negative_prompt`; `negative_prompt_embeds` replaces
it), combined as `neg + guidance_scale · (cond - neg)`, on when `guidance_scale > 1` and the model is not step-wise
distilled (`pipe.do_classifier_free_guidance`): `CFGLayout("separate", ("cond", "uncond"), "uncond", scale)`.
FLUX.2 [dev] (`Flux2Pipeline`, guidance-distilled) and `Flux2KleinKVPipeline` run no CFG and are not matched.

Region definition:
- The 32-channel latent is patchified 2x2 into 128 channels and packed row by row into tokens `[B, L, 128]`; the
  token grid `(H/16, W/16)` of the image is the grid of the masks and of the rule (a token's score norm is over its
  128 channels). It is read from `img_ids` `(t, h, w, l)`: the generated tokens are those with `t = 0`, which come
  first; reference-image tokens (`image=`, `t = 10, 20, ...`) follow them, are keys only, and pass through.
- Double-stream blocks run one softmax over `[text; image]` keys (text first, after `norm_q/norm_k` and a 4-axis
  RoPE on the whole sequence; `flux2_attention.flux2_qkv` mirrors `Flux2AttnProcessor`, fused or not). For the
  generated tokens' queries, the image-to-text block is the cross map and the block of generated-token keys the
  self map, each renormalised (as for SD3 and FLUX.1); reference-image keys are in neither. The double-stream
  blocks after the first quarter feed the maps (blocks 1-4 of klein-4B's 5, 2-7 of klein-9B's 8): in FLUX.2 the
  double-stream blocks are only the first fifth of the depth, the first of them sees the text and the noisy
  latent barely mixed, and ConceptAttention (Helbling et al., ICML 2025) reads FLUX.2's text-image attention from
  the last double-stream blocks (its FLUX.2 code: the last 3 of FLUX.2 [dev]'s 8). The single-stream blocks (one
  fused QKV + MLP projection; also mirrored, and tested) are not used.
- The text is Qwen3's hidden states (layers 9, 18, 27 side by side) of the chat-templated prompt, right-padded to
  `max_sequence_length` (512) and not masked in the transformer: every position competes for regions, template and
  padding included, as FLUX.1's T5 padding does. Qwen3 is causal, so the first token (`<|im_start|>`) has the same
  states for every prompt, as CLIP's start token has in SD, and it is the first token that language models make an
  attention sink (Xiao et al., ICLR 2024; Sun et al., COLM 2024): it plays the start token's role in the foreground
  map (token 0, the default).
- Not validated on real weights (no klein checkpoint could be run here): the block range, token 0 as the reference
  and the foreground from the empty prompt's pass are the choices to check with `--show-regions`.
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
from .base import Family, LayerPair, PassContext
from .flux2_attention import flux2_qkv, flux2_scale

__all__ = ["FAMILY"]

# Pipelines around a `Flux2Transformer2DModel` that never run CFG: guidance-distilled FLUX.2 [dev], and klein's
# KV-cache pipeline (step-wise distilled models only).
_WITHOUT_CFG = ("Flux2Pipeline", "Flux2KleinKVPipeline")


class Flux2KleinFamily(Family):
    """Adapter for FLUX.2 [klein] pipelines run with CFG (the undistilled "base" models)."""

    name = "flux2_klein"
    default_levels = (1,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_qkv", "to_added_qkv", "to_qkv_mlp_proj")

    def matches(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return type(transformer).__name__ == "Flux2Transformer2DModel" and type(pipe).__name__ not in _WITHOUT_CFG

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        blocks = denoiser.transformer_blocks
        return [
            LayerPair(f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.attn", 1)
            for i in range(len(blocks) // 4, len(blocks))
        ]

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        if call.kwargs.get("kv_cache_mode") is not None:
            raise SCFGError(
                f"Expected a FLUX.2 attention call without a KV cache, but got `kv_cache_mode="
                f"{call.kwargs['kv_cache_mode']!r}`: cached reference keys are not in the layer's inputs. Use "
                "`Flux2KleinPipeline` instead of the KV-cache pipeline."
            )
        single = getattr(module, "to_qkv_mlp_proj", None) is not None
        hidden_states = call.input(0, "hidden_states")
        # Flux2ParallelSelfAttention.forward(hidden_states, attention_mask, image_rotary_emb); Flux2Attention's
        # takes encoder_hidden_states second
        encoder_hidden_states = None if single else call.input(1, "encoder_hidden_states")
        attention_mask = call.input(1 if single else 2, "attention_mask")
        rotary = call.input(2 if single else 3, "image_rotary_emb")
        if attention_mask is not None:
            raise SCFGError(
                f"Expected no `attention_mask` in a FLUX.2 attention layer (its pipelines pass none), but got one of "
                f"shape {list(attention_mask.shape)} (through `attention_kwargs`?). S-CFG does not mirror it."
            )
        query, key, _ = flux2_qkv(module, hidden_states, encoder_hidden_states, rotary, projections=call.projections)
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else context.extra["text_len"]
        generated = context.extra["image_tokens"]
        kwargs = {} if budget is None else {"budget": budget}
        return AttentionRows(query[:, :, text : text + generated], key, flux2_scale(module), **kwargs)

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        joint = rows[pair.cross]
        text, generated = context.extra["text_len"], joint.query_tokens
        # text keys first, then the generated tokens' keys (reference-image keys after them are in neither block);
        # each block's rows renormalised: the joint-softmax split of docs/algorithm.md section 4
        return joint.select(slice(0, text)).dense(), joint.select(slice(text, text + generated))

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        if not getattr(pipe, "do_classifier_free_guidance", False):  # False for step-wise distilled models
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "uncond", float(pipe.guidance_scale))
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        if negative_prompt:
            raise SCFGError(
                f"Expected no negative prompt for Flux2KleinPipeline (it always uses the empty prompt), but got "
                f"{negative_prompt!r}. Pass `negative_prompt_embeds=pipe.encode_prompt(...)[0]` to the pipeline "
                "instead."
            )
        return {"guidance_scale": scale}

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        ids = kwargs.get("img_ids")
        if ids is None:
            raise SCFGError("Expected the FLUX.2 transformer to be called with `img_ids`, as Flux2KleinPipeline does.")
        ids = ids[0] if ids.ndim == 3 else ids  # the pipeline passes one row of ids per sample, all the same
        generated = int((ids[:, 0] == 0).sum())  # t = 0: the image being generated; references have t = 10, 20...
        rows, cols = ids[:generated, 1].long(), ids[:generated, 2].long()
        grid = (int(rows.max()) + 1, int(cols.max()) + 1) if generated else (0, 0)
        order = torch.arange(generated, device=ids.device)
        if (
            generated == 0
            or grid[0] * grid[1] != generated
            or bool((ids[:generated, 0] != 0).any())
            or not torch.equal(rows * grid[1] + cols, order)
        ):
            raise SCFGError(
                f"Expected the FLUX.2 latent's generated tokens (`img_ids` with t = 0) first, row by row, on a grid, "
                f"as Flux2KleinPipeline packs them, but got {generated} of {hidden_states.shape[1]} tokens that do "
                "not."
            )
        text = kwargs.get("encoder_hidden_states")
        timestep = kwargs.get("timestep")
        # the pipeline passes t / 1000; the scheduler lists t
        timestep = timestep * 1000 if timestep is not None else None
        extra = {"text_len": int(text.shape[1]) if text is not None else 0, "image_tokens": generated}
        return PassContext(grid=grid, batch=int(hidden_states.shape[0]), timestep=timestep, extra=extra)

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        packed = output[0] if isinstance(output, tuple) else output.sample
        # a view of the generated tokens on their grid, [B, C, h, w] (docs/algorithm.md section 8); reference tokens
        # after them are not a prediction
        return packed[:, : context.extra["image_tokens"]].transpose(1, 2).unflatten(2, context.grid)

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        packed = output[0] if isinstance(output, tuple) else output.sample
        tokens = pred.flatten(2).transpose(1, 2)
        rest = packed[:, context.extra["image_tokens"] :]
        new = torch.cat([tokens, rest], dim=1) if rest.shape[1] else tokens.contiguous()
        return super().with_predictions(output, new, context)

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is None:
            return []
        # as Flux2KleinPipeline._get_qwen3_prompt_embeds: the chat template, then right padding to the text length
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        ids = tokenizer(texts, padding="max_length", max_length=num_tokens, truncation=True, return_tensors="pt")
        return [(tokenizer, ids.input_ids)]


FAMILY = Flux2KleinFamily()
