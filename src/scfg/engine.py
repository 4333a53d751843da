"""The S-CFG step engine: what one denoising step means, as pure functions and plain data.

Every caller goes through this module: the stock-pipeline hooks (`scfg.enable`), the modular-pipeline guider
(`SemanticGuider`), the benchmarks and the tests. The hooks only observe (attention maps, predictions) and deliver
(the rewritten prediction); what a step computes is decided here (docs/algorithm.md section 2, and section 7 for
the pipeline-facing parts):

1. `MapAccumulator` turns each captured layer (cross-attention, self-attention, grid) into completed, smoothed,
   normalised token and foreground maps and averages them over layers as they arrive, so no layer's maps outlive
   its own completion (`PassMaps`: one denoiser pass, or one half of a batched pass).
2. `step_regions` picks the halves the config names (`token_source`, `foreground_source`) and assigns regions.
3. `guided_prediction` computes `u + a · rate · (c - u)` from the regions, with `a` the pipeline's effective scale.
4. `rewrite` returns the prediction that makes the pipeline's *own* CFG line yield that target.

How a pipeline runs CFG is data (`CFGLayout`), declared by the model family: one batch with both halves in a
given order, two separate forwards in a given order, or list inputs; and the line it combines them with,
`u + s(c - u)` or `c + s(c - u)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .attention import AttentionRows
from .rule import GuidanceResult, semantic_guidance
from .segment import assign_regions, complete_cross_attention, foreground_mask, layer_maps

__all__ = [
    "CFGLayout",
    "MapAccumulator",
    "PassMaps",
    "Regions",
    "guided_prediction",
    "rewrite",
    "step_regions",
]

Role = Literal["cond", "uncond"]


@dataclass(frozen=True)
class CFGLayout:
    """How a pipeline runs classifier-free guidance in one call, as its model family reads it.

    Attributes:
        passes: `"batched"` (one denoiser pass on a batch holding both halves), `"separate"` (two passes per
            step), or `"list"` (one pass whose inputs are lists, cond samples then uncond samples, as Z-Image).
        order: the halves (batched, list) or passes (separate) in the order they come, e.g. `("uncond", "cond")`
            for SD's `[uncond, cond]` batch and `("cond", "uncond")` for FLUX's true CFG.
        anchor: the pipeline's line: `"uncond"` is `u + s(c - u)` (SD, FLUX, Qwen-Image, Wan), `"cond"` is
            `c + s(c - u)` (Z-Image, Krea 2).
        scale: `s` in that line.

    Both lines are affine, `a · c + b · u` with `a + b = 1`: `(s, 1 - s)` and `(1 + s, -s)`. `a` is the scale of
    the equivalent `u + a(c - u)`, the one S-CFG rescales per region (and the one `max_effective_scale` caps).

    >>> CFGLayout("separate", ("cond", "uncond"), "cond", 4.0).combine
    (5.0, -4.0)
    """

    passes: Literal["batched", "separate", "list"]
    order: tuple[Role, Role] = ("uncond", "cond")
    anchor: Role = "uncond"
    scale: float = 7.5

    def __post_init__(self) -> None:
        if self.passes not in ("batched", "separate", "list"):
            raise ValueError(f"Expected `passes` 'batched', 'separate' or 'list', but got {self.passes!r}.")
        if sorted(self.order) != ["cond", "uncond"]:
            raise ValueError(f"Expected `order` to hold 'cond' and 'uncond' once each, but got {self.order!r}.")
        if self.anchor not in ("cond", "uncond"):
            raise ValueError(f"Expected `anchor` 'cond' or 'uncond', but got {self.anchor!r}.")

    @property
    def combine(self) -> tuple[float, float]:
        """`(a, b)` of the line `a · cond + b · uncond`."""
        s = float(self.scale)
        return (s, 1.0 - s) if self.anchor == "uncond" else (1.0 + s, -s)

    @property
    def effective_scale(self) -> float:
        """`a`: the line is `u + a (c - u)`."""
        return self.combine[0]

    @property
    def is_guided(self) -> bool:
        """Whether the line guides at all (`a > 1`, finite): `a = 1` is the conditional prediction alone."""
        a = self.effective_scale
        return math.isfinite(a) and a > 1.0

    def line(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
        """The pipeline's own line, written as the pipeline writes it (so its rounding is the pipeline's)."""
        if self.anchor == "uncond":
            return pred_uncond + self.scale * (pred_cond - pred_uncond)
        return pred_cond + self.scale * (pred_cond - pred_uncond)

    def halves(self, batch: torch.Tensor) -> dict[Role, torch.Tensor]:
        """Split a batched (or stacked list) tensor into its halves by role."""
        first, second = batch.chunk(2)
        return {self.order[0]: first, self.order[1]: second}

    def join(self, halves: dict[Role, torch.Tensor]) -> torch.Tensor:
        """The inverse of `halves`."""
        return torch.cat([halves[self.order[0]], halves[self.order[1]]])


@dataclass
class PassMaps:
    """Layer-averaged maps of one denoiser pass (or one half of a batched pass) on the mask grid.

    Attributes:
        token: `[B, T, *grid]` token maps (each divided by its mean, docs/algorithm.md step 2d).
        foreground: `[B, 2, *grid]` reference-token and rest-of-text maps (step 2e).
        valid: `[B, T]` bool, tokens that are real (not masked padding); `None`: all are.
    """

    token: torch.Tensor
    foreground: torch.Tensor
    valid: torch.Tensor | None = None

    def split(self, layout: CFGLayout) -> dict[Role, PassMaps]:
        """The two halves of a batched pass's maps, by role."""
        token, fg = layout.halves(self.token), layout.halves(self.foreground)
        valid = layout.halves(self.valid) if self.valid is not None else None
        return {
            role: PassMaps(token[role], fg[role], valid[role] if valid is not None else None) for role in layout.order
        }


