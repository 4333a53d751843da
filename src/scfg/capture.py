"""Record head-averaged attention probabilities of chosen layers, one denoiser forward pass at a time.

Nothing here replaces a processor: the layer's output still comes from its own processor (SDPA, LoRA, IP-Adapter
keep working) and every other layer is untouched. For each chosen `Attention` module, forward hooks on its `to_q`
and `to_k` keep the query and key the processor itself computes, and a hook after the layer turns them into a
float32 softmax, head-averaged. Where the processor did not produce them through those modules for the whole
batch (fused QKV projections, PAG's partial batches, the joint attention of IF and SD3: families with their own
`probs_fn`), the query and key are recomputed from the layer's inputs instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import SCFGError

__all__ = [
    "AttentionCapture",
    "CapturedPass",
    "grid_for",
    "head_averaged_probs",
    "head_averaged_softmax",
    "probs_from_projections",
]

ProbsFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]

# Largest number of float32 score elements materialised at once; heads are processed in chunks below it.
_CHUNK_ELEMENTS = 1 << 26


def grid_for(num_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Return the `(h, w)` grid with `num_queries` cells: the latent ceil-halved k times (17x23 -> 9x12 -> 5x6).

    >>> grid_for(108, (17, 23))
    (9, 12)
    >>> grid_for(30, (17, 23))
    (5, 6)
    """
    h, w = latent_hw
    while h * w > num_queries:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != num_queries:
        raise SCFGError(
            f"Expected an attention layer whose {num_queries} queries form a grid of the "
            f"{latent_hw[0]}x{latent_hw[1]} latent, but none does. Pass `layers=` for this model."
        )
    return h, w


