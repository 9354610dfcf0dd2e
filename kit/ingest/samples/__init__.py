"""Samples of real images that ship inside pip packages."""
