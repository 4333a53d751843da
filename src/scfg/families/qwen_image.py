"""Qwen-Image: `QwenImagePipeline` (and its Img2Img, Inpaint and ControlNet variants), `QwenImageTransformer2DModel`.

How the pipeline runs CFG ("true CFG", `true_cfg_scale > 1` and a negative prompt, even `" "`): two separate
transformer passes per step, the prompt first, then the negative prompt, combined as
`comb = neg + true_cfg_scale · (cond - neg)` (`CFGLayout("separate", ("cond", "uncond"), "uncond")`), and then
rescaled token by token to the conditional prediction's norm, `comb · ‖cond‖ / ‖comb‖` (norms over the 64 packed
channels). S-CFG keeps the conditional prediction and rewrites the negative one (docs/algorithm.md section 7), so
`comb` is S-CFG's guided prediction and the pipeline's rescale acts on it exactly as it acts on CFG's.
`guidance_scale` is the embedding of guidance-distilled checkpoints, not CFG, and stays as it is.

Region definition:
- The 16-channel latent is packed 2x2 into tokens `[B, L, 64]`; the token grid `(H/2, W/2)` of the latent is the
  grid of the masks and of the rule (a token's score norm is over its 64 packed channels, the norm the pipeline's
  rescale uses). It is read from `img_shapes` (frames, height, width) and checked against `L`.
- All 60 blocks are double-stream MMDiT blocks: one softmax over the keys `[text; image]`, text first
  (`QwenDoubleStreamAttnProcessor2_0`: per-head RMS norms, then the complex rotary embedding of MSRoPE, Wu et al.,
  "Qwen-Image Technical Report", 2025: image positions centred on the grid, text positions continuing along the
  diagonal after the image's). `qwen_qkv` mirrors that processor. For the image queries, the image-to-text block
  is the cross map and the image-to-image block the self map, each renormalised (as for SD3 and FLUX). Text
  queries are not used.
- The middle half of the blocks (15-44 of 60) is the candidate set whose mid-depth three feed the maps (`max_layers=3`) by default, as for the other DiT families here (early
  blocks are still close to the noise, late ones to pixels). Each captured block costs about as much again as its
  own attention (benchmarks/RESULTS.md), so `layers_per_level=k` (the last `k` of them) or `mask_interval` trade
  maps for time.
- The text is Qwen2.5-VL's last hidden states of the chat template with the prompt inside; the pipeline drops the
  template's first 34 tokens (the system prompt, `<|im_start|>user\\n`), so the transformer sees the prompt's
  tokens followed by `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`, `\\n`, then padding up to the batch's
  longest prompt, masked (`encoder_hidden_states_mask`). Masked padding never owns regions.
- The foreground's reference, CLIP's start token in SD: the text has no prompt-independent token left (the
  template prefix is dropped, and with it position 0, where a causal language model keeps its attention sink:
  Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024), so the last unmasked
  token, the `\\n` that closes the template (`<|im_start|>assistant\\n`), plays that role, as `</s>` does for
  PixArt. It carries no word of its own and exists for every prompt, also for `prompt_embeds` with their mask.
- The negative prompt is usually `" "` (no words), so its pass would compare template tokens with each other:
  this family's presets take the foreground from the prompt's pass (`foreground_source="cond"`), as PixArt does.

Not validated on real weights (no checkpoint could be run where this adapter was written): the layer band, the
reference token and the foreground source. Look at `--show-regions` on a real checkpoint first.

Not supported: the Edit pipelines (`QwenImageEditPipeline`, `...EditPlus...`, `...EditInpaint...`) and
`QwenImageLayeredPipeline`. They concatenate reference-image (or layer) tokens to the latent sequence, which are no
part of the prediction's grid, and their prompts hold the reference image's vision tokens; both are refused with
`SCFGError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall, recorded_projection
from ..config import SCFGError
from ..engine import CFGLayout
from .base import Family, LayerPair, PassContext, last_valid_token, middle_half, scale_argument, text_first_split

__all__ = ["FAMILY", "SUPPORTED_PROCESSORS", "qwen_key_bias", "qwen_qkv", "qwen_scale"]

SUPPORTED_PROCESSORS = ("QwenDoubleStreamAttnProcessor2_0",)

# Pipelines whose transformer also sees tokens outside the generated image (reference images, layers).
_REFUSED = ("Edit", "Layered")

# `QwenImageTransformer2DModel.forward`'s positional order, for callers that pass arguments positionally
_FORWARD = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes")


def _processor_name(attn: nn.Module) -> str:
    """Return the class name of `attn`'s processor, or raise naming the processors that are mirrored."""
    name = type(getattr(attn, "processor", None)).__name__
    if name not in SUPPORTED_PROCESSORS:
        raise SCFGError(
            f"Expected a Qwen-Image attention layer whose processor is one of {', '.join(SUPPORTED_PROCESSORS)}, "
            f"but got {type(attn).__name__} with processor {name}. S-CFG forms the layer's queries and keys the way "
            "that processor does: restore it with "
            "`transformer.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())`."
        )
    return name


