"""Serving: OpenAI-compatible app, model pool, request schema, terminal chat."""
