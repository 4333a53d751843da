"""Z-Image: `ZImagePipeline` and its img2img, inpaint and ControlNet variants, `ZImageTransformer2DModel`, a
single-stream DiT over `[image; text]` with list inputs.

How the pipeline runs CFG: ONE transformer call per step whose inputs are lists, the `B` conditional samples then
the `B` unconditional ones (latents `[C, 1, H, W]`, timesteps, caption features of each sample's own length), and
one list of predictions back; each sample is combined as `pos + g (pos - neg)` with `g = guidance_scale`, CFG on for
`g > 0` (`CFGLayout("list", ("cond", "uncond"), "cond", g)`; the plain `u + a (c - u)` scale is `a = 1 + g`). With
`cfg_truncation < 1` the steps whose normalised time `(1000 - t) / 1000` exceeds it run without CFG (`g = 0`, a call
on the conditional samples only); those steps are left alone. `cfg_normalization` (the guided prediction's norm
capped at a multiple of the conditional prediction's) runs after the line on the model's own conditional
prediction, as it does for CFG (docs/algorithm.md section 7).

Region definition:
- In each main block, sample `i`'s sequence is `[image tokens; image padding; caption tokens; caption padding]`, then
  batch padding up to the longest sample (masked); one softmax over it, after the per-head RMS norms and the
  3-axis complex RoPE (`z_image_qk` mirrors `ZSingleStreamAttnProcessor`). For the image queries, the head-averaged
  probabilities over the sample's real caption tokens, renormalised, are the cross map, and those over its image
  tokens, renormalised, the self map (as for SD3 and FLUX). Text queries are not formed.
- Blocks: the middle half of the main blocks (`layers.7` to `layers.22` of Z-Image's 30; the tiny test model's 4:
  `layers.1`, `layers.2`), as for SD3's joint blocks; `max_layers=3` keeps their mid-depth three. The refiner blocks before them attend within the image
  (`noise_refiner`) or within the caption (`context_refiner`) only: no text-image attention to read.
- Text: the pipeline passes each caption without padding (the Qwen3 states of the chat-templated prompt
  `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`), so the text length is the longest caption
  of the call (cond or uncond, `T`); `tokenize` applies the same template. Template tokens take part like CLIP's
  start and end tokens.
- Padding never owns a region: the transformer pads image and caption to a multiple of 32 with learned pad tokens
  (attended to, but neither part of the grid nor of the prompt) and the batch to its longest sample (masked). The
  caption columns past a sample's length are set to exactly zero in its cross map (so `token_roles` reads them as
  masked); image padding is left out of the self map.
- Reference token: position 0, `<|im_start|>`. For the causal Qwen3 encoder its state is the same for every prompt,
  as CLIP's start token's is, and a language model's first token is its attention sink (Xiao et al., "Efficient
  Streaming Language Models with Attention Sinks", ICLR 2024; Sun et al., "Massive Activations in Large Language
  Models", COLM 2024). This choice is not validated on real weights: look at `--show-regions`.
- Grid: the prediction's latent grid `(H, W)`; the maps live on the patch grid (latent/2) and the masks are
  upsampled as for SD3.
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
from .base import Family, LayerPair, PassContext, middle_half, scale_argument

__all__ = ["FAMILY", "z_image_qk"]

_PROCESSORS = ("ZSingleStreamAttnProcessor",)
_SEQ_MULTIPLE = 32  # `ZImageTransformer2DModel` pads image and caption tokens to a multiple of this (SEQ_MULTI_OF)
_RENORM_EPS = 1e-12  # as `AttentionRows`' renormalisation


def _padded(n: int) -> int:
    return n + (-n) % _SEQ_MULTIPLE


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # `ZSingleStreamAttnProcessor`'s own rotary embedding, op for op: complex float32 whatever the model's dtype
    with torch.amp.autocast("cuda", enabled=False):
        x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_complex * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def z_image_qk(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    freqs_cis: torch.Tensor | None = None,
    projections: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the query and key `[B, heads, S, head_dim]` exactly as `ZSingleStreamAttnProcessor` hands them to its
    attention: `to_q`/`to_k`, heads split (`unflatten(-1, (heads, -1))`), the per-head RMS norms `norm_q`/`norm_k`,
    then the complex rotary embedding `freqs_cis` in float32.

    Args:
        attn (`nn.Module`): a Z-Image attention layer (diffusers `Attention` with `ZSingleStreamAttnProcessor`).
        hidden_states (`torch.Tensor` of shape `[B, S, dim]`): the layer's input.
        freqs_cis (`torch.Tensor` of shape `[B, S, head_dim / 2]`, complex, *optional*): the rotary factors the
            transformer passes to the layer.
        projections (`Mapping[str, torch.Tensor]`, *optional*): the outputs of `to_q`/`to_k` recorded during the
            processor's own call, used instead of running the projections again (the same tensors).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(query, key)`, heads first.
    """
    name = type(getattr(attn, "processor", None)).__name__
    if name not in _PROCESSORS:
        raise SCFGError(
            f"Expected a Z-Image attention layer with processor {', '.join(_PROCESSORS)}, but got {name}. S-CFG forms "
            "the layer's queries and keys as that processor does; restore it, or leave this layer out of `layers=`."
        )
    query = _projection(attn, "to_q", hidden_states, projections).unflatten(-1, (attn.heads, -1))
    key = _projection(attn, "to_k", hidden_states, projections).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if freqs_cis is not None:
        query, key = _rotary(query, freqs_cis), _rotary(key, freqs_cis)
    return query.transpose(1, 2), key.transpose(1, 2)