def qwen_scale(attn: nn.Module) -> float:
    """Return the softmax scale of `attn`'s joint attention: the processor passes none, so it is the attention
    function's default `1 / sqrt(head_dim)`."""
    _processor_name(attn)
    return 1.0 / math.sqrt(int(attn.inner_dim) // int(attn.heads))


def _projection(
    attn: nn.Module, name: str, inputs: torch.Tensor, projections: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    # projections a caller passes in must be the processor's own for these inputs: a wrong shape is refused
    return recorded_projection(attn, name, inputs, projections, strict=True)


def _rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The processor's rotary embedding of `x` `[B, N, heads, head_dim]`: the per-device function where diffusers
    has one (`ROPE_PER_DEVICE`: a real-valued twin for backends without complex numbers), else the complex one."""
    from diffusers.models.transformers import transformer_qwenimage as qwen

    per_device = getattr(qwen, "ROPE_PER_DEVICE", None)
    if per_device is not None:
        return per_device.get(x.device.type, per_device["cuda"])(x, freqs)
    return qwen.apply_rotary_emb_qwen(x, freqs, use_real=False)


def qwen_qkv(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    projections: Mapping[str, torch.Tensor] | None = None,
    with_value: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return the joint query and key `[B, heads, T + Q, head_dim]` exactly as `QwenDoubleStreamAttnProcessor2_0`
    forms them before its attention (text tokens first), and the value when `with_value`.

    The processor's steps, repeated with the same diffusers functions in the same order and layout:
    1. projections `to_q`/`to_k`/`to_v` of the image stream `hidden_states` `[B, Q, C]` and
       `add_q_proj`/`add_k_proj`/`add_v_proj` of the text stream `encoder_hidden_states` `[B, T, C]`;
    2. heads: `[B, N, heads, head_dim]`;
    3. RMS norms `norm_q`/`norm_k` (image) and `norm_added_q`/`norm_added_k` (text);
    4. rotary embedding, the image's and the text's frequencies separately (`image_rotary_emb = (img, txt)`);
    5. the joint sequence `[text; image]`.
    The attention mask is `qwen_key_bias`'s, the scale `qwen_scale`'s.

    Args:
        attn (`nn.Module`): the block's `attn` (`Attention` with `QwenDoubleStreamAttnProcessor2_0`).
        hidden_states (`torch.Tensor` of shape `[B, Q, C]`): the layer's image stream.
        encoder_hidden_states (`torch.Tensor` of shape `[B, T, C]`): the layer's text stream.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`, *optional*): the transformer's `(image, text)`
            complex frequencies; `None` applies none.
        projections (`Mapping[str, torch.Tensor]`, *optional*): outputs of the layer's projection modules recorded
            during the processor's own call (`"to_q"`, `"add_k_proj"`, ...), used instead of running them again
            (the same tensors, so the result is bit-identical); a missing one is computed.
        with_value (`bool`, defaults to `False`): also return the value.

    Returns:
        `(query, key, value)`, each `[B, heads, T + Q, head_dim]`; `value` is `None` unless `with_value`.
    """
    _processor_name(attn)
    if encoder_hidden_states is None:
        raise SCFGError(
            f"Expected `encoder_hidden_states` (the text stream) for a Qwen-Image attention layer, but got None with "
            f"`hidden_states` of shape {list(hidden_states.shape)}. Pass the layer's own inputs."
        )
    head_dim = int(attn.inner_dim) // int(attn.heads)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, head_dim))

    # 1.-3. projections, heads, per-head RMS norms (each norm only where the layer has one, as the processor)
    query = heads(_projection(attn, "to_q", hidden_states, projections))
    key = heads(_projection(attn, "to_k", hidden_states, projections))
    text_query = heads(_projection(attn, "add_q_proj", encoder_hidden_states, projections))
    text_key = heads(_projection(attn, "add_k_proj", encoder_hidden_states, projections))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    # 4. rotary embedding, image and text frequencies apart
    if image_rotary_emb is not None:
        image_freqs, text_freqs = image_rotary_emb
        query, key = _rotary(query, image_freqs), _rotary(key, image_freqs)
        text_query, text_key = _rotary(text_query, text_freqs), _rotary(text_key, text_freqs)
    # 5. text first; heads first, as the attention function sees them (the native backend permutes the same way)
    query = torch.cat([text_query, query], dim=1).transpose(1, 2)
    key = torch.cat([text_key, key], dim=1).transpose(1, 2)
    value = None
    if with_value:
        image_value = heads(_projection(attn, "to_v", hidden_states, projections))
        text_value = heads(_projection(attn, "add_v_proj", encoder_hidden_states, projections))
        value = torch.cat([text_value, image_value], dim=1).transpose(1, 2)
    return query, key, value


def _processor_masks_text() -> bool:
    """Whether the processor builds the joint mask from `encoder_hidden_states_mask` itself (diffusers >= 0.39;
    0.37-0.38 pass the joint mask as `attention_mask`, and earlier releases attend to the padding)."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return (major, minor) >= (0, 39)


def qwen_key_bias(
    encoder_hidden_states_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    num_image_tokens: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Return the additive bias `[B, 1, 1, T + Q]` over the joint keys that the processor's mask amounts to, or None.

    The processor appends an all-true image part to the text mask `[B, T]` (`True`: attend) and hands the result to
    the attention function, which turns `False` into `-inf`; a floating mask would be added as it is, so it is kept
    as it is here too.

    >>> qwen_key_bias(None, torch.tensor([[True, False, True]]), 1, torch.float32)
    tensor([[[[0., -inf, 0.]]]])
    """
    if attention_mask is not None:  # diffusers 0.37-0.38: the joint mask, built by the transformer
        mask = attention_mask
    elif encoder_hidden_states_mask is not None and _processor_masks_text():
        image = torch.ones(
            encoder_hidden_states_mask.shape[0],
            num_image_tokens,
            dtype=torch.bool,
            device=encoder_hidden_states_mask.device,
        )
        mask = torch.cat([encoder_hidden_states_mask, image], dim=1)  # the processor's concatenation and promotion
    else:
        return None
    mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1]) if mask.ndim == 2 else mask
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)
    return mask.to(dtype)


