"""Synthetic data with a known answer: the procedural phantom patient (primitives, rasteriser, anatomy), synthetic
motion models, and registration pairs written as files."""