def _cfg_off_this_step(pipe: Any, arguments: Mapping[str, Any]) -> bool:
    """Whether the pipeline's `cfg_truncation` switches CFG off for the step it is running.

    The pipeline drops CFG where `(1000 - t) / 1000 > cfg_truncation` (computed in float32 from the schedule); the
    step is the scheduler's current index (`step_index`, None before the first `step`: then `begin_index`).
    """
    truncation = arguments.get("cfg_truncation", getattr(pipe, "_cfg_truncation", None))
    if truncation is None or float(truncation) > 1:
        return False
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return False
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None) or 0
    if not 0 <= index < len(timesteps):
        return False
    return float((1000 - timesteps[index].float()) / 1000) > float(truncation)


def _argument(args: tuple, kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class ZImageFamily(Family):
    """Adapter for Z-Image pipelines (one transformer call on list inputs per step)."""

    name = "z_image"
    default_levels = (2,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k")

    def matches(self, pipe: Any) -> bool:
        # the Omni pipeline nests lists of condition images and orders the sequence [caption; image; SigLIP]
        return (
            type(getattr(pipe, "transformer", None)).__name__ == "ZImageTransformer2DModel"
            and type(pipe).__name__ != "ZImageOmniPipeline"
        )

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        level = int(denoiser.config.all_patch_size[0])  # the pipelines call with the first (only released) size
        blocks = len(denoiser.layers)
        chosen = middle_half(blocks)
        return [LayerPair(f"layers.{i}.attention", f"layers.{i}.attention", level) for i in chosen]

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        if context is None:
            raise SCFGError("Expected the pass context of a Z-Image transformer call (its image token count).")
        hidden_states = call.input(0, "hidden_states")
        attention_mask = call.input(2, "attention_mask")
        query, key = z_image_qk(module, hidden_states, call.kwargs.get("freqs_cis"), call.projections)
        bias = None
        if attention_mask is not None:  # [B, S] boolean, True: attend (the processor broadcasts it the same way)
            mask = attention_mask.to(query.device)
            mask = mask[:, None, None, :] if mask.ndim == 2 else mask
            bias = (
                mask
                if mask.dtype != torch.bool
                else torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -torch.inf)
            )
        images = context.extra["image_tokens"]
        scale = 1.0 / math.sqrt(query.shape[-1])  # the processor passes no scale: SDPA's default
        return AttentionRows(query[:, :, :images], key, scale, bias, **({} if budget is None else {"budget": budget}))

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        joint = rows[pair.cross]
        images = joint.query_tokens
        start = context.extra["image_len"]  # type: ignore[union-attr]  # the caption starts after the image padding
        lengths = torch.tensor(context.extra["text_lens"])  # type: ignore[union-attr]
        text = int(lengths.max())
        cross = joint.select(slice(start, start + text), renormalise=False).dense()
        # each sample's own caption only: its pad tokens and the batch padding get exactly zero, the rest sums to 1
        real = torch.arange(text, device=cross.device) < lengths.to(cross.device)[:, None]
        cross = cross * real[:, None, :].to(cross.dtype)
        cross = cross / cross.sum(dim=-1, keepdim=True).clamp_min(_RENORM_EPS)
        return cross, joint.select(slice(0, images))

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # position 0 (`<|im_start|>`) is the reference; columns past a caption's length are exactly zero
        return None, cross_probs.amax(dim=1) > 0

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        try:
            on, scale = bool(pipe.do_classifier_free_guidance), float(pipe.guidance_scale)
        except AttributeError:  # outside the pipeline's call: read the argument (CFG on for g > 0)
            scale = scale_argument(arguments, "guidance_scale")
            on = scale is not None and scale > 0
        if not on or scale is None or _cfg_off_this_step(pipe, arguments):
            return None
        layout = CFGLayout("list", ("cond", "uncond"), "cond", scale)
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        # the pipeline's line is c + g (c - u) = u + (1 + g)(c - u): the usual scale `scale` is g = scale - 1
        return {"guidance_scale": scale - 1.0, "negative_prompt": negative_prompt}

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        latents = _argument(args, kwargs, 0, "x")
        timestep = _argument(args, kwargs, 1, "t")
        captions = _argument(args, kwargs, 2, "cap_feats")
        if not isinstance(latents, list | tuple) or not latents or not all(torch.is_tensor(x) for x in latents):
            got = type(latents).__name__
            if isinstance(latents, list | tuple) and latents and isinstance(latents[0], list | tuple):
                got += " of lists (Omni mode, with condition images)"
            raise SCFGError(
                "Expected the Z-Image transformer to be called with a list of latents [C, 1, H, W], as ZImagePipeline "
                f"does, but got a {got}."
            )
        shapes = {tuple(x.shape) for x in latents}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1] != 1:
            raise SCFGError(
                f"Expected the Z-Image latents to share one shape [C, 1, H, W] (one image per sample), but got "
                f"{sorted(shapes)}."
            )
        _, frames, height, width = next(iter(shapes))
        patch, frame_patch = int(kwargs.get("patch_size", 2)), int(kwargs.get("f_patch_size", 1))
        image_tokens = (frames // frame_patch) * (height // patch) * (width // patch)
        # the pipelines pass the normalised time (1000 - t) / 1000; the scheduler lists t
        t = None if timestep is None else 1000 * (1 - torch.as_tensor(timestep).double())
        extra = {
            "image_tokens": image_tokens,
            "image_len": _padded(image_tokens),
            "text_lens": [int(c.shape[0]) for c in captions],
        }
        return PassContext(grid=(int(height), int(width)), batch=len(latents), timestep=t, extra=extra)

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        samples = output[0] if isinstance(output, tuple) else output.sample
        # one tensor [C, 1, H, W] per sample: stacked into a copy, handed back as a new list by `with_predictions`
        return torch.stack(list(samples))[:, :, 0]

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        # the pipeline reads the list per sample (`model_out_list[j]`): one [C, 1, H, W] view of `pred` each
        return super().with_predictions(output, list(pred.unsqueeze(2).unbind(0)), context)

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is None:
            return []
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for prompt in prompts
        ]
        # the caption holds the prompt's tokens from position 0 (the pipeline drops the padding): pad on the right
        encoded = tokenizer(texts, truncation=True, max_length=num_tokens).input_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(texts), num_tokens), pad, dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return [(tokenizer, ids)]


FAMILY = ZImageFamily()
