"""Per-step diagnostics: what S-CFG saw and decided at each denoising step (opt-in)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .config import SCFGError

__all__ = ["Recorder", "StepReport"]


@dataclass
class StepReport:
    """One denoising step of S-CFG, as CPU tensors. `B` counts the conditional samples only.

    Attributes:
        step: index of the step in the scheduler's timesteps (`None` if the timestep was not found there).
        timestep: the denoiser's timestep.
        guidance_scale: `g`.
        token_masks: `[B, T, h, w]` bool regions on the mask grid (`[B, T, f, h, w]` for video).
        foreground_mask: `[B, 1, h, w]` bool foreground on the mask grid (`[B, 1, f, h, w]` for video).
        rate_map: `[B, 1, H, W]` float32 final per-pixel rate on the prediction's grid (`[B, 1, F, H, W]`).
        token_rates: `[B, T]` float32 per-region rate before clamps (0 for empty regions).
        region_norms: `[B, T]` float32 mean score norm per region (0 for empty regions).
        benchmark_norm: `[B]` float32 mean score norm of the benchmark region.
        tokens: per sample, the token strings of the prompt (`None` with `prompt_embeds`).
    """

    step: int | None
    timestep: float
    guidance_scale: float
    token_masks: torch.Tensor
    foreground_mask: torch.Tensor
    rate_map: torch.Tensor
    token_rates: torch.Tensor
    region_norms: torch.Tensor
    benchmark_norm: torch.Tensor
    tokens: list[list[str]] | None = None

    @property
    def frames(self) -> int | None:
        """The number of frames of a video step's grid; None for an image."""
        return int(self.token_masks.shape[2]) if self.token_masks.ndim == 5 else None

    def frame(self, index: int) -> StepReport:
        """This step seen on one frame of a video grid (an image report; the per-region rates and norms stay those
        of the whole clip). An image report is returned as it is for frame 0."""
        if self.frames is None:
            if index != 0:
                raise SCFGError(f"Expected frame 0 of an image step, but got frame {index}.")
            return self
        if not -self.frames <= index < self.frames:
            raise SCFGError(f"Expected a frame index below {self.frames}, but got {index}.")
        # the rate map's frames are the mask grid's (frames are never interpolated)
        return dataclasses.replace(
            self,
            token_masks=self.token_masks[:, :, index],
            foreground_mask=self.foreground_mask[:, :, index],
            rate_map=self.rate_map[:, :, index],
        )

    def norm_spread(self, after: bool = False) -> torch.Tensor:
        """Return `[B]` the coefficient of variation of the non-empty regions' mean score norms.

        `after=True` measures them after rescaling by the rate S-CFG actually applied (each region's norm times
        the mean of the final rate map — clamps, cap and smoothing included — over that region): what S-CFG
        equalises. 0 means every region is guided to the same level.
        """
        masks = self.token_masks.float()
        present = masks.flatten(2).any(dim=2)
        norms = self.region_norms
        if after:
            size = self.rate_map.shape[2:]
            up = torch.nn.functional.interpolate(masks, size=size, mode="nearest")
            cells = tuple(range(2, up.ndim))
            area = up.sum(dim=cells).clamp_min(1)
            applied = (up * self.rate_map).sum(dim=cells) / area
            norms = norms * applied
        spreads = []
        for values, keep in zip(norms, present, strict=True):
            v = values[keep]
            spreads.append(v.std(unbiased=False) / v.mean() if v.numel() > 0 and v.mean() > 0 else v.new_zeros(()))
        return torch.stack(spreads)


@dataclass
class Recorder:
    """Collect every `StepReport`; pass it as `on_step=`. `max_steps` bounds memory (oldest dropped first)."""

    max_steps: int | None = None
    steps: list[StepReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = self.max_steps
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise SCFGError(f"Expected `max_steps` as an int >= 1 or None (keep every step), but got {k!r}.")

    def __call__(self, report: StepReport) -> None:
        self.steps.append(report)
        if self.max_steps is not None and len(self.steps) > self.max_steps:
            del self.steps[0]

    def clear(self) -> None:
        self.steps.clear()
