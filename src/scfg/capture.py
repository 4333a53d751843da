"""Record head-averaged attention probabilities of chosen layers, one denoiser forward pass at a time.

Nothing here replaces a processor: the layer's output still comes from its own processor (SDPA, LoRA, IP-Adapter
keep working) and every other layer is untouched. For each chosen attention module (diffusers `Attention` or an
`AttentionModuleMixin` class such as `FluxAttention`), forward hooks on its projection modules (`to_q`, `to_k`,
and what the family names: `add_k_proj`, `to_qkv`, ...) keep what the processor itself computes, and a hook after
the layer hands them, with the layer's inputs, to the family's attention function. That function forms the
queries and keys as the processor does (heads, norms, rotary embedding, joint order) and returns them as
`AttentionRows`: softmax probabilities averaged over heads, formed on demand within a memory budget. Where the
processor did not produce a projection for the whole batch (fused QKV, PAG's partial batches), it is recomputed
from the layer's inputs instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import AttentionRows
from .config import SCFGError

__all__ = [
    "AttentionCapture",
    "CapturedPass",
    "LayerCall",
    "attention_rows",
    "default_attention",
    "grid_for",
    "head_averaged_probs",
    "head_averaged_softmax",
    "probs_from_projections",
    "recorded_projection",
    "rows_from_projections",
]


def grid_for(num_queries: int, latent_grid: Sequence[int]) -> tuple[int, ...]:
    """Return the grid with `num_queries` cells: the latent grid with its last two (spatial) axes ceil-halved k
    times (17x23 -> 9x12 -> 5x6); leading axes (video frames) are kept.

    >>> grid_for(108, (17, 23))
    (9, 12)
    >>> grid_for(30, (17, 23))
    (5, 6)
    >>> grid_for(3 * 9 * 12, (3, 17, 23))
    (3, 9, 12)
    """
    *lead, h, w = (int(n) for n in latent_grid)
    frames = math.prod(lead)
    while frames * h * w > num_queries:
        h, w = -(-h // 2), -(-w // 2)
    if frames * h * w != num_queries:
        shape = "x".join(str(n) for n in latent_grid)
        raise SCFGError(
            f"Expected an attention layer whose {num_queries} queries form a grid of the {shape} latent, but none "
            "does. Pass `levels=` that this model uses."
        )
    return (*lead, h, w)


def level_grid(latent_grid: Sequence[int], level: int) -> tuple[int, ...]:
    """Return the grid of the latent with its spatial axes downsampled `level` times (a power of two), ceil-divided
    at each halving; leading axes (frames) are kept."""
    *lead, h, w = (int(n) for n in latent_grid)
    while level > 1:
        h, w, level = -(-h // 2), -(-w // 2), level // 2
    return (*lead, h, w)


def _attention_inputs(
    attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query input `[B, Q, C]` and key input of a diffusers `Attention`, as `AttnProcessor2_0` prepares them:
    a 4-D input flattened to tokens, group norm, cross-norm."""
    if isinstance(encoder_hidden_states, tuple):  # IP-Adapter passes (text, image embeds); text is the cross map
        encoder_hidden_states = encoder_hidden_states[0]
    x = hidden_states
    if x.ndim == 4:
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    context = x if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    return x, context


def head_averaged_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the head-averaged attention probabilities `[B, Q, K]` (float32 softmax) of a diffusers `Attention`.

    Mirrors what `AttnProcessor2_0` computes before its `scaled_dot_product_attention`: group norm, cross-norm,
    the query/key projections (with any LoRA on them), optional q/k norms, the scale and the attention mask.
    """
    return attention_rows(attn, hidden_states, encoder_hidden_states, attention_mask).dense()


def attention_rows(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    budget: int | None = None,
) -> AttentionRows:
    """`head_averaged_probs` as `AttentionRows`: the processor's queries and keys recomputed from the layer's
    inputs, probabilities formed on demand."""
    x, context = _attention_inputs(attn, hidden_states, encoder_hidden_states)
    return rows_from_projections(attn, attn.to_q(x), attn.to_k(context), attention_mask, budget)


def rows_from_projections(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    budget: int | None = None,
) -> AttentionRows:
    """Head-averaged probabilities `[B, Q, K]`, as `AttentionRows`, from the outputs of `attn.to_q`
    `[B, Q, heads * d]` and `attn.to_k` `[B, K, heads * d]`: heads split, q/k norms, scale, mask."""
    batch = query.shape[0]
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    # the classic `AttnProcessor` never applies the q/k norms (`AttnProcessor2_0` does): mirror whichever runs
    if type(getattr(attn, "processor", None)).__name__ != "AttnProcessor":
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
    bias = None
    if attention_mask is not None:
        bias = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        bias = bias.view(batch, heads, -1, bias.shape[-1]).to(torch.promote_types(query.dtype, torch.float32))
    return AttentionRows(query, key, float(attn.scale), bias, **_budget(budget))


def probs_from_projections(
    attn: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense `rows_from_projections`: head-averaged probabilities `[B, Q, K]`."""
    return rows_from_projections(attn, query, key, attention_mask).dense()


