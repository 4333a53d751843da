"""PixArt-alpha / PixArt-Sigma: `PixArtTransformer2DModel`, a DiT with cross-attention to T5 tokens.

Region definition:
- One token grid: the latent divided by the patch size (level = `patch_size`, 2 for the released models). Every
  block has self-attention (`attn1`) and cross-attention (`attn2`) at that grid; by default the middle half of the
  blocks is the candidate set whose mid-depth three feed the maps (`max_layers=3`) (early blocks are still close to the noise, late ones to pixels; in the released 28-block
  models that is blocks 7-20), and `layers_per_level=k` keeps the last `k` of those.
- T5 has no start token and the prompt is padded to `max_sequence_length` with an attention mask. Masked padding
  tokens never own regions. The foreground needs an attention sink in place of CLIP's start token: the EOS token
  `</s>` (the last unmasked token) plays that role, so the foreground is where the words' normalised mass exceeds
  the EOS token's. The negative prompt (usually empty) has no words, so the foreground comes from the
  conditional half in this family's presets (`foreground_source="cond"`).
- The transformer predicts `[ε; variance]` (learned sigma); only the first half of the channels is guided.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from . import LayerPair
from .base import last_valid_token
from .sd_unet import SDUNetFamily

__all__ = ["FAMILY"]


class PixArtFamily(SDUNetFamily):
    """Adapter for PixArt-alpha and PixArt-Sigma pipelines."""

    name = "pixart"
    default_levels = (2,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "PixArtTransformer2DModel"

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        return {"official": {"foreground_source": "cond"}, "paper": {"foreground_source": "cond"}}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        level = int(denoiser.config.patch_size)
        blocks = len(denoiser.transformer_blocks)
        pairs = []
        for i in range(blocks // 4, blocks - blocks // 4):
            block = denoiser.transformer_blocks[i]
            if isinstance(getattr(block, "attn2", None), Attention):
                pairs.append(LayerPair(f"transformer_blocks.{i}.attn2", f"transformer_blocks.{i}.attn1", level))
        return pairs

    def guided_channels(self, denoiser: nn.Module) -> int | None:
        config = denoiser.config
        return config.in_channels if config.out_channels == 2 * config.in_channels else None

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Masked padding gets exactly zero probability (a -10000 bias underflows exp); EOS is the last real token.
        return last_valid_token(cross_probs)


FAMILY = PixArtFamily()
