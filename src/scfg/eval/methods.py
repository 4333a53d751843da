"""The methods that `scfg eval` and `scfg bench-compositional` compare, by name: one table for both.

"cfg" runs through S-CFG's maps at rate 1 (identical to CFG) so that its score-norm spread is recorded. The rest are
S-CFG's presets and the ablations of `official`, one knob each (docs/algorithm.md): the whole image as the benchmark
region (the paper's S-CFG-mean), the completion (none: the cross-attention alone; the paper's power mean), the tokens
that may own regions (only the caption's words), and the clamps (neither [0.8, 3] nor the g·rate <= 15 cap).
"""

from __future__ import annotations

from ..config import SCFGConfig

__all__ = ["METHODS"]

METHODS: dict[str, SCFGConfig] = {
    "cfg": SCFGConfig(rate_clamp=(1.0, 1.0), max_effective_scale=None, rate_map_smoothing=None),
    "scfg-official": SCFGConfig.preset("official"),
    "scfg-paper": SCFGConfig.preset("paper"),
    "scfg-mean": SCFGConfig.preset("official", benchmark="mean"),
    "scfg-no-completion": SCFGConfig.preset("official", completion="none"),
    "scfg-power-mean": SCFGConfig.preset("official", completion="power_mean"),
    "scfg-words": SCFGConfig.preset("official", region_tokens="words"),
    "scfg-no-clamp": SCFGConfig.preset("official", rate_clamp=None, max_effective_scale=None),
}