def recorded_projection(
    attn: nn.Module,
    name: str,
    inputs: torch.Tensor,
    projections: Mapping[str, torch.Tensor] | None = None,
    *,
    strict: bool = False,
    missing_hint: str = "",
) -> torch.Tensor:
    """The output of `attn.<name>` on `inputs`: the processor's own when a hook recorded it for these inputs (the
    module's output shape on them), else computed again. A recorded output of another shape is the processor's on
    another tensor (PAG's partial batches): recomputed, or refused with `strict` (projections a caller passes in)."""
    linear = getattr(attn, name, None)
    if linear is None:
        hint = f" {missing_hint}" if missing_hint else ""
        raise SCFGError(
            f"Expected the attention layer {type(attn).__name__} to have `{name}` (its processor uses it), but it has "
            f"none.{hint}"
        )
    recorded = None if projections is None else projections.get(name)
    if recorded is None:
        return linear(inputs)
    expected = (*inputs.shape[:-1], linear.out_features)
    if tuple(recorded.shape) == expected:
        return recorded
    if strict:
        raise SCFGError(
            f"Expected `projections[{name!r}]` of shape {list(expected)} (the output of `{name}` on inputs of shape "
            f"{list(inputs.shape)}), but got {list(recorded.shape)}. Record it with a forward hook on this layer's "
            f"`{name}` during the same call."
        )
    return linear(inputs)


def _budget(budget: int | None) -> dict[str, int]:
    return {} if budget is None else {"budget": int(budget)}


