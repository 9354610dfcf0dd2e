"""Preference data: pairs of a grounded answer and a minimally falsified one, from the user's own annotations."""
