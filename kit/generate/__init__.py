"""Instruction data: text-only LLM backends, prompt sets, reply parsing, the resumable runner."""
