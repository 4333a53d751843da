"""Model families: one small, self-contained adapter per denoiser architecture.

A family answers four questions for the integration: which module is the denoiser, which attention layers feed
the maps (and at which grid level), how large the latent of a forward pass is, and how the CFG batch is laid out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..config import SCFGError

__all__ = ["FAMILIES", "LayerPair", "ModelFamily", "family_for"]


@dataclass(frozen=True)
class LayerPair:
    """A cross-attention layer, the self-attention layer of the same block, and their grid level."""

    cross: str
    self_attn: str | None
    level: int


class ModelFamily(Protocol):
    """The contract every family adapter module fulfils."""

    name: str
    default_levels: tuple[int, ...]
    probs_fn: Any  # capture function for this family's attention layers, or None for the default

    def matches(self, pipe: Any) -> bool: ...

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]: ...

    def layer_inputs(
        self, pair: LayerPair, probs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def guided_channels(self, denoiser: nn.Module) -> int | None: ...

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        """`(tokenizer, ids [P, T_k])` for each consecutive part of the `num_tokens` text tokens the denoiser sees."""
        ...

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`[B]` index of the foreground's reference token (None: token 0) and `[B, T]` real (unmasked) tokens
        (None: all), from one layer's `[B, Q, T]` cross-attention."""
        ...

    def denoiser(self, pipe: Any) -> nn.Module: ...

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]: ...

    def latent_hw(self, args: tuple, kwargs: dict) -> tuple[int, int]: ...

    def batch_size(self, args: tuple, kwargs: dict) -> int: ...

    def split_cfg_batch(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def join_cfg_batch(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor: ...


def _families() -> list[ModelFamily]:
    from . import deepfloyd_if, pixart, sd3_mmdit, sd_unet, sdxl_unet

    # first match wins
    return [sd3_mmdit.FAMILY, pixart.FAMILY, deepfloyd_if.FAMILY, sdxl_unet.FAMILY, sd_unet.FAMILY]


FAMILIES = ("sd_unet", "sdxl_unet", "deepfloyd_if", "pixart", "sd3_mmdit")


def family_for(pipe: Any) -> ModelFamily:
    """Return the adapter for `pipe`, or raise naming the supported families."""
    for family in _families():
        if family.matches(pipe):
            return family
    denoiser = getattr(pipe, "unet", getattr(pipe, "transformer", None))
    text_encoder = getattr(pipe, "text_encoder", None)
    text = f" and text encoder {type(text_encoder).__name__}" if text_encoder is not None else ""
    raise SCFGError(
        f"Expected a pipeline of a supported model family ({', '.join(FAMILIES)}: StableDiffusion 1.x/2.x, "
        f"SDXL, DeepFloyd IF, PixArt-alpha/Sigma and SD3/3.5 pipelines), but got {type(pipe).__name__} with denoiser "
        f"{type(denoiser).__name__}{text}."
    )