def level_grid(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Return the grid of the latent downsampled `level` times (a power of two), ceil-divided at each halving."""
    h, w = latent_hw
    while level > 1:
        h, w, level = -(-h // 2), -(-w // 2), level // 2
    return h, w


def head_averaged_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the head-averaged attention probabilities `[B, Q, K]` (float32 softmax) of a diffusers `Attention`.

    Mirrors what `AttnProcessor2_0` computes before its `scaled_dot_product_attention`: group norm, cross-norm,
    the query/key projections (with any LoRA on them), optional q/k norms, the scale and the attention mask.
    Heads are processed in chunks so that a large grid never materialises all heads' scores at once.
    """
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
    return probs_from_projections(attn, attn.to_q(x), attn.to_k(context), attention_mask)


def probs_from_projections(
    attn: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-averaged probabilities `[B, Q, K]` from the outputs of `attn.to_q` `[B, Q, heads * d]` and `attn.to_k`
    `[B, K, heads * d]`: heads split, q/k norms, scale, mask, float32 softmax."""
    batch = query.shape[0]
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    return head_averaged_softmax(query, key, float(attn.scale), attn, attention_mask)


def head_averaged_softmax(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attn: nn.Module | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return `softmax(q kᵀ · scale)` averaged over heads, `[B, Q, K]`, for `query [B, heads, Q, d]`, `key
    [B, heads, K, d]`, heads processed in chunks below a fixed element budget.

    The softmax runs in float32 (float64 for a float64 model): half-precision logits overflow.
    """
    batch, heads, num_queries, _ = query.shape
    num_keys = key.shape[2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    bias = None
    if attention_mask is not None and attn is not None:
        bias = attn.prepare_attention_mask(attention_mask, num_keys, batch)
        bias = bias.view(batch, heads, -1, bias.shape[-1]).to(dtype)
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * num_queries * num_keys))
    total = torch.zeros(batch, num_queries, num_keys, dtype=dtype, device=query.device)
    for start in range(0, heads, step):
        stop = min(heads, start + step)
        # the scale goes on the (smaller) queries; the scores are then touched in place only
        scores = torch.matmul(query[:, start:stop].to(dtype) * scale, key[:, start:stop].to(dtype).transpose(-1, -2))
        if bias is not None:
            scores += bias[:, start:stop]
        total += scores.softmax(dim=-1).sum(dim=1)
    return total / heads


@dataclass
class CapturedPass:
    """Head-averaged attention probabilities from one forward pass of the denoiser.

    Attributes:
        latent_hw: `(H, W)` of the latent fed to the denoiser.
        probs: layer name -> `[B, Q, K]` float32 probabilities.
    """

    latent_hw: tuple[int, int]
    probs: dict[str, torch.Tensor] = field(default_factory=dict)

    def require(self, layers: Sequence[str]) -> None:
        """Raise if a layer that should have run in this pass did not."""
        missing = set(layers) - self.probs.keys()
        if missing:
            raise SCFGError(
                f"Expected attention maps from layers {sorted(missing)} in this denoiser pass, but they did not "
                "run. The denoiser's forward skipped them; pass `levels=` that this model uses."
            )


class AttentionCapture:
    """Record attention probabilities of `layers`, one denoiser forward pass at a time.

    Only the listed `Attention` modules get a forward pre-hook; their processors are not touched. A pass records
    only between `begin()` and `finish()`; outside, the hooks return at once (no cost on steps that do not need
    maps). Hooks are removed on exit, including when the pipeline raises.

    Args:
        denoiser (`nn.Module`): the UNet or transformer.
        layers (`Sequence[str]`): module names of the attention layers to record.
        probs_fn (*optional*): `(attn, hidden_states, encoder_hidden_states, attention_mask) -> [B, Q, K]`;
            defaults to `head_averaged_probs` (diffusers `Attention` with separate self/cross layers).
    """

    def __init__(self, denoiser: nn.Module, layers: Sequence[str], probs_fn: ProbsFn | None = None) -> None:
        modules = dict(denoiser.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise SCFGError(f"Expected attention layers of the denoiser, but got unknown names {missing}.")
        self.denoiser = denoiser
        self.layers = list(layers)
        self._modules = {name: modules[name] for name in self.layers}
        self._handles: list[Any] = []
        self._probs_fn = probs_fn
        self._pending: dict[str, _Pending] = {}
        # layers whose q/k are taken from their own to_q/to_k (the default capture of separate self/cross layers)
        self._via_projections = {
            name
            for name, module in self._modules.items()
            if probs_fn is None and all(isinstance(getattr(module, p, None), nn.Module) for p in ("to_q", "to_k"))
        }
        self.current: CapturedPass | None = None

    def __enter__(self) -> AttentionCapture:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook_for(name), with_kwargs=True))
                if name in self._via_projections:
                    for kind in ("to_q", "to_k"):
                        hook = self._projection_hook(name, kind)
                        self._handles.append(getattr(module, kind).register_forward_hook(hook))
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
        self.current = None  # drop tensors: memory stays flat across generations

    def begin(self, latent_hw: tuple[int, int]) -> None:
        """Start recording one denoiser pass over a latent of size `latent_hw`."""
        self.current = CapturedPass(latent_hw=latent_hw)

    def finish(self) -> CapturedPass | None:
        """Stop recording and hand over the pass (`None` if none was recording)."""
        captured, self.current = self.current, None
        self._pending.clear()
        return captured

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured = self.current
            if captured is None:
                return
            hidden_states = args[0] if args else kwargs["hidden_states"]
            encoder_hidden_states = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            attention_mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
            if name in self._via_projections:
                # keep the processor's own q/k (to_q/to_k hooks); the probabilities are formed after the layer
                self._pending[name] = _Pending((hidden_states, encoder_hidden_states, attention_mask))
                return
            probs_fn = self._probs_fn or head_averaged_probs
            with torch.no_grad():
                captured.probs[name] = probs_fn(module, hidden_states, encoder_hidden_states, attention_mask)

        return hook

    def _projection_hook(self, name: str, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            pending = self._pending.get(name)
            if pending is not None and kind not in pending.projections:  # the first call is the layer's own
                pending.projections[kind] = output

        return hook

    def _after_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            pending = self._pending.pop(name, None)
            captured = self.current
            if pending is None or captured is None:
                return
            hidden_states, encoder_hidden_states, attention_mask = pending.inputs
            if isinstance(encoder_hidden_states, tuple):  # IP-Adapter: (text, image embeds)
                encoder_hidden_states = encoder_hidden_states[0]
            query, key = pending.projections.get("to_q"), pending.projections.get("to_k")
            batch = hidden_states.shape[0]
            queries = math.prod(hidden_states.shape[2:]) if hidden_states.ndim == 4 else hidden_states.shape[1]
            keys = queries if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            # the processor's own q/k only if it ran to_q/to_k once on the whole batch (not fused QKV, not PAG slices)
            own = (
                query is not None
                and key is not None
                and query.shape[:-1] == (batch, queries)
                and key.shape[:-1] == (batch, keys)
            )
            with torch.no_grad():
                if own:
                    captured.probs[name] = probs_from_projections(module, query, key, attention_mask)
                else:
                    captured.probs[name] = head_averaged_probs(
                        module, hidden_states, encoder_hidden_states, attention_mask
                    )

        return hook


@dataclass
class _Pending:
    """One chosen layer between its pre-hook and its forward hook: its inputs and the q/k its processor made."""

    inputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    projections: dict[str, torch.Tensor] = field(default_factory=dict)
