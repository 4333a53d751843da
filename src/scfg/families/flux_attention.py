"""FLUX.1 joint attention: the queries, keys and values its processor forms, mirrored outside the processor.

S-CFG reads the probabilities of a few layers without replacing their processors, so it has to form the same
queries and keys the processor's softmax uses. For `FluxTransformer2DModel` these are built inside
`FluxAttnProcessor.__call__` (`diffusers.models.transformers.transformer_flux`), in this order:
1. projections: `to_q`/`to_k`/`to_v` (or one fused `to_qkv`) of `hidden_states`, and in double-stream blocks
   `add_q_proj`/`add_k_proj`/`add_v_proj` (or `to_added_qkv`) of `encoder_hidden_states`;
2. heads: `unflatten(-1, (-1, head_dim))`, giving `[B, N, heads, head_dim]`;
3. RMS norms: `norm_q`/`norm_k`, and `norm_added_q`/`norm_added_k` on the text part;
4. joint sequence: `[text; image]`, text tokens first (single-stream blocks get that sequence already joined,
   as `hidden_states`, and have no text projections);
5. rotary embedding on the whole joint sequence (`apply_rotary_emb(..., sequence_dim=1)`);
6. attention with SDPA's default scale `1 / sqrt(head_dim)` (`FluxAttention` has no `scale`).

`flux_qkv` repeats steps 1-5 with the same diffusers functions in the same order and layout, so that its query and
key are the processor's to the bit; `tests/test_flux_mirror.py` rebuilds each layer's output from them and fails
when a diffusers release changes that maths. diffusers < 0.35 (`Attention` with `FluxAttnProcessor2_0` or
`FusedFluxAttnProcessor2_0`, heads-first `[B, heads, N, head_dim]` throughout) is mirrored the same way.

Attention masks are left to the caller: FluxPipeline passes none, and before diffusers 0.34
`FusedFluxAttnProcessor2_0` ignores one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..capture import recorded_projection
from ..config import SCFGError

__all__ = ["SUPPORTED_PROCESSORS", "flux_qkv", "flux_scale"]

# Processors whose joint attention `flux_qkv` mirrors. The IP-Adapter ones run the same joint attention and add a
# second softmax (image queries over the image-prompt tokens) to the output; that second softmax is not part of the
# text-image probabilities S-CFG reads, so only the joint part is mirrored.
_CURRENT = ("FluxAttnProcessor", "FluxIPAdapterAttnProcessor")  # diffusers >= 0.35, on `FluxAttention`
_LEGACY = ("FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0", "FluxIPAdapterJointAttnProcessor2_0")  # < 0.35
SUPPORTED_PROCESSORS = _CURRENT + _LEGACY

_IMAGE_FUSED = "to_qkv"
_TEXT_FUSED = "to_added_qkv"
_IMAGE = ("to_q", "to_k", "to_v")
_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj")


def _processor_name(attn: nn.Module) -> str:
    """Return the class name of `attn`'s processor, or raise naming the processors that are mirrored."""
    name = type(getattr(attn, "processor", None)).__name__
    if name not in SUPPORTED_PROCESSORS:
        raise SCFGError(
            f"Expected a FLUX attention layer whose processor is one of {', '.join(SUPPORTED_PROCESSORS)}, but got "
            f"{type(attn).__name__} with processor {name}. S-CFG forms the layer's queries and keys the way these "
            f"processors do; restore the default with `transformer.set_attn_processor(FluxAttnProcessor())`, or "
            f"leave this layer out of `layers=`."
        )
    return name


def _is_fused(attn: nn.Module, processor: str) -> bool:
    # diffusers >= 0.35 keeps one processor and branches on the module's flag; older releases swap in a fused
    # processor class, which always reads `to_qkv` / `to_added_qkv`.
    if processor in _CURRENT:
        return bool(getattr(attn, "fused_projections", False))
    return processor == "FusedFluxAttnProcessor2_0"


