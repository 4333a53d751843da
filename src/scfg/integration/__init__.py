"""Integrations of S-CFG with diffusers pipelines."""

from .pipeline import SemanticGuidance, enable, guidance, guidance_arguments, resolve_config

__all__ = ["SemanticGuidance", "enable", "guidance", "guidance_arguments", "resolve_config"]
