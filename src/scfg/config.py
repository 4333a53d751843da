"""Every knob of S-CFG in one frozen dataclass, with the two named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PRESETS", "SCFGConfig", "SCFGError"]


class SCFGError(ValueError):
    """Raised for input that S-CFG cannot work with; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class SCFGConfig:
    """Every knob of Semantic-aware CFG (Shen et al., CVPR 2024, arXiv 2404.05384).

    The defaults reproduce the authors' released code (the `"official"` preset, ALGORITHM.md section 2).
    `SCFGConfig.preset("paper")` gives what the paper's text describes (section 3). Tweak a preset with
    `dataclasses.replace` or `SCFGConfig.preset(name, **overrides)`; instances never change.

    Args:
        levels (`tuple[int, ...] | None`, defaults to `None`):
            Downsampling factors (relative to the latent) of the attention grids whose maps are used. Masks are
            built on the finest of them and coarser maps are upsampled bilinearly to it; every layer at these
            levels counts once. `None` takes the model family's default: `(4, 8)` for SD 1.x/2.x (the released
            code's "R = 4": latent/4 and latent/8), `(4,)` for SDXL (it has no attention at latent/8).
        layers_per_level (`int | None`, defaults to `None`):
            Use only the last `k` attention layers (in forward order) of each level; `None` uses all. The released
            DeepFloyd IF code uses 3 (the IF `official` preset sets it).
        layers_per_stack (`int | None`, defaults to `None`):
            Inside a UNet's attention stack (one `Transformer2DModel` with several transformer blocks, as in SDXL's
            10-deep stacks), use only the last `k` blocks; `None` uses all. SD 1.x/2.x stacks have one block, so
            this changes nothing there; the SDXL presets set 1 (one layer per stack, as SD's recipe has).
        completion (`"official"`, `"power_mean"` or `"none"`, defaults to `"official"`):
            Self-attention completion of the cross-attention maps. `"official"` computes `(S + 3 S²) / 4 · C`
            as the released code does; `"power_mean"` computes `(1/R) Σ_{r=1..R} Sʳ · C` (the paper's text);
            `"none"` uses `C` alone (the paper's "without completion" ablation).
        completion_order (`int`, defaults to `4`):
            `R` of the power mean. Only read when `completion="power_mean"`.
        token_map_smoothing (`float | None`, defaults to `0.5`):
            `sigma` of the 3x3 Gaussian (weights `exp(-(d / (2 sigma))²)`, reflect padding) applied to every
            token map before normalisation. `None` disables it (the paper's text).
        rate_map_smoothing (`float | None`, defaults to `0.5`):
            `sigma` of the same Gaussian applied to the final rate map. `None` disables it (the paper's text).
        token_source (`"cond"` or `"uncond"`, defaults to `"cond"`):
            Which half of the CFG batch provides the token maps whose argmax defines the regions.
        foreground_source (`"uncond"` or `"cond"`, defaults to `"uncond"`):
            Which half provides the foreground mask (not-start-token mass larger than start-token mass).
        region_tokens (`"all"` or `"words"`, defaults to `"all"`):
            Which tokens may own regions. `"all"` lets start, word, end and padding tokens compete (released
            code); `"words"` keeps only the prompt's word tokens (needs a text prompt, not `prompt_embeds`).
        tie_break (`"multi_hot"` or `"first"`, defaults to `"multi_hot"`):
            What a pixel whose maximum is shared by several tokens belongs to. `"multi_hot"` keeps the released
            code's quirk (the pixel is in every tied region and their rates add up); `"first"` gives it to the
            lowest token index, so regions partition the grid.
        benchmark (`"foreground"` or `"mean"`, defaults to `"foreground"`):
            The region whose mean score norm every region is brought to: the foreground mask, or the whole
            image (the paper's "S-CFG-mean" ablation).
        rate_clamp (`tuple[float, float] | None`, defaults to `(0.8, 3.0)`):
            Bounds on the per-pixel rate. `None` is the paper's text (no clamp).
        max_effective_scale (`float | None`, defaults to `15.0`):
            Caps `guidance_scale * rate` (the released code's `rate <= 15 / g`). `None` disables the cap.
        token_scale_mode (`"multiply"` or `"replace"`, defaults to `"multiply"`):
            How per-word scales (`scfg.enable(..., token_scales=...)` or the `word:1.5` prompt syntax) act on their
            regions: multiply the automatic rate, or replace it.
        start_fraction (`float`, defaults to `0.0`):
            S-CFG is active on steps `i` with `start_fraction <= i / num_steps < stop_fraction`; other steps are
            plain CFG and capture nothing.
        stop_fraction (`float`, defaults to `1.0`):
            See `start_fraction`.
        mask_interval (`int`, defaults to `1`):
            Recompute the regions (token masks and foreground) every `k` denoising steps and reuse them in between;
            steps that reuse them capture no attention at all, while the rates still come from that step's own
            score. `1` (every step) is what the paper and the released code do; larger values trade fidelity
            for speed (benchmarks/RESULTS.md measures both).
    """

    levels: tuple[int, ...] | None = None
    layers_per_level: int | None = None
    layers_per_stack: int | None = None
    completion: Literal["official", "power_mean", "none"] = "official"
    completion_order: int = 4
    token_map_smoothing: float | None = 0.5
    rate_map_smoothing: float | None = 0.5
    token_source: Literal["cond", "uncond"] = "cond"
    foreground_source: Literal["uncond", "cond"] = "uncond"
    region_tokens: Literal["all", "words"] = "all"
    tie_break: Literal["multi_hot", "first"] = "multi_hot"
    benchmark: Literal["foreground", "mean"] = "foreground"
    rate_clamp: tuple[float, float] | None = (0.8, 3.0)
    max_effective_scale: float | None = 15.0
    token_scale_mode: Literal["multiply", "replace"] = "multiply"
    start_fraction: float = 0.0
    stop_fraction: float = 1.0
    mask_interval: int = 1

    def __post_init__(self) -> None:
        # Lists from JSON or the CLI become tuples so that instances stay hashable and comparable.
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))
        if self.rate_clamp is not None:
            object.__setattr__(self, "rate_clamp", tuple(self.rate_clamp))
        self._validate()

    def _validate(self) -> None:
        choices = {
            "completion": ("official", "power_mean", "none"),
            "token_source": ("cond", "uncond"),
            "foreground_source": ("uncond", "cond"),
            "region_tokens": ("all", "words"),
            "tie_break": ("multi_hot", "first"),
            "benchmark": ("foreground", "mean"),
            "token_scale_mode": ("multiply", "replace"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SCFGError(f"Expected `{name}` to be one of {allowed}, but got {getattr(self, name)!r}.")
        if self.levels is not None:
            powers_of_two = all(isinstance(x, int) and x >= 1 and not x & (x - 1) for x in self.levels)
            if not self.levels or not powers_of_two or len(set(self.levels)) != len(self.levels):
                raise SCFGError(
                    "Expected `levels` as None or a non-empty tuple of distinct powers of two (e.g. (4, 8)), but "
                    f"got {self.levels!r}."
                )
        for name in ("layers_per_level", "layers_per_stack"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise SCFGError(f"Expected `{name}` >= 1 or None, but got {k!r}.")
        if not isinstance(self.completion_order, int) or self.completion_order < 1:
            raise SCFGError(f"Expected `completion_order` >= 1, but got {self.completion_order!r}.")
        for name in ("token_map_smoothing", "rate_map_smoothing"):
            sigma = getattr(self, name)
            if sigma is not None and not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
                raise SCFGError(f"Expected `{name}` > 0 or None, but got {sigma!r}.")
        if self.rate_clamp is not None:
            if len(self.rate_clamp) != 2:
                raise SCFGError(f"Expected `rate_clamp` as (low, high), but got {self.rate_clamp!r}.")
            low, high = self.rate_clamp
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
                raise SCFGError(
                    f"Expected `rate_clamp` as (low, high) with 0 <= low <= high, but got {self.rate_clamp!r}."
                )
        if self.max_effective_scale is not None and not (
            math.isfinite(self.max_effective_scale) and self.max_effective_scale > 0
        ):
            raise SCFGError(f"Expected `max_effective_scale` > 0 or None, but got {self.max_effective_scale!r}.")
        if isinstance(self.mask_interval, bool) or not isinstance(self.mask_interval, int) or self.mask_interval < 1:
            raise SCFGError(
                f"Expected `mask_interval` as an int >= 1 (1: every step), but got {self.mask_interval!r}."
            )
        if not 0.0 <= self.start_fraction < self.stop_fraction <= 1.0:
            raise SCFGError(
                "Expected 0 <= `start_fraction` < `stop_fraction` <= 1, but got "
                f"{self.start_fraction!r} and {self.stop_fraction!r}."
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SCFGConfig:
        """Return the named preset (`"official"` or `"paper"`), with `overrides` applied."""
        if name not in PRESETS:
            raise SCFGError(f"Expected a preset in {sorted(PRESETS)}, but got {name!r}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-compatible values (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SCFGConfig:
        """Build a config from `to_dict()` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SCFGError(f"Expected only SCFGConfig fields, but got unknown keys {sorted(unknown)}.")
        return cls(**data)


PRESETS: dict[str, SCFGConfig] = {
    # ALGORITHM.md section 2: what the authors' released code computes.
    "official": SCFGConfig(),
    # ALGORITHM.md section 3: the paper's text. True power mean, no smoothing, no clamps, regions partition.
    "paper": SCFGConfig(
        completion="power_mean",
        token_map_smoothing=None,
        rate_map_smoothing=None,
        tie_break="first",
        rate_clamp=None,
        max_effective_scale=None,
    ),
}