def flux_scale(attn: nn.Module) -> float:
    """Return the softmax scale of `attn`'s joint attention: SDPA's default `1 / sqrt(head_dim)`.

    `FluxAttention` has no `scale` attribute and its processor passes none to the attention function, which then
    uses `1 / sqrt(head_dim)`; the legacy `Attention.scale` holds the same number.

    Args:
        attn (`nn.Module`):
            A FLUX attention layer (`FluxAttention`, or `Attention` on diffusers < 0.35) with a supported processor.

    Returns:
        `float`: the scale applied to `query @ key.T` before the softmax.
    """
    _processor_name(attn)
    return 1.0 / math.sqrt(_head_dim(attn))


def _head_dim(attn: nn.Module) -> int:
    if hasattr(attn, "head_dim"):  # FluxAttention
        return int(attn.head_dim)
    return int(attn.inner_dim) // int(attn.heads)  # legacy Attention: what its processor derives from `to_k`


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


def _check_projection_names(
    projections: Mapping[str, torch.Tensor] | None, used: tuple[str, ...], fused: bool
) -> None:
    # A recorded projection the processor did not use (`to_q` of a fused layer, `add_q_proj` of a single-stream
    # one) means the hooks sit on the wrong modules: refuse it instead of mixing it in.
    if projections is None:
        return
    unused = sorted(set(projections) - set(used))
    if unused:
        kind = "fused" if fused else "unfused"
        raise SCFGError(
            f"Expected `projections` keys among {list(used)} (what this layer's processor computes: {kind} "
            f"projections), but got {unused} as well. Hook the Linear modules the processor calls."
        )


