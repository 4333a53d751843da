"""Stable Diffusion XL: `UNet2DConditionModel` with two CLIP text encoders and attention at latent/2 and latent/4.

Region definition: SDXL has no attention at latent/8, so the SD recipe (latent/4 + latent/8) cannot apply. The
default is latent/4 alone: `down_blocks.2`, `mid_block` and `up_blocks.0` (10 transformer blocks each at 1024 px,
a 32x32 grid: the semantic, low-frequency level, and the same relative level as SD's masks). `levels=(2, 4)` adds
the latent/2 blocks (64x64 grid at 1024 px: 4096x4096 self-attention maps per layer, about 16x the cost) for
finer masks. The presets use the last transformer block of each attention stack (`layers_per_stack=1`: 6
layers at latent/4, the count SD's recipe uses; all 60 cost about 20% of a CPU step at 1024 px against 1.8%,
benchmarks/RESULTS.md); `layers_per_stack=None` in an `SCFGConfig` uses every block. Token indices come from the first tokenizer; both encoders share positions. The CFG batch is
`[uncond, cond]` like SD; the UNet's added conditioning (`text_embeds`, `time_ids`) does not affect the maps.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from .sd_unet import SDUNetFamily, feeds_text_directly, has_clip_text

__all__ = ["FAMILY"]


class SDXLUNetFamily(SDUNetFamily):
    """Adapter for SDXL pipelines (base, refiner, img2img, inpainting, ControlNet)."""

    name = "sdxl_unet"
    default_levels = (4,)

    def matches(self, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        # Two CLIP encoders (the refiner has only the second) and "text_time" added conditioning. Kolors has the same
        # UNet shape but one ChatGLM encoder, projected in by the UNet ("text_proj"): not this family.
        return (
            isinstance(unet, UNet2DConditionModel)
            and hasattr(pipe, "text_encoder_2")
            and unet.config.addition_embed_type == "text_time"
            and feeds_text_directly(unet)
            and has_clip_text(pipe)
            and has_clip_text(pipe, "_2")
        )

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        # One layer (the last) per 10-deep attention stack: 6 layers at latent/4, as SD's recipe uses 6 layers.
        return {"official": {"layers_per_stack": 1}, "paper": {"layers_per_stack": 1}}


FAMILY = SDXLUNetFamily()
