"""Integrations of S-CFG with diffusers pipelines."""

from .pipeline import SemanticGuidance, enable

__all__ = ["SemanticGuidance", "enable"]