def flux_qkv(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
    *,
    projections: Mapping[str, torch.Tensor] | None = None,
    with_value: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return the query and key `[B, heads, N, head_dim]` of the joint sequence exactly as the FLUX processor forms
    them before its attention (after the norms and the rotary embedding; text tokens first), and the value when
    `with_value`.

    The arguments are those the layer was called with, as a forward pre-hook sees them. In a double-stream block
    (`FluxTransformerBlock`) `N = T + Q`: the `T` text tokens of `encoder_hidden_states`, then the `Q` image tokens
    of `hidden_states`. A single-stream block (`FluxSingleTransformerBlock`) receives the joined `[text; image]`
    sequence as `hidden_states` and no `encoder_hidden_states`. Any attention mask is the caller's to apply; the
    softmax scale is `flux_scale(attn)`.

    Args:
        attn (`nn.Module`):
            The layer: `FluxAttention` with `FluxAttnProcessor` or `FluxIPAdapterAttnProcessor` (of which the joint
            attention is mirrored, not the image-prompt attention it adds), or on diffusers < 0.35 an `Attention`
            with `FluxAttnProcessor2_0`, `FusedFluxAttnProcessor2_0` or `FluxIPAdapterJointAttnProcessor2_0`.
        hidden_states (`torch.Tensor` of shape `[B, Q, C]`):
            The layer's `hidden_states` (in a single-stream block, `[B, T + Q, C]`).
        encoder_hidden_states (`torch.Tensor` of shape `[B, T, C]`, *optional*):
            The text stream; required by a double-stream layer, refused by a single-stream one.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`, *optional*):
            The `(cos, sin)` pair `[N, head_dim]` the transformer passes to every block; `None` applies none.
        projections (`Mapping[str, torch.Tensor]`, *optional*):
            Outputs of the layer's projection modules that forward hooks recorded during the processor's own call,
            keyed by module name: `"to_q"`, `"to_k"`, `"to_v"`, `"add_q_proj"`, `"add_k_proj"`, `"add_v_proj"`,
            or for fused projections `"to_qkv"` and `"to_added_qkv"`. They are used instead of running the modules
            again (same tensors, so the result is bit-identical); any missing one is computed.
        with_value (`bool`, defaults to `False`):
            Also return the value, in the same layout.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]`: `(query, key, value)`, each `[B, heads, N,
        head_dim]`; `value` is `None` unless `with_value`.
    """
    processor = _processor_name(attn)
    fused = _is_fused(attn, processor)
    double = getattr(attn, "add_q_proj", None) is not None or getattr(attn, "to_added_qkv", None) is not None
    if double and encoder_hidden_states is None:
        raise SCFGError(
            f"Expected `encoder_hidden_states` for a double-stream FLUX attention layer (it has text projections), "
            f"but got None with `hidden_states` of shape {list(hidden_states.shape)}. Pass the layer's own inputs."
        )
    if not double and encoder_hidden_states is not None:
        raise SCFGError(
            f"Expected no `encoder_hidden_states` for a single-stream FLUX attention layer (its `hidden_states` is "
            f"already the joint [text; image] sequence), but got shape {list(encoder_hidden_states.shape)}."
        )
    if fused:
        used = (_IMAGE_FUSED, _TEXT_FUSED) if double else (_IMAGE_FUSED,)
    else:
        used = (*_IMAGE, *_TEXT) if double else _IMAGE
    _check_projection_names(projections, used, fused)

    if processor in _LEGACY:
        query, key, value = _legacy_qkv(attn, hidden_states, encoder_hidden_states, projections, fused, with_value)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            # 5. these processors call it with its default layout, heads first
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        return query, key, value

    # FluxAttnProcessor splits by a fixed `head_dim`; the IP-Adapter processor by the head count (same split
    # outside tensor parallelism, but the mirror follows each one's own call).
    head_shape = (attn.heads, -1) if processor == "FluxIPAdapterAttnProcessor" else (-1, attn.head_dim)

    # 1. projections, sequence first: [B, N, heads * head_dim]
    value = text_value = None
    if fused:
        query, key, value = _projection(attn, _IMAGE_FUSED, hidden_states, projections).chunk(3, dim=-1)
    else:
        query = _projection(attn, "to_q", hidden_states, projections)
        key = _projection(attn, "to_k", hidden_states, projections)
        if with_value:
            value = _projection(attn, "to_v", hidden_states, projections)
    # 2.-3. heads, then the per-head RMS norms: [B, N, heads, head_dim]
    query = attn.norm_q(query.unflatten(-1, head_shape))
    key = attn.norm_k(key.unflatten(-1, head_shape))
    value = value.unflatten(-1, head_shape) if with_value else None

    if double:
        if fused:
            text_query, text_key, text_value = _projection(
                attn, _TEXT_FUSED, encoder_hidden_states, projections
            ).chunk(3, dim=-1)
        else:
            text_query = _projection(attn, "add_q_proj", encoder_hidden_states, projections)
            text_key = _projection(attn, "add_k_proj", encoder_hidden_states, projections)
            if with_value:
                text_value = _projection(attn, "add_v_proj", encoder_hidden_states, projections)
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


def _legacy_qkv(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    projections: Mapping[str, torch.Tensor] | None,
    fused: bool,
    with_value: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 1-4 as `FluxAttnProcessor2_0` / `FusedFluxAttnProcessor2_0` (diffusers < 0.35) take them: each
    projection viewed as `[B, N, heads, head_dim]` and moved heads first before its norm."""
    batch = hidden_states.shape[0] if encoder_hidden_states is None else encoder_hidden_states.shape[0]
    heads = attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    def norm(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if module is None else module(x)

    value = None
    if fused:
        qkv = _projection(attn, _IMAGE_FUSED, hidden_states, projections)
        query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
    else:
        query = _projection(attn, "to_q", hidden_states, projections)
        key = _projection(attn, "to_k", hidden_states, projections)
        if with_value:
            value = _projection(attn, "to_v", hidden_states, projections)
    query = norm(attn.norm_q, split(query))
    key = norm(attn.norm_k, split(key))
    value = split(value) if with_value else None

    if encoder_hidden_states is not None:
        text_value = None
        if fused:
            qkv = _projection(attn, _TEXT_FUSED, encoder_hidden_states, projections)
            text_query, text_key, text_value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            text_query = _projection(attn, "add_q_proj", encoder_hidden_states, projections)
            text_key = _projection(attn, "add_k_proj", encoder_hidden_states, projections)
            if with_value:
                text_value = _projection(attn, "add_v_proj", encoder_hidden_states, projections)
        text_query = norm(getattr(attn, "norm_added_q", None), split(text_query))
        text_key = norm(getattr(attn, "norm_added_k", None), split(text_key))
        query = torch.cat([text_query, query], dim=2)
        key = torch.cat([text_key, key], dim=2)
        if with_value:
            value = torch.cat([split(text_value), value], dim=2)
    return query, key, value
