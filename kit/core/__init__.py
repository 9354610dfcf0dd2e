"""Foundations every stage shares: errors, files, cards, recipes, templates, precision, network rules."""