def _argument(args: tuple, kwargs: Mapping[str, Any], name: str) -> Any:
    """The transformer's argument `name`, by keyword (as the pipelines pass it) or by position."""
    if name in kwargs:
        return kwargs[name]
    index = _FORWARD.index(name)
    return args[index] if len(args) > index else None


class QwenImageFamily(Family):
    """Adapter for Qwen-Image pipelines run with true CFG."""

    name = "qwen_image"
    default_levels = (1,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k", "add_q_proj", "add_k_proj")

    def matches(self, pipe: Any) -> bool:
        if type(getattr(pipe, "transformer", None)).__name__ != "QwenImageTransformer2DModel":
            return False
        name = type(pipe).__name__
        if any(part in name for part in _REFUSED):
            raise SCFGError(
                f"Expected a Qwen-Image pipeline whose transformer sees only the generated image's tokens "
                f"(QwenImagePipeline, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline or their ControlNet "
                f"variants), but got {name}. Its reference-image (or layer) tokens, concatenated to the latent "
                f"sequence, are no part of the prediction's grid, and its prompt holds the image's vision tokens: "
                f"S-CFG does not support the Edit and Layered pipelines yet."
            )
        return True

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        # the negative prompt is usually " ": the foreground comes from the prompt's pass (see the module docstring)
        return {"official": {"foreground_source": "cond"}, "paper": {"foreground_source": "cond"}}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        blocks = len(denoiser.transformer_blocks)
        chosen = middle_half(blocks)
        return [LayerPair(f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.attn", 1) for i in chosen]

    # -- attention ------------------------------------------------------------------------------------------------

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        hidden_states = call.input(0, "hidden_states")
        encoder_hidden_states = call.input(1, "encoder_hidden_states")
        attention_mask = call.input(2, "attention_mask")
        query, key, _ = qwen_qkv(
            module,
            hidden_states,
            encoder_hidden_states,
            call.kwargs.get("image_rotary_emb"),
            projections=call.projections,
        )
        text = encoder_hidden_states.shape[1]
        dtype = torch.promote_types(query.dtype, torch.float32)
        bias = qwen_key_bias(
            call.kwargs.get("encoder_hidden_states_mask"), attention_mask, query.shape[2] - text, dtype
        )
        kwargs = {} if budget is None else {"budget": budget}
        return AttentionRows(query[:, :, text:], key, qwen_scale(module), bias, **kwargs)

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        # text keys first; each block's rows renormalised, as for SD3's and FLUX's joint attention
        return text_first_split(rows[pair.cross])

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Masked padding gets exactly zero probability (its keys are -inf); the reference is the last real token.
        return last_valid_token(cross_probs)

    # -- the pipeline's CFG ---------------------------------------------------------------------------------------

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        # the pipeline's `do_true_cfg`: `true_cfg_scale > 1` and a negative prompt (text or embeddings)
        scale = scale_argument(arguments, "true_cfg_scale")
        negative = arguments.get("negative_prompt") is not None or arguments.get("negative_prompt_embeds") is not None
        if scale is None or not negative:
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "uncond", scale)
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        # true CFG runs only with a negative prompt; the pipeline's documentation suggests " " for none
        return {"true_cfg_scale": scale, "negative_prompt": " " if negative_prompt is None else negative_prompt}

    # -- one denoiser call ----------------------------------------------------------------------------------------

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        hidden_states = _argument(args, kwargs, "hidden_states")
        shapes = _argument(args, kwargs, "img_shapes")
        if shapes is None:
            raise SCFGError(
                "Expected the Qwen-Image transformer to be called with `img_shapes`, as QwenImagePipeline does, but "
                "got none."
            )
        # as `QwenEmbedRope` reads it: the first sample's list of (frames, height, width) entries
        shapes = shapes[0] if isinstance(shapes, list) else shapes
        shapes = shapes if isinstance(shapes, list) else [shapes]
        frames, height, width = (int(n) for n in shapes[0])
        if len(shapes) > 1 or frames * height * width != hidden_states.shape[1]:
            raise SCFGError(
                f"Expected the Qwen-Image latent's {hidden_states.shape[1]} tokens to form the one image grid of its "
                f"`img_shapes`, but got `img_shapes` {shapes}: reference-image or layer tokens (Edit, Layered) are "
                f"not supported."
            )
        grid = (height, width) if frames == 1 else (frames, height, width)
        timestep = _argument(args, kwargs, "timestep")
        # the pipelines pass t / 1000; the scheduler lists t
        timestep = timestep * 1000 if timestep is not None else None
        return PassContext(grid=grid, batch=int(hidden_states.shape[0]), timestep=timestep)

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        packed = output[0] if isinstance(output, tuple) else output.sample
        return packed.transpose(1, 2).unflatten(2, context.grid)  # a view: [B, C, *grid]

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        return super().with_predictions(output, pred.flatten(2).transpose(1, 2).contiguous(), context)

    # -- text -----------------------------------------------------------------------------------------------------

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        """The ids the transformer sees: each prompt in the pipeline's chat template, tokenized as the pipeline
        does, the template's first `prompt_template_encode_start_idx` tokens dropped, padded to `num_tokens`."""
        tokenizer = getattr(pipe, "tokenizer", None)
        template = getattr(pipe, "prompt_template_encode", None)
        drop = getattr(pipe, "prompt_template_encode_start_idx", None)
        if tokenizer is None or template is None or drop is None:
            return []
        limit = int(getattr(pipe, "tokenizer_max_length", 1024)) + int(drop)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(prompts), num_tokens), pad, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            seen = tokenizer(template.format(prompt), max_length=limit, truncation=True).input_ids[drop:][:num_tokens]
            ids[row, : len(seen)] = torch.tensor(seen, dtype=torch.long)
        return [(tokenizer, ids)]


FAMILY = QwenImageFamily()
