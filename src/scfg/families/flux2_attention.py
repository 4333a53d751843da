"""FLUX.2 joint attention: the queries, keys and values its processors form, mirrored outside the processors.

S-CFG reads the probabilities of a few layers without replacing their processors, so it has to form the same
queries and keys the processor's softmax uses. `Flux2Transformer2DModel` (`diffusers.models.transformers.
transformer_flux2`, diffusers >= 0.36) has two attention modules with processors of their own:

- double-stream blocks: `Flux2Attention` with `Flux2AttnProcessor`. Projections `to_q`/`to_k`/`to_v` of the image
  stream and `add_q_proj`/`add_k_proj`/`add_v_proj` of the text stream, or, after
  `transformer.fuse_qkv_projections()`, one `to_qkv` and one `to_added_qkv` (`attn.fused_projections`);
- single-stream blocks: `Flux2ParallelSelfAttention` with `Flux2ParallelSelfAttnProcessor`, a "parallel" block
  whose one projection `to_qkv_mlp_proj` holds the query, key and value *and* the MLP's input: its output is
  split by the global ratio `3 · inner_dim : mlp_hidden_dim · mlp_mult_factor`, and the first part chunked in 3.

Both then take the same steps: heads by a fixed `head_dim` (`unflatten(-1, (-1, head_dim))`, `[B, N, heads, d]`),
the RMS norms `norm_q`/`norm_k` (and `norm_added_q`/`norm_added_k` on the text), the joint sequence `[text; image]`
(text first; a single-stream block receives it joined), the rotary embedding on the whole sequence
(`apply_rotary_emb(..., sequence_dim=1)`, 4 axes `(t, h, w, l)`), and attention with SDPA's default scale
`1 / sqrt(head_dim)`. The KV-cache processors (`Flux2KVAttnProcessor`, `Flux2KVParallelSelfAttnProcessor`) run the
same maths when called without KV-cache arguments, and are mirrored only then.

`flux2_qkv` repeats these steps with the same diffusers functions in the same order and layout, so that its query
and key are the processor's to the bit; `tests/test_pipeline_flux2.py` rebuilds each kind of layer's output from
them, fused and unfused, and fails when a diffusers release changes that maths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..capture import recorded_projection
from ..config import SCFGError

__all__ = ["SUPPORTED_PROCESSORS", "flux2_qkv", "flux2_scale"]

_DOUBLE = ("Flux2AttnProcessor", "Flux2KVAttnProcessor")  # on `Flux2Attention`
_SINGLE = ("Flux2ParallelSelfAttnProcessor", "Flux2KVParallelSelfAttnProcessor")  # on `Flux2ParallelSelfAttention`
SUPPORTED_PROCESSORS = _DOUBLE + _SINGLE

_PARALLEL = "to_qkv_mlp_proj"
_IMAGE_FUSED = "to_qkv"
_TEXT_FUSED = "to_added_qkv"
_IMAGE = ("to_q", "to_k", "to_v")
_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj")


def _processor_name(attn: nn.Module) -> str:
    """Return the class name of `attn`'s processor, or raise naming the processors that are mirrored."""
    name = type(getattr(attn, "processor", None)).__name__
    if name not in SUPPORTED_PROCESSORS:
        raise SCFGError(
            f"Expected a FLUX.2 attention layer whose processor is one of {', '.join(SUPPORTED_PROCESSORS)}, but got "
            f"{type(attn).__name__} with processor {name}. S-CFG forms the layer's queries and keys the way these "
            f"processors do; restore the default with `transformer.set_attn_processor(...)`, or leave this layer out."
        )
    return name


def flux2_scale(attn: nn.Module) -> float:
    """Return the softmax scale of `attn`'s joint attention: SDPA's default `1 / sqrt(head_dim)`.

    The FLUX.2 processors pass no scale to `dispatch_attention_fn`, which then uses SDPA's default.

    Args:
        attn (`nn.Module`):
            A FLUX.2 attention layer (`Flux2Attention` or `Flux2ParallelSelfAttention`) with a supported processor.

    Returns:
        `float`: the scale applied to `query @ key.T` before the softmax.
    """
    _processor_name(attn)
    return 1.0 / math.sqrt(int(attn.head_dim))


