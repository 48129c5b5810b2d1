"""Experiments: the paper's questions, each built from the lower tiers.

The carrier scan (``scan``), graded carrier measures (``carriers``), the strength x
method map (``map``), the main job (``demo``), cached run steps (``pipeline``) and the
paper's Table 5 (``reproduce``).
"""
