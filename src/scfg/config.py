"""Every knob of S-CFG in one frozen dataclass, with the two named presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["AUTO", "PRESETS", "SCFGConfig", "SCFGError"]

AUTO = "auto"
"""A field left `"auto"` takes the model family's value for the preset (or the preset's own) when S-CFG is enabled."""
Auto = Literal["auto"]


class SCFGError(ValueError):
    """Raised for input that S-CFG cannot work with; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class SCFGConfig:
    """Every knob of Semantic-aware CFG (Shen et al., CVPR 2024, arXiv 2404.05384).

    The `"official"` preset reproduces the authors' released code (docs/algorithm.md section 2);
    `SCFGConfig.preset("paper")` gives what the paper's text describes (section 3). A field left at its default
    `"auto"` means "not set by the user": when S-CFG is enabled on a pipeline it takes the model family's value for
    the preset (SDXL uses one layer per attention stack, PixArt takes the foreground from the conditional half,
    DeepFloyd IF drops the [0.8, 3] clamp, ...) or else the preset's own value (the defaults listed below). A field
    given explicitly is never changed. `scfg.enable(pipe, config).config` is the resolved config, every field
    concrete; `config.resolve(...)` does the same by hand. Instances never change: tweak them with
    `dataclasses.replace` or `SCFGConfig.preset(name, **overrides)`.

    Args:
        preset_name (`"official"` or `"paper"`, defaults to `"official"`):
            The preset whose values the `"auto"` fields take.
        levels (`tuple[int, ...] | None`, defaults to `None`):
            Downsampling factors (relative to the latent) of the attention grids whose maps are used. Masks are
            built on the finest of them and coarser maps are upsampled bilinearly to it; every layer at these
            levels counts once. `None` takes the model family's default: `(4, 8)` for SD 1.x/2.x (the released
            code's "R = 4": latent/4 and latent/8), `(4,)` for SDXL (it has no attention at latent/8).
        layers_per_level (`int | None`, defaults to `None`):
            Use only the last `k` attention layers (in forward order) of each level; `None` uses all. The released
            DeepFloyd IF code uses 3 (the IF `official` preset sets it).
        max_layers (`int | None`, defaults to `None`):
            Use at most `k` of the layers the knobs above keep, per denoiser: the `k` nearest the middle of them in
            forward order. `None` keeps all (the UNets: the released code's layers). The transformer families take
            3 in both presets: of their middle half of blocks, the 3 at mid-depth (docs/algorithm.md section 9).
        mask_pool (`int`, defaults to `1`):
            Masks on a grid `mask_pool` times coarser than the finest captured layer's (a power of two): each mask
            cell's queries are averaged before its attention rows are formed, and a self-attention's key columns
            are summed per cell (docs/algorithm.md section 9), so a captured layer costs about `1 / mask_pool²` of
            its full-grid maps. `1` keeps the layer's own grid (the UNets: SD's latent/4 and latent/8 layers, the
            released code's grids). The transformer families whose tokens are 16 pixels apart (PixArt, SD3, FLUX,
            Qwen-Image, Wan, ...) take 2 in both presets: masks 32 pixels apart, the grid SD's recipe has at its
            own resolution (16x16 at 512 px).
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
        temporal_smoothing (`float | None`, defaults to `0.5`):
            Video only (a grid of frames): `sigma` of the same 3-tap Gaussian applied to the final rate map along
            the frames, after the spatial smoothing (docs/algorithm.md section 8). A cell whose region changes for
            one frame would otherwise see its rate jump for that frame, which is flicker; a rate that persists is
            unchanged (the weights sum to 1). `None` disables it; the `paper` preset has none. Images ignore it.
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

    preset_name: str = "official"
    levels: tuple[int, ...] | Auto | None = AUTO
    layers_per_level: int | Auto | None = AUTO
    layers_per_stack: int | Auto | None = AUTO
    max_layers: int | Auto | None = AUTO
    mask_pool: int | Auto = AUTO
    completion: Literal["official", "power_mean", "none"] | Auto = AUTO
    completion_order: int | Auto = AUTO
    token_map_smoothing: float | Auto | None = AUTO
    rate_map_smoothing: float | Auto | None = AUTO
    token_source: Literal["cond", "uncond"] | Auto = AUTO
    foreground_source: Literal["uncond", "cond"] | Auto = AUTO
    region_tokens: Literal["all", "words"] | Auto = AUTO
    tie_break: Literal["multi_hot", "first"] | Auto = AUTO
    benchmark: Literal["foreground", "mean"] | Auto = AUTO
    rate_clamp: tuple[float, float] | Auto | None = AUTO
    max_effective_scale: float | Auto | None = AUTO
    temporal_smoothing: float | Auto | None = AUTO
    token_scale_mode: Literal["multiply", "replace"] | Auto = AUTO
    start_fraction: float | Auto = AUTO
    stop_fraction: float | Auto = AUTO
    mask_interval: int | Auto = AUTO

    def __post_init__(self) -> None:
        if not isinstance(self.preset_name, str) or self.preset_name not in _BASE:
            raise SCFGError(f"Expected `preset_name` to be one of {sorted(_BASE)}, but got {self.preset_name!r}.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "preset_name" or (isinstance(value, str) and value == AUTO):
                continue
            try:
                value = _CHECKS[f.name](value)
            except (TypeError, ValueError) as err:  # conversions of values of the wrong type
                raise SCFGError(f"Expected `{f.name}` {_EXPECTED[f.name]}, but got {value!r}.") from err
            object.__setattr__(self, f.name, value)  # lists from JSON or the CLI become tuples (hashable)
        start, stop = self._value("start_fraction"), self._value("stop_fraction")
        if not start < stop:
            raise SCFGError(
                f"Expected `start_fraction` < `stop_fraction`, but got {start!r} and {stop!r}. S-CFG runs on the "
                "steps in between; use a smaller start or a larger stop."
            )

    def _value(self, name: str) -> Any:
        """The field's value, or the preset's family-independent value where it is `"auto"`."""
        value = getattr(self, name)
        return _BASE[self.preset_name][name] if isinstance(value, str) and value == AUTO else value

    @property
    def is_resolved(self) -> bool:
        """Whether no field is `"auto"` (the config a guided pipeline call actually uses)."""
        return not any(isinstance(getattr(self, f.name), str) and getattr(self, f.name) == AUTO for f in _FIELDS())

    def resolve(self, family_presets: Mapping[str, Mapping[str, Any]] | None = None) -> SCFGConfig:
        """Return the config with every `"auto"` field set: the model family's value for this preset where it has
        one (e.g. SDXL's `layers_per_stack=1`), else the preset's. Fields set by the user are kept.

        >>> SCFGConfig(rate_clamp=None).resolve({"official": {"rate_clamp": (1.0, 2.0), "benchmark": "mean"}}).benchmark
        'mean'
        >>> SCFGConfig(rate_clamp=None).resolve({"official": {"rate_clamp": (1.0, 2.0)}}).rate_clamp is None
        True
        """
        family = dict((family_presets or {}).get(self.preset_name, {}))
        unknown = set(family) - {f.name for f in _FIELDS()}
        if unknown:
            raise SCFGError(f"Expected family preset values for SCFGConfig fields, but got {sorted(unknown)}.")
        values = {}
        for f in _FIELDS():
            value = getattr(self, f.name)
            if isinstance(value, str) and value == AUTO and f.name != "preset_name":
                value = family.get(f.name, _BASE[self.preset_name][f.name])
            values[f.name] = value
        return SCFGConfig(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SCFGConfig:
        """Return the named preset (`"official"` or `"paper"`) with `overrides`; other fields stay `"auto"`."""
        if not isinstance(name, str) or name not in _BASE:
            raise SCFGError(f"Expected a preset in {sorted(_BASE)}, but got {name!r}.")
        return cls(preset_name=name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-compatible values (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SCFGConfig:
        """Build a config from `to_dict()` output; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise SCFGError(f"Expected a dict of SCFGConfig fields, but got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SCFGError(f"Expected only SCFGConfig fields, but got unknown keys {sorted(unknown)}.")
        return cls(**data)


def _FIELDS() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(SCFGConfig)


# -- validation of one field's value (called for every field that is not "auto") ---------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _choice(*allowed: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in allowed:
            raise TypeError
        return value

    check.allowed = allowed  # type: ignore[attr-defined]
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError
    return value


def _power_of_two(value: Any) -> int:
    value = _positive_int(value)
    if value & (value - 1):
        raise TypeError
    return value


def _positive_real(value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise TypeError
    return value


def _fraction(value: Any) -> float:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise TypeError
    return value


def _levels(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not value:
        raise TypeError
    levels = tuple(value)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 and not x & (x - 1) for x in levels):
        raise TypeError
    if len(set(levels)) != len(levels):
        raise TypeError
    return levels


def _rate_clamp(value: Any) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2 or not all(_is_real(x) for x in value):
        raise TypeError
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise TypeError
    return float(low), float(high)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "levels": _optional(_levels),
    "layers_per_level": _optional(_positive_int),
    "layers_per_stack": _optional(_positive_int),
    "max_layers": _optional(_positive_int),
    "mask_pool": _power_of_two,
    "completion": _choice("official", "power_mean", "none"),
    "completion_order": _positive_int,
    "token_map_smoothing": _optional(_positive_real),
    "rate_map_smoothing": _optional(_positive_real),
    "token_source": _choice("cond", "uncond"),
    "foreground_source": _choice("uncond", "cond"),
    "region_tokens": _choice("all", "words"),
    "tie_break": _choice("multi_hot", "first"),
    "benchmark": _choice("foreground", "mean"),
    "rate_clamp": _optional(_rate_clamp),
    "max_effective_scale": _optional(_positive_real),
    "temporal_smoothing": _optional(_positive_real),
    "token_scale_mode": _choice("multiply", "replace"),
    "start_fraction": _fraction,
    "stop_fraction": _fraction,
    "mask_interval": _positive_int,
}

# What each field accepts, for the error message (the choice fields raise with their own message).
_EXPECTED = {
    "levels": "as None or a non-empty tuple of distinct powers of two such as (4, 8) (a tuple, also for one level: (4,))",
    "layers_per_level": "as an int >= 1 or None",
    "layers_per_stack": "as an int >= 1 or None",
    "max_layers": "as an int >= 1 or None (None: every layer)",
    "mask_pool": "as a power of two >= 1 (1: the layer's own grid)",
    "completion_order": "as an int >= 1",
    "token_map_smoothing": "as a number > 0 or None",
    "rate_map_smoothing": "as a number > 0 or None",
    "rate_clamp": "as None or two numbers (low, high) with 0 <= low <= high",
    "max_effective_scale": "as a finite number > 0 or None",
    "temporal_smoothing": "as a number > 0 or None",
    "start_fraction": "as a number in [0, 1]",
    "stop_fraction": "as a number in [0, 1]",
    "mask_interval": "as an int >= 1 (1: every step)",
}
_EXPECTED.update(
    {name: f"to be one of {check.allowed}" for name, check in _CHECKS.items() if hasattr(check, "allowed")}
)


# The family-independent presets, every field concrete. docs/algorithm.md section 2 ("official": the released code) and
# section 3 ("paper": true power mean, no smoothing, no clamps, regions partition the grid).
_OFFICIAL: dict[str, Any] = {
    "levels": None,
    "layers_per_level": None,
    "layers_per_stack": None,
    "max_layers": None,
    "mask_pool": 1,
    "completion": "official",
    "completion_order": 4,
    "token_map_smoothing": 0.5,
    "rate_map_smoothing": 0.5,
    "token_source": "cond",
    "foreground_source": "uncond",
    "region_tokens": "all",
    "tie_break": "multi_hot",
    "benchmark": "foreground",
    "rate_clamp": (0.8, 3.0),
    "max_effective_scale": 15.0,
    "temporal_smoothing": 0.5,
    "token_scale_mode": "multiply",
    "start_fraction": 0.0,
    "stop_fraction": 1.0,
    "mask_interval": 1,
}
_BASE: dict[str, dict[str, Any]] = {
    "official": _OFFICIAL,
    "paper": {
        **_OFFICIAL,
        "completion": "power_mean",
        "token_map_smoothing": None,
        "rate_map_smoothing": None,
        "tie_break": "first",
        "rate_clamp": None,
        "max_effective_scale": None,
        "temporal_smoothing": None,
    },
}

PRESETS: dict[str, SCFGConfig] = {name: SCFGConfig(preset_name=name, **values) for name, values in _BASE.items()}
"""The presets with every field concrete, as they apply to a family without preset differences (SD 1.x/2.x)."""
