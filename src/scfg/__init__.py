"""Semantic-aware Classifier-Free Guidance (S-CFG, Shen et al., CVPR 2024) for diffusers pipelines."""

from .config import PRESETS, SCFGConfig, SCFGError
from .diagnostics import Recorder, StepReport
from .integration import SemanticGuidance, enable
from .tokens import WordScale, parse_weighted_prompt

__all__ = [
    "PRESETS",
    "Recorder",
    "SCFGConfig",
    "SCFGError",
    "SemanticGuidance",
    "StepReport",
    "WordScale",
    "enable",
    "parse_weighted_prompt",
]
__version__ = "0.1.0"
