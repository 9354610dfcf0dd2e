"""Evaluation: VQA metrics, judged scores, before/after tables."""
