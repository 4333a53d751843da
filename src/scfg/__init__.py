"""Semantic-aware Classifier-Free Guidance (S-CFG, Shen et al., CVPR 2024) for diffusers pipelines."""

from .config import AUTO, PRESETS, SCFGConfig, SCFGError
from .diagnostics import Recorder, StepReport
from .integration import SemanticGuidance, enable, guidance, guidance_arguments, resolve_config
from .tokens import WordScale, parse_weighted_prompt

__all__ = [
    "AUTO",
    "PRESETS",
    "Recorder",
    "SCFGConfig",
    "SCFGError",
    "SemanticGuidance",
    "StepReport",
    "WordScale",
    "enable",
    "guidance",
    "guidance_arguments",
    "parse_weighted_prompt",
    "resolve_config",
]
__version__ = "0.1.0"