def _projection(
    attn: nn.Module, name: str, inputs: torch.Tensor, projections: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    # projections a caller passes in must be the processor's own for these inputs: a wrong shape is refused
    return recorded_projection(
        attn,
        name,
        inputs,
        projections,
        strict=True,
        missing_hint="Fused projections need `transformer.fuse_qkv_projections()` on the whole model.",
    )


def _check_projection_names(projections: Mapping[str, torch.Tensor] | None, used: tuple[str, ...]) -> None:
    # A recorded projection the processor did not use (`to_q` of a fused layer, `add_q_proj` of a single-stream
    # one) means the hooks sit on the wrong modules: refuse it instead of mixing it in.
    if projections is None:
        return
    unused = sorted(set(projections) - set(used))
    if unused:
        raise SCFGError(
            f"Expected `projections` keys among {list(used)} (the Linear modules this layer's processor calls), but "
            f"got {unused} as well. Hook the Linear modules the processor calls."
        )


def _parallel_qkv(attn: nn.Module, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value `[B, N, heads * d]` of `to_qkv_mlp_proj`'s output, split as the processor splits it: by
    the global QKV : MLP ratio (which also holds for a column-sharded slice), then the QKV part in 3."""
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, _ = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
    query, key, value = qkv.chunk(3, dim=-1)
    return query, key, value


def flux2_qkv(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    projections: Mapping[str, torch.Tensor] | None = None,
    with_value: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return the query and key `[B, heads, N, head_dim]` of the joint sequence exactly as the FLUX.2 processor
    forms them before its attention (after the norms and the rotary embedding; text tokens first), and the value
    when `with_value`.

    The arguments are those the layer was called with, as a forward pre-hook sees them. In a double-stream block
    (`Flux2Attention`) `N = T + L`: the `T` text tokens of `encoder_hidden_states`, then the `L` image tokens of
    `hidden_states`. A single-stream block (`Flux2ParallelSelfAttention`) receives the joined `[text; image]`
    sequence as `hidden_states` and no `encoder_hidden_states`. The softmax scale is `flux2_scale(attn)`.

    Args:
        attn (`nn.Module`):
            The layer: `Flux2Attention` (`Flux2AttnProcessor`, unfused or fused) or `Flux2ParallelSelfAttention`
            (`Flux2ParallelSelfAttnProcessor`), or either with its KV-cache processor called without a cache.
        hidden_states (`torch.Tensor` of shape `[B, L, C]`):
            The layer's `hidden_states` (in a single-stream block, `[B, T + L, C]`).
        encoder_hidden_states (`torch.Tensor` of shape `[B, T, C]`, *optional*):
            The text stream; required by a double-stream layer, refused by a single-stream one.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`, *optional*):
            The `(cos, sin)` pair `[N, head_dim]` the transformer passes to every block; `None` applies none.
        projections (`Mapping[str, torch.Tensor]`, *optional*):
            Outputs of the layer's projection modules that forward hooks recorded during the processor's own call,
            keyed by module name: `"to_q"`, `"to_k"`, `"to_v"`, `"add_q_proj"`, `"add_k_proj"`, `"add_v_proj"`;
            `"to_qkv"` and `"to_added_qkv"` for fused ones; `"to_qkv_mlp_proj"` in a single-stream block. They are
            used instead of running the modules again (same tensors, so the result is bit-identical); any missing
            one is computed.
        with_value (`bool`, defaults to `False`):
            Also return the value, in the same layout.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]`: `(query, key, value)`, each `[B, heads, N,
        head_dim]`; `value` is `None` unless `with_value`.
    """
    processor = _processor_name(attn)
    head_shape = (-1, int(attn.head_dim))

    # 1. projections, sequence first: [B, N, heads * head_dim]
    if processor in _SINGLE:
        if encoder_hidden_states is not None:
            raise SCFGError(
                f"Expected no `encoder_hidden_states` for a single-stream FLUX.2 attention layer (its "
                f"`hidden_states` is already the joint [text; image] sequence), but got shape "
                f"{list(encoder_hidden_states.shape)}."
            )
        _check_projection_names(projections, (_PARALLEL,))
        query, key, value = _parallel_qkv(attn, _projection(attn, _PARALLEL, hidden_states, projections))
        text_query = text_key = text_value = None
    else:
        if encoder_hidden_states is None:
            raise SCFGError(
                f"Expected `encoder_hidden_states` for a double-stream FLUX.2 attention layer (it has text "
                f"projections), but got None with `hidden_states` of shape {list(hidden_states.shape)}. Pass the "
                "layer's own inputs."
            )
        fused = bool(getattr(attn, "fused_projections", False))
        _check_projection_names(projections, (_IMAGE_FUSED, _TEXT_FUSED) if fused else (*_IMAGE, *_TEXT))
        value = text_value = None
        if fused:
            query, key, value = _projection(attn, _IMAGE_FUSED, hidden_states, projections).chunk(3, dim=-1)
            text_query, text_key, text_value = _projection(
                attn, _TEXT_FUSED, encoder_hidden_states, projections
            ).chunk(3, dim=-1)
        else:
            query = _projection(attn, "to_q", hidden_states, projections)
            key = _projection(attn, "to_k", hidden_states, projections)
            text_query = _projection(attn, "add_q_proj", encoder_hidden_states, projections)
            text_key = _projection(attn, "add_k_proj", encoder_hidden_states, projections)
            if with_value:
                value = _projection(attn, "to_v", hidden_states, projections)
                text_value = _projection(attn, "add_v_proj", encoder_hidden_states, projections)

    # 2.-3. heads, then the per-head RMS norms: [B, N, heads, head_dim]
    query = attn.norm_q(query.unflatten(-1, head_shape))
    key = attn.norm_k(key.unflatten(-1, head_shape))
    value = value.unflatten(-1, head_shape) if with_value else None
    if text_query is not None:
        text_query = attn.norm_added_q(text_query.unflatten(-1, head_shape))
        text_key = attn.norm_added_k(text_key.unflatten(-1, head_shape))
        # 4. the joint sequence, text first
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        if with_value:
            value = torch.cat([text_value.unflatten(-1, head_shape), value], dim=1)

    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        # 5. over the whole joint sequence, which is dimension 1 in this layout
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

    # heads first, as the attention function sees them (the native backend permutes the same way)
    return query.transpose(1, 2), key.transpose(1, 2), None if value is None else value.transpose(1, 2)