TokenRoles = Callable[[torch.Tensor], "tuple[torch.Tensor | None, torch.Tensor | None]"]


class MapAccumulator:
    """Average layer maps over the layers of one pass as they arrive (docs/algorithm.md steps 2-3).

    Each `add` completes one layer's cross-attention with its self-attention, turns it into token and foreground
    maps on the mask grid and adds them to running sums; the layer's attention can then be freed. The sums are
    taken in the order layers arrive (forward order), the same order `segment.average_layer_maps` uses, so both
    give the same numbers.

    Args:
        mask_grid: the grid the masks live on (the finest grid used).
        completion, order, smoothing: `SCFGConfig.completion`, `.completion_order`, `.token_map_smoothing`.
        token_roles: the family's `(cross [B, Q, T]) -> (reference [B] or None, valid [B, T] or None)`, read on the
            first layer: which token plays CLIP's start token's role, and which tokens are real.
    """

    def __init__(
        self,
        mask_grid: Sequence[int],
        completion: Literal["official", "power_mean", "none"] = "official",
        order: int = 4,
        smoothing: float | None = 0.5,
        token_roles: TokenRoles | None = None,
    ) -> None:
        self.mask_grid = tuple(int(n) for n in mask_grid)
        self.completion, self.order, self.smoothing = completion, order, smoothing
        self.token_roles = token_roles
        self.layers = 0
        self._token: torch.Tensor | None = None
        self._fg: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None

    def add(
        self,
        cross: torch.Tensor,
        self_attention: torch.Tensor | AttentionRows | None,
        grid: Sequence[int],
    ) -> None:
        """Add one layer: `cross` `[B, Q, T]`, `self_attention` `[B, Q, Q]` (dense or `AttentionRows`) or None,
        `grid` the layer's grid (`prod(grid) == Q`)."""
        if self.layers == 0 and self.token_roles is not None:
            self._reference, self._valid = self.token_roles(cross)
        completed = self._complete(cross, self_attention)
        token, fg = layer_maps(completed, tuple(grid), self.mask_grid, self.smoothing, self._reference)
        self._token = token if self._token is None else self._token + token
        self._fg = fg if self._fg is None else self._fg + fg
        self.layers += 1

    def _complete(self, cross: torch.Tensor, self_attention: torch.Tensor | AttentionRows | None) -> torch.Tensor:
        """`S'C`, formed only for the text columns that hold any attention: a masked token's column of `C` is exactly
        zero (its logit is -inf or -10000, whose exp underflows), and so is its column of `S'C`; with T5's padding
        masked (PixArt: 300 positions for a prompt of a dozen tokens) this skips most of the completion's work."""
        if self_attention is None or self.completion == "none":
            return complete_cross_attention(cross, self_attention, self.completion, self.order)
        active = (cross != 0).flatten(0, 1).any(dim=0)
        if bool(active.all()):
            return complete_cross_attention(cross, self_attention, self.completion, self.order)
        columns = active.nonzero().flatten()
        part = complete_cross_attention(cross[:, :, columns], self_attention, self.completion, self.order)
        return torch.zeros_like(cross, dtype=part.dtype).index_copy_(2, columns, part)

    def result(self) -> PassMaps:
        """The layer averages; raises if no layer was added."""
        if self._token is None or self._fg is None:
            raise ValueError("Expected at least one attention layer in this pass, but got none.")
        return PassMaps(self._token / self.layers, self._fg / self.layers, self._valid)


@dataclass
class Regions:
    """The regions of one step: `token_masks` `[B, T, *grid]` and `foreground` `[B, 1, *grid]`, 0/1."""

    token_masks: torch.Tensor
    foreground: torch.Tensor


def step_regions(
    maps: dict[Role, PassMaps],
    token_source: Role = "cond",
    foreground_source: Role = "uncond",
    allowed: torch.Tensor | None = None,
    tie_break: Literal["multi_hot", "first"] = "multi_hot",
) -> Regions | None:
    """Regions from the two halves' maps (docs/algorithm.md step 4): token masks from `token_source`'s token maps,
    the foreground from `foreground_source`'s foreground maps. `allowed` `[B, T]` restricts which tokens may own
    regions (the words, with `region_tokens="words"`); masked padding of the token source never does.

    Returns None when the maps are not finite (half-precision overflow): the caller then falls back to CFG.
    """
    source, fg_source = maps[token_source], maps[foreground_source]
    if not (torch.isfinite(source.token).all() and torch.isfinite(fg_source.foreground).all()):
        return None
    if source.valid is not None:
        allowed = source.valid if allowed is None else allowed & source.valid.to(allowed.device)
    return Regions(assign_regions(source.token, allowed, tie_break), foreground_mask(fg_source.foreground))


