"""Merging adapters: verification, single merge, ΔW multi-merge."""
