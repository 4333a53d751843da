"""Integrations of S-CFG with diffusers pipelines."""

from .pipeline import SemanticGuidance, enable, resolve_config

__all__ = ["SemanticGuidance", "enable", "resolve_config"]
