"""Inference: loading anything kit wrote, prompts in the trained format, generation."""
