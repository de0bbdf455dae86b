"""Reward fine-tuning of text-to-video diffusion models with human feedback (the InstructVideo method)."""

__version__ = "0.1.0"
