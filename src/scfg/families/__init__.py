"""Model families: one small, self-contained adapter per denoiser architecture (one file each).

A family declares what is specific to its models, as data and small functions the step engine (`scfg.engine`)
and its hooks (`scfg.integration.pipeline`) read; it never runs a step itself:
- which modules are the denoisers (`denoisers`: SD's `unet`, a transformer, Wan 2.2's two experts);
- which attention layers feed the maps, at which grid level (`layer_pairs`), and how the processor forms their
  queries and keys (`attention`: heads, norms, rotary embedding, joint order) and where the cross and self parts
  are (`layer_attention`);
- how its pipeline runs classifier-free guidance (`cfg_layout`: one batch or separate passes, their order, the
  line and where the scale comes from);
- what one denoiser call looks like (`pass_context`: the token grid, the batch) and where its prediction is
  (`predictions` / `with_predictions`: a `[B, C, *grid]` view of a 4-D, packed `[B, L, C]` or 5-D output);
- its text tokens (`tokenize`, `token_roles`) and preset differences (`preset_overrides`).

`base.Family` holds the defaults (the Stable Diffusion 1.x/2.x answers); a family overrides what differs.
"""

from __future__ import annotations

from typing import Any

from ..config import SCFGError
from .base import Family, LayerPair, PassContext

__all__ = ["FAMILIES", "Family", "LayerPair", "ModelFamily", "PassContext", "family_for"]

ModelFamily = Family  # the contract every family adapter fulfils (kept as a name for type hints)


def _families() -> list[Family]:
    from . import (
        chroma,
        deepfloyd_if,
        flux,
        flux2,
        hunyuan_video15,
        kolors,
        krea2,
        ltx,
        pixart,
        qwen_image,
        sd3_mmdit,
        sd_unet,
        sdxl_unet,
        wan,
        z_image,
    )

    # first match wins
    return [
        flux.FAMILY,
        chroma.FAMILY,
        flux2.FAMILY,
        qwen_image.FAMILY,
        wan.FAMILY,
        ltx.FAMILY,
        hunyuan_video15.FAMILY,
        z_image.FAMILY,
        krea2.FAMILY,
        sd3_mmdit.FAMILY,
        pixart.FAMILY,
        deepfloyd_if.FAMILY,
        kolors.FAMILY,  # before sdxl_unet: the same UNet shape
        sdxl_unet.FAMILY,
        sd_unet.FAMILY,
    ]


FAMILIES = (
    "sd_unet",
    "sdxl_unet",
    "deepfloyd_if",
    "pixart",
    "sd3_mmdit",
    "flux",
    "chroma",
    "flux2_klein",
    "kolors",
    "wan",
    "ltx",
    "qwen_image",
    "hunyuan_video15",
    "z_image",
    "krea2",
)


def family_for(pipe: Any) -> Family:
    """Return the adapter for `pipe`, or raise naming the supported families."""
    for family in _families():
        if family.matches(pipe):
            return family
    denoiser = getattr(pipe, "unet", getattr(pipe, "transformer", None))
    text_encoder = getattr(pipe, "text_encoder", None)
    text = f" and text encoder {type(text_encoder).__name__}" if text_encoder is not None else ""
    raise SCFGError(
        f"Expected a pipeline of a supported model family ({', '.join(FAMILIES)}: StableDiffusion 1.x/2.x, "
        f"SDXL, Kolors, DeepFloyd IF, PixArt-alpha/Sigma, SD3/3.5, FLUX.1, Chroma, FLUX.2 [klein], Qwen-Image, "
        f"Z-Image, Krea 2, Wan 2.1/2.2, LTX-Video and HunyuanVideo 1.5 pipelines), but got {type(pipe).__name__} "
        "with denoiser "
        f"{type(denoiser).__name__}{text}."
    )
