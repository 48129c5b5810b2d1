"""Experiments built from the toolkit's pieces: graded carrier measures and the map."""