def guided_prediction(
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    regions: Regions,
    layout: CFGLayout,
    *,
    benchmark: Literal["foreground", "mean"] = "foreground",
    rate_clamp: tuple[float, float] | None = (0.8, 3.0),
    max_effective_scale: float | None = 15.0,
    smoothing: float | None = 0.5,
    token_scales: torch.Tensor | None = None,
    token_scale_mode: Literal["multiply", "replace"] = "multiply",
    temporal_smoothing: float | None = None,
) -> GuidanceResult:
    """S-CFG's prediction `u + a · rate · (c - u)` for `pred_*` `[B, C, *grid]` (docs/algorithm.md steps 5-8), with
    `a` the layout's effective scale. Computed in float32 at least (float64 stays float64)."""
    return semantic_guidance(
        pred_uncond,
        pred_cond,
        regions.token_masks,
        regions.foreground,
        layout.effective_scale,
        benchmark=benchmark,
        rate_clamp=rate_clamp,
        max_effective_scale=max_effective_scale,
        smoothing=smoothing,
        token_scales=token_scales,
        token_scale_mode=token_scale_mode,
        out_dtype=torch.promote_types(pred_cond.dtype, torch.float32),
        temporal_smoothing=temporal_smoothing,
    )


def rewrite(
    layout: CFGLayout,
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    guided: torch.Tensor,
    replace: Role = "uncond",
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return `(pred_uncond', pred_cond', exact)`: `replace`'s prediction rewritten so that the pipeline's line
    `layout.line(u', c')` yields `guided`, the other kept (docs/algorithm.md section 7).

    With the line `a · c + b · u` (`a + b = 1`): `u' = (t - a · c) / b = c + (t - c) / b` or
    `c' = (t - b · u) / a = u + (t - u) / a`. Keeping the
    conditional prediction (`replace="uncond"`, what a batched or cond-first pipeline allows) means whatever the
    pipeline does with it after its line (`guidance_rescale`, Qwen-Image's norm rescale, SD3's skip-layer guidance)
    sees the model's own prediction.

    In the model's dtype the rewritten prediction carries its own rounding times `|a|` or `|b|` through the line,
    which dwarfs the guidance when the scale is huge (the rate is then `15 / a`) or barely above 1 (`b` -> 0). The
    line is therefore simulated in the pipeline's dtype; if it misses `guided` by more than 64 ulps of the
    prediction's largest value (plain CFG's own line is off by a few), both predictions are set to `guided`
    instead, which any such line reproduces exactly (`t · (a + b) = t`), and `guidance_rescale` (Lin et al.,
    against the original conditional prediction) is applied here because the pipeline's own rescale is the
    identity on equal halves. `exact` is False in that case.

    Args:
        layout: the pipeline's CFG layout (its line and scale).
        pred_uncond, pred_cond: `[B, C, ...]` the model's predictions (guided channels only), in the model's dtype.
        guided: `[B, C, ...]` the target, float32 or wider.
        replace: which prediction to rewrite.
        guidance_rescale: the pipeline's `guidance_rescale` (only read when both predictions are replaced).

    >>> layout = CFGLayout("batched", scale=5.0)
    >>> u, c = torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
    >>> nu, nc, exact = rewrite(layout, u, c, u + 5.0 * 0.8 * (c - u))
    >>> torch.allclose(layout.line(nu, nc), torch.full_like(u, 4.0)), exact, nc is c
    (True, True, True)
    """
    a, b = layout.combine
    dtype = guided.dtype
    if replace == "uncond":
        # (t - a·c) / b written as c + (t - c) / b: the same number, without cancelling a·c against t
        cond = pred_cond.to(dtype)
        new_uncond = (cond + (guided - cond) / b).to(pred_uncond.dtype)
        new_cond = pred_cond
    else:
        uncond = pred_uncond.to(dtype)  # (t - b·u) / a as u + (t - u) / a
        new_cond = (uncond + (guided - uncond) / a).to(pred_cond.dtype)
        new_uncond = pred_uncond
    line = layout.line(new_uncond, new_cond)  # the pipeline's line, in its own dtype
    eps = torch.finfo(pred_cond.dtype).eps
    error = (line.to(dtype) - guided).abs().amax()
    if bool(error <= 64 * eps * guided.abs().amax()):
        return new_uncond, new_cond, True
    if guidance_rescale > 0:  # Lin et al. 2305.08891, eq. 15-16, against the model's conditional prediction
        cond = pred_cond.to(dtype)
        dims = list(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    both = guided.to(pred_cond.dtype)
    return both, both, False