def head_averaged_softmax(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attn: nn.Module | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return `softmax(q kᵀ · scale)` averaged over heads, `[B, Q, K]`, for `query [B, heads, Q, d]`, `key
    [B, heads, K, d]`, with `attn`'s own preparation of `attention_mask`: `AttentionRows(...).dense()`.

    The softmax runs in float32 (float64 for a float64 model): half-precision logits overflow.
    """
    batch, heads = query.shape[:2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    bias = None
    if attention_mask is not None and attn is not None:
        bias = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        bias = bias.view(batch, heads, -1, bias.shape[-1]).to(dtype)
    return AttentionRows(query, key, scale, bias).dense()


@dataclass
class LayerCall:
    """One call of a captured attention layer: its inputs, and the first output of each of its projection modules
    during the call (the processor's own `to_q`, `to_k`, ...; empty where the processor did not use them)."""

    args: tuple
    kwargs: dict
    projections: dict[str, torch.Tensor] = field(default_factory=dict)

    def input(self, index: int, name: str, default: Any = None) -> Any:
        """The layer's argument `name`, given positionally at `index` or by keyword."""
        return self.args[index] if len(self.args) > index else self.kwargs.get(name, default)


AttentionFn = Callable[[nn.Module, LayerCall, Any, "int | None"], AttentionRows]
"""`(attention module, its call, the pass context, memory budget) -> AttentionRows` of the layer."""


def default_attention(module: nn.Module, call: LayerCall, context: Any = None, budget: int | None = None):
    """`AttentionRows` of a diffusers `Attention` with separate self/cross layers, from the processor's own q/k when
    it ran `to_q`/`to_k` once on the whole batch, else recomputed from the layer's inputs (fused QKV projections,
    PAG's partial batches)."""
    hidden_states = call.input(0, "hidden_states")
    encoder_hidden_states = call.input(1, "encoder_hidden_states")
    attention_mask = call.input(2, "attention_mask")
    if isinstance(encoder_hidden_states, tuple):  # IP-Adapter: (text, image embeds)
        encoder_hidden_states = encoder_hidden_states[0]
    query, key = call.projections.get("to_q"), call.projections.get("to_k")
    batch = hidden_states.shape[0]
    queries = math.prod(hidden_states.shape[2:]) if hidden_states.ndim == 4 else hidden_states.shape[1]
    keys = queries if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    own = (
        query is not None
        and key is not None
        and query.shape[:-1] == (batch, queries)
        and key.shape[:-1] == (batch, keys)
    )
    if own:
        return rows_from_projections(module, query, key, attention_mask, budget)
    return attention_rows(module, hidden_states, encoder_hidden_states, attention_mask, budget)


@dataclass
class CapturedPass:
    """Attention of the chosen layers in one forward pass of the denoiser.

    Attributes:
        grid: the latent (token) grid of the pass, `(H, W)` or `(F, H, W)`.
        layers: layer name -> `AttentionRows` (head-averaged probabilities `[B, Q, K]`, formed on demand); empty
            when a consumer took each layer as it finished.
        context: what the family read from the denoiser's call for this pass.
    """

    grid: tuple[int, ...]
    layers: dict[str, AttentionRows] = field(default_factory=dict)
    context: Any = None

    @property
    def latent_hw(self) -> tuple[int, ...]:
        return self.grid

    @property
    def probs(self) -> dict[str, torch.Tensor]:
        """Dense `[B, Q, K]` probabilities of every recorded layer."""
        return {name: rows.dense() for name, rows in self.layers.items()}


Consumer = Callable[[str, AttentionRows], None]


class AttentionCapture:
    """Record the attention of `layers`, one denoiser forward pass at a time.

    Only the listed attention modules get hooks (a pre-hook keeping the layer's inputs, a forward hook after it,
    and forward hooks on its projection modules keeping the q/k the processor itself computed); their processors
    are not touched. A pass records only between `begin()` and `finish()`; outside, the hooks return at once (no
    cost on steps that do not need maps). Hooks are removed on exit, including when the pipeline raises.

    Args:
        denoiser (`nn.Module`): the UNet or transformer.
        layers (`Sequence[str]`): module names of the attention layers to record.
        attention_fn (*optional*): the family's `AttentionFn`; defaults to `default_attention` (diffusers
            `Attention` with separate self/cross layers).
        projections (`Sequence[str]`): names of the projection submodules whose outputs the family's function
            reuses (`to_q`, `to_k`; `add_k_proj`, `to_qkv`, ... for joint attention).
        budget (`int`, *optional*): memory budget in bytes for the probabilities formed at once (`AttentionRows`).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        layers: Sequence[str],
        attention_fn: AttentionFn | None = None,
        projections: Sequence[str] = ("to_q", "to_k"),
        budget: int | None = None,
    ) -> None:
        modules = dict(denoiser.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise SCFGError(f"Expected attention layers of the denoiser, but got unknown names {missing}.")
        self.denoiser = denoiser
        self.layers = list(layers)
        self._modules = {name: modules[name] for name in self.layers}
        self._attention_fn = attention_fn or default_attention
        self._projections = tuple(projections)
        self._budget = budget
        self._handles: list[Any] = []
        self._pending: dict[str, LayerCall] = {}
        self._consumer: Consumer | None = None
        self.current: CapturedPass | None = None

    def __enter__(self) -> AttentionCapture:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._before_hook(name), with_kwargs=True))
                for kind in self._projections:
                    projection = getattr(module, kind, None)
                    if isinstance(projection, nn.Module):
                        self._handles.append(projection.register_forward_hook(self._projection_hook(name, kind)))
                self._handles.append(module.register_forward_hook(self._after_hook(name), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._consumer = None
        self.current = None  # drop tensors: memory stays flat across generations

    def begin(self, grid: Sequence[int], consumer: Consumer | None = None, context: Any = None) -> None:
        """Start recording one denoiser pass over a latent (token) grid `grid`. With a `consumer`, each layer is
        handed to it as soon as the layer has run, and nothing is kept here."""
        self.current = CapturedPass(grid=tuple(int(n) for n in grid), context=context)
        self._consumer = consumer

    def finish(self) -> CapturedPass | None:
        """Stop recording and hand over the pass (`None` if none was recording)."""
        captured, self.current = self.current, None
        self._pending.clear()
        self._consumer = None
        return captured

    def _before_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.current is not None:
                self._pending[name] = LayerCall(args, kwargs)

        return hook

    def _projection_hook(self, name: str, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            pending = self._pending.get(name)
            if pending is not None and kind not in pending.projections:  # the first call is the processor's own
                pending.projections[kind] = output

        return hook

    def _after_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = self._pending.pop(name, None)
            captured = self.current
            if call is None or captured is None:
                return
            with torch.no_grad(), torch.profiler.record_function("scfg.capture"):
                rows = self._attention_fn(module, call, captured.context, self._budget)
            del call
            if self._consumer is not None:
                self._consumer(name, rows)
            else:
                captured.layers[name] = rows

        return hook
