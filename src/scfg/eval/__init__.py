"""Evaluation at scale: generation over prompts x methods x scales (accelerate), metrics, reports."""
