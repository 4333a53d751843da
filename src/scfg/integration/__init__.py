"""Integrations of S-CFG with diffusers pipelines."""

from .pipeline import SemanticGuidance, enable, guidance_arguments, resolve_config

__all__ = ["SemanticGuidance", "enable", "guidance_arguments", "resolve_config"]
